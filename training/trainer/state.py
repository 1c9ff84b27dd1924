"""Resumable training state in safetensors (never pickle), written atomically.

Holds the Dot's weights (with its LoRA copied out of peft), the optimizer's moments, the
RNG states and the step, so a killed run continues where its last checkpoint left it. Both layouts' loops
resume through :func:`resume_state` and :func:`check_same_settings`.
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


def resume_state(path: Path, dot, optimizer, generator: torch.Generator, rank: Optional[int] = None) -> tuple[int, dict]:
    """``load_state`` for ``--resume``: FileNotFoundError, saying what to do, where the run has no checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume was given but there is no checkpoint at {path}; start the run without --resume")
    return load_state(path, dot, optimizer, generator, rank=rank)


def check_same_settings(path: Path, saved: Optional[dict], mine: dict, may_change=(), defaults: Optional[dict] = None) -> None:
    """ValueError naming the settings in which the checkpoint's run (``saved``) differs from this one (``mine``),
    except those that ``may_change``. ``defaults``: what a setting the checkpoint predates had then (only this
    run's settings are compared); without them a setting either side lacks differs."""
    saved = saved or {}
    keys = list(mine) if defaults is not None else list(mine) + [k for k in saved if k not in mine]
    differs = [k for k in keys if k not in may_change and saved.get(k, (defaults or {}).get(k)) != mine.get(k)]
    if differs:
        raise ValueError(f"the checkpoint at {path} was made with other settings ({', '.join(differs)}); resume with "
                         "the same options or start a new run (another --name, or without --resume)")
