"""What a Dot training run writes, for either layout: its files (the Dot, the checkpoint) and the record of its
training (the Dot file's ``training`` metadata)."""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from .host.comfyui import default_dot_dir


def run_files(args, on_checkpoint: bool, trajectory: bool, dot_dir: Path) -> tuple[str, Path, Path]:
    """(name, Dot file, resumable checkpoint) of a run. The reference model's own run gets a name of its own
    (``_trained``): the default run is shorter than the committed Dot's, and writing over the committed file would
    lose the better Dot. ValueError for an --out that is not .safetensors."""
    ablation = "" if trajectory else "_no_trajectory"
    stem = f"dot_{Path(args.checkpoint or 'checkpoint').stem}" if on_checkpoint else "reference_digits"
    name = args.name or stem + ablation + ("" if on_checkpoint else "_trained")
    out = args.out or (default_dot_dir(args.comfyui) if on_checkpoint else dot_dir) / f"{name}.safetensors"
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors (got {out})")
    return name, out, args.runs / name / "train-state.safetensors"


def training_record(args, result, config_flat: dict, dot_params: int, dash_params: int, speed: dict, rt, **extra) -> dict:
    """The run's figures, settings, machine and loss curves; ``extra`` adds what one layout has of its own."""
    return {
        **extra,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "final_reuse_loss": result.final_reuse_loss,
        "data": f"prompts {args.prompts}" if args.prompts else f"images {args.images}" if args.images else args.data,
        "config": config_flat,
        "dot_params": dot_params,
        "dash_params": dash_params,
        "latency": speed,
        "machine": (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
                    else f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()),
        "device": str(rt.device),
        "precision": rt.precision,
        "date": datetime.date.today().isoformat(),
        "loss_history": result.summary["history"],
        "reuse_loss_history": result.summary["reuse_history"],
        "fixed_set_history": result.summary["fixed_history"],
    }
