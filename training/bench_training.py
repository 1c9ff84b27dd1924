"""Dot training throughput and peak memory on the SD shapes with random weights, for ``training.bench_latency
--train-steps`` (either layout)."""
from __future__ import annotations

from pathlib import Path

import torch


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_training(arch: str, spec: dict, backbone, m: int, steps: int, batch: int, device, layout: str = "paper",
                   blocks=None, run_steps: int = 4) -> dict:
    """Dot training throughput and peak memory. The paper's layout: each sample costs two Dash CFG passes (anchor
    and target, no grad) plus the Dot's forward and backward through the frozen backbone at 1/2^m. The feature
    layout: each step is one sampling run of ``run_steps`` steps (pattern D.) with the gradient kept through every
    Dash call after the first fill; its targets (two runs without gradient each) are made first and not timed."""
    import tempfile

    from morse_engine import fingerprint_module
    from morse_engine.parameterization import DiscreteSchedule

    from .reference.unet import sd_alphas_cumprod
    from .trainer.config import DotTrainConfig
    from .trainer.dash_setup import DashSetup
    from .trainer.loop import train_dot
    from .trainer.rollout import RolloutConfig, train_feature_dot

    if spec["adm"]:
        raise SystemExit(f"error: --train-steps is measured for SD1.x-family architectures; {arch} needs its y vector")
    side = spec["resolution"] // 8

    def batches(b, gen):
        while True:  # conditions are the context itself here: encode is the identity
            yield torch.randn(b, 4, side, side, generator=gen), torch.randn(b, *spec["context"], generator=gen)

    setup = DashSetup(unet=backbone, sampling=DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod()), encode=lambda c: c,
                      null_condition=lambda b: torch.zeros(b, *spec["context"]), batches=batches,
                      base_family=arch, fingerprint=fingerprint_module(backbone), latent_shape=(4, side, side))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory_mb(device)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.safetensors"
        if layout == "feature":
            cfg = RolloutConfig(steps=steps, runs=1, fixed_runs=1, batch=batch, min_steps=run_steps, max_steps=run_steps,
                                samplers=("euler",), warmup=1, fixed_every=10**9, checkpoint_every=10**9)
            result = train_feature_dot(setup, blocks, cfg, state, log=lambda *_: None)
        else:
            cfg = DotTrainConfig.of(m=m, steps=steps, batch_size=batch, warmup=1, checkpoint_every=10**9)
            result = train_dot(setup, cfg, state, progress=True)
    return {"arch": arch, "layout": layout, "m": m if layout == "paper" else None, "batch": batch, "steps": steps,
            "run_steps": run_steps if layout == "feature" else None, "seconds": result.seconds,
            "samples_per_s": steps * batch / result.seconds, "peak_mb": peak_memory_mb(device),
            "peak_mb_before_training": before,
            "note": "includes the final checkpoint write" + ("; the feature layout's fixed-set scoring too" if
                                                             layout == "feature" else "")}
