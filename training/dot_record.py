"""What a Dot training run writes, for either layout: its files (the Dot, the checkpoint) and the Dot file with the
record of its training (its ``training`` metadata)."""
from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Optional

import torch

from morse_engine import save_dot

from .dash_source import DashSource
from .host.comfyui import default_dot_dir
from .request import RunFiles, TrainRequest


def run_files(dash: DashSource, trajectory: bool, runs_dir: Path, dot_dir: Path, name: Optional[str] = None,
              out: Optional[Path] = None) -> RunFiles:
    """A run's files: ``name`` (default: from the Dash), the Dot ``out`` (default: ``<dot_dir>/<name>.safetensors``,
    a checkpoint's in ComfyUI's models/dot_models) and ``runs_dir/<name>/train-state.safetensors``. The reference
    model's own run gets a name of its own (``_trained``): the default run is shorter than the committed Dot's, and
    writing over the committed file would lose the better Dot. ValueError for an ``out`` that is not .safetensors."""
    ablation = "" if trajectory else "_no_trajectory"
    stem = f"dot_{Path(dash.checkpoint).stem}" if dash.is_checkpoint else "reference_digits"
    name = name or stem + ablation + ("" if dash.is_checkpoint else "_trained")
    out = out or (default_dot_dir(dash.comfyui) if dash.is_checkpoint else dot_dir) / f"{name}.safetensors"
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors (got {out})")
    return RunFiles(name, out, runs_dir / name / "train-state.safetensors")


def training_record(request: TrainRequest, result, dot_params: int, dash_params: int, speed: dict, **extra) -> dict:
    """The run's figures, settings, machine and loss curves; ``extra`` adds what one layout has of its own."""
    rt = request.runtime
    return {
        **extra,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "final_reuse_loss": result.final_reuse_loss,
        "data": request.dash.describe_data(),
        "config": request.settings.flat(),
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


def write_dot(request: TrainRequest, result, dash, speed: dict, **extra) -> tuple[int, int]:
    """The trained Dot written to the run's Dot file, for ``dash`` (a DashSetup: its backbone, family and
    fingerprint), with N and the training record; returns (the Dot's parameters, Dash's)."""
    dash_params = sum(p.numel() for p in dash.unet.parameters())
    dot_params = sum(p.numel() for p in result.dot.parameters())
    training = training_record(request, result, dot_params, dash_params, speed, **extra)
    save_dot(request.files.dot, result.dot, base_family=dash.base_family, fingerprint=dash.fingerprint,
             measured_n=speed["N"], training=training)
    return dot_params, dash_params
