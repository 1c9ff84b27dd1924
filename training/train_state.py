"""Resumable training state in safetensors (never pickle), written atomically.

Holds the Dot's weights (with its LoRA copied out of peft), the optimizer's moments, the
RNG states and the step, so a killed run continues where its last checkpoint left it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from morse_engine.adapter_file import save_file_atomic


def save_state(path: Path, dot, optimizer, step: int, generator: torch.Generator, extra: dict) -> None:
    tensors = {f"dot.{k}": v.detach().cpu().contiguous() for k, v in dot.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    meta = {"step": str(step), "param_groups": json.dumps(opt["param_groups"]), "extra": json.dumps(extra)}
    save_file_atomic(tensors, path, meta)


def load_state(path: Path, dot, optimizer, generator: torch.Generator) -> tuple[int, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dot.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("dot.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    return int(meta["step"]), json.loads(meta["extra"])
