#!/usr/bin/env bash
# Sets up .venv for the tests and the training tools on a fresh machine (only Python needed).
# torch is pinned through constraints.txt so pip takes the CPU build and never a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.morse-installed
want=$(cat constraints.txt requirements*.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0 -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
