"""Reading the project's own safetensors weights, whose metadata holds a JSON config."""
from __future__ import annotations

import json
from pathlib import Path


def read_weights_with_config(path: Path, what: str, rebuild: str, device="cpu") -> tuple[dict, dict]:
    """(tensors, metadata with JSON values decoded); clear errors for a missing or foreign file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}; rebuild with `{rebuild}`")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if "config" not in raw:
        raise ValueError(f"{path} has no 'config' metadata: not a {what} file")
    meta = {k: json.loads(v) for k, v in raw.items()}
    return load_file(str(path), device=str(device)), meta
