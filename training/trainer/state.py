"""Resumable training state in safetensors (never pickle), written atomically.

Holds the Dot's weights (with its LoRA copied out of peft), the optimizer's moments, the
RNG states and the step, so a killed run continues where its last checkpoint left it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from morse_engine.adapter_file import save_file_atomic


def save_state(path: Path, dot, optimizer, step: int, generator: torch.Generator, extra: dict,
               rank_generators: Optional[list] = None) -> None:
    """``rank_generators``: in a data-parallel run, every rank's data-generator state (rank order),
    so each rank's data stream continues where it stopped."""
    tensors = {f"dot.{k}": v.detach().cpu().contiguous() for k, v in dot.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    for rank, state in enumerate(rank_generators or ()):
        tensors[f"rng.generator.rank{rank}"] = state.cpu()
    meta = {"step": str(step), "param_groups": json.dumps(opt["param_groups"]), "extra": json.dumps(extra)}
    save_file_atomic(tensors, path, meta)


def load_state(path: Path, dot, optimizer, generator: torch.Generator, rank: Optional[int] = None) -> tuple[int, dict]:
    """``rank``: in a data-parallel run, restore that rank's own data-generator state."""
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
    key = "rng.generator" if rank is None else f"rng.generator.rank{rank}"
    if key not in tensors:
        raise ValueError(f"the checkpoint at {path} has no data-stream state for rank {rank}; "
                         "resume with the number of processes that wrote it")
    generator.set_state(tensors[key])
    return int(meta["step"]), json.loads(meta["extra"])
