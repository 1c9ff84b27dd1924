"""The paper layout's trainer (``train_dot --layout paper``): the paper's Dot trained on Algorithm 1's tuples.

From the request: the launcher's process group joined (before any model is built, so each rank's models land on
its own GPU), the Dash opened, the Dot trained (``loop.train_dot``), and on rank 0 its N measured on a clean Dash
(training injected peft's layers into the first) and the Dot file written.
"""
from __future__ import annotations

import torch

from ..dash_source import open_dash
from ..dot_record import write_dot
from ..evaluation.latency import measure_n
from ..request import TrainRequest
from . import distributed
from .loop import train_dot


def train(request: TrainRequest) -> None:
    """Train and write the paper's Dot ``request`` asks for; ValueError, FileNotFoundError, ComfyUINotFound or
    TrainingDiverged where that cannot be done."""
    config, files, rt = request.settings, request.files, request.runtime
    dp = distributed.from_env(use_cuda=rt.device.type == "cuda")  # None in a plain single-process run
    try:
        setup = open_dash(request.dash, files.run_dir, rt.device)
        if setup.prediction not in ("eps", "v"):
            raise ValueError(f"the paper's layout trains eps and v-prediction UNets and {setup.base_family} is a "
                             f"{setup.prediction} model; train its feature Dot (--layout feature, the default)")
        if dp is None or dp.is_main:
            accum = f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else ""
            ranks = f" on {dp.world_size} processes (batch {config.batch_size}{accum} each)" if dp else ""
            print(f"Training a Dot for {setup.base_family} ({sum(p.numel() for p in setup.unet.parameters()) / 1e6:.2f}M "
                  f"params), {config.steps} steps of batch {config.batch_size}{accum if not dp else ''}{ranks} on "
                  f"{rt.describe()}; checkpoints in {files.state}")
        result = train_dot(setup, config, files.state, resume=request.resume, parallel=dp, runtime=rt)
    finally:
        if dp:
            dp.close()
    if dp is not None and not dp.is_main:
        return  # every rank holds the same Dot; rank 0 alone measures N and writes the adapter
    del setup
    clean = open_dash(request.dash, files.run_dir, rt.device)
    speed = _measure_n(request, clean, result.dot)
    dot_params, dash_params = write_dot(request, result, clean, speed, grad_checkpointing=rt.grad_checkpointing)
    print(
        f"Wrote {files.dot}\n"
        f"  loss {result.final_loss:.4f} vs {result.final_reuse_loss:.4f} for reusing the anchor estimate "
        f"({result.final_loss / result.final_reuse_loss:.0%})\n"
        f"  Dot adds {dot_params / 1e6:.3f}M params to Dash's {dash_params / 1e6:.3f}M ({dot_params / dash_params:.1%})\n"
        f"  N = {speed['N']:.2f} (Dash {speed['dash_seconds'] * 1e3:.1f} ms, Dot {speed['dot_seconds'] * 1e3:.1f} ms, "
        f"batch {request.measure.n_batch})\n  trained in {result.seconds / 60:.1f} min"
    )


def _measure_n(request: TrainRequest, clean, dot) -> dict:
    """N on the training device and precision: a CFG batch of the checkpoint, or the reference model's labels."""
    rt, n_batch = request.runtime, request.measure.n_batch
    with rt.autocast():
        if request.dash.is_checkpoint:
            from ..host.comfy_setup import measure_inputs

            x, context, backbone_kwargs = measure_inputs(clean, n_batch)
            backbone_kwargs = {k: v.to(rt.device) for k, v in backbone_kwargs.items()}
            return measure_n(clean.unet, dot, x.to(rt.device), context.to(rt.device), **backbone_kwargs)
        x = torch.randn(n_batch, *clean.latent_shape).to(rt.device)
        labels = torch.arange(n_batch) % 10
        return measure_n(clean.unet, dot, x, clean.encode(labels))
