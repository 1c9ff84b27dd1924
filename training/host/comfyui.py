"""Finding and importing the user's ComfyUI, for the tools that train on or time a real checkpoint."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..paths import PACK_DIR


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI: says every way to point at one."""


def find_comfyui(explicit: Optional[str] = None) -> Path:
    """``--comfyui``, else ``COMFYUI_PATH``, else the ComfyUI this pack sits in (custom_nodes/<pack>)."""
    tried = []
    for origin, value in (("--comfyui", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH"))):
        if value:
            path = Path(value).expanduser().resolve()
            if (path / "comfy").is_dir():
                return path
            # a path given on purpose that is not a ComfyUI is an error, not something to skip past
            raise ComfyUINotFound(f"{origin}={value} has no comfy/ package; point it at the ComfyUI folder (the one holding main.py and comfy/)")
        tried.append(origin)
    grand = PACK_DIR.parent.parent
    if PACK_DIR.parent.name == "custom_nodes" and (grand / "comfy").is_dir():
        return grand
    raise ComfyUINotFound(
        "cannot find ComfyUI to load the checkpoint with: pass --comfyui /path/to/ComfyUI, or set COMFYUI_PATH, "
        f"or install this pack in ComfyUI/custom_nodes/ (it is in {PACK_DIR.parent})"
    )


def import_comfy(path: Path, device: Optional[str] = None, pytorch_attention: bool = False):
    """Import ComfyUI from ``path`` with the running Python; clear error when that is not possible.

    ComfyUI's model management looks for a GPU at import and fails on a machine without one
    unless told to use the CPU, so that flag is set (before the import) where there is no CUDA
    device or the CPU is asked for. ``pytorch_attention``: torch's fused attention also on the CPU (ComfyUI's
    CPU default is its chunked sub-quadratic attention, several times slower at 512 px), as on a GPU.
    """
    path = Path(path)
    if str(path) not in sys.path:
        # after the pack's own folder: the pack's packages (training, morse_engine, nodes) must keep their names
        sys.path.insert(1 if sys.path and sys.path[0] in ("", str(PACK_DIR)) else 0, str(path))
    try:
        import comfy.cli_args

        if device == "cpu" or not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        if pytorch_attention:
            comfy.cli_args.args.use_pytorch_cross_attention = True
        import comfy.k_diffusion.sampling  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.model_sampling  # noqa: F401
        import comfy.samplers  # noqa: F401
        import comfy.sd  # noqa: F401
        import folder_paths  # noqa: F401
    except Exception as exc:
        raise ComfyUINotFound(
            f"ComfyUI at {path} cannot be imported with this Python ({sys.executable}): {exc!r}. "
            "Run training with ComfyUI's own Python (the one that starts ComfyUI, e.g. its venv or python_embeded) "
            "after `pip install -r requirements-train.txt` there"
        ) from exc
    return comfy


def default_dot_dir(comfyui: Optional[str] = None) -> Path:
    """ComfyUI's models/dot_models, where Load Dot Model lists Dots (the pack's own folder if no ComfyUI is found;
    the setup then stops with the message that says how to point at ComfyUI)."""
    try:
        return find_comfyui(comfyui) / "models" / "dot_models"
    except ComfyUINotFound:
        return PACK_DIR / "models" / "dot_models"
