#!/usr/bin/env bash
# Installs the real host for the host tests: ComfyUI 0.8.0 from ../shared/comfyui-v0.8.0.tar.gz into
# DEST/comfyui with its own virtual environment DEST/venv (offline recipe: ../shared/comfyui-README.md).
# ComfyUI's core imports torchvision, so its venv takes the torch 2.14.1 / torchvision 0.29.1 builds
# from the machine's wheel store; the pack's own .venv keeps torch 2.13.0 (constraints.txt).
# Usage: bash scripts/setup_comfyui.sh DEST   (prints nothing on success but pip's errors)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: setup_comfyui.sh DEST}
tarball=${COMFYUI_TARBALL:-../shared/comfyui-v0.8.0.tar.gz}
[ -f "$tarball" ] || { echo "error: $tarball not found: set COMFYUI_TARBALL to ComfyUI 0.8.0's source tarball" >&2; exit 2; }
mkdir -p "$dest"
[ -d "$dest/comfyui/comfy" ] || tar xzf "$tarball" -C "$dest"
[ -x "$dest/venv/bin/python" ] || python3 -m venv "$dest/venv"
pip=("$dest/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -c <(echo torch==2.14.1) -r "$dest/comfyui/requirements.txt" requests
"${pip[@]}" -c <(echo torch==2.14.1) -r requirements-dev.txt playwright
