"""The feature layout's trainer (``train_dot``'s default): a feature Dot trained on whole sampling runs.

From the request: the Dash opened, the Dot trained (``rollout.train_feature_dot``), its N measured by the router,
the Dot file written, and the verdict printed: whether the trained Dot beats its untrained start, the
training-free ``forecast_k`` fill (``verdict``).
"""
from __future__ import annotations

from dataclasses import replace

from morse_engine.dot_layouts.feature import fill_for

from ..dash_source import open_dash
from ..dot_record import write_dot
from ..host.unet_blocks import blocks_of
from ..request import TrainRequest
from . import distributed
from .rollout import rollout_n, train_feature_dot
from .verdict import print_verdict

LOSS = "squared distance of a run's end to Dash's at every step, over reuse's (pattern D.)"


def train(request: TrainRequest) -> None:
    """Train, write and judge the feature Dot ``request`` asks for; ValueError, FileNotFoundError,
    ComfyUINotFound or TrainingDiverged where that cannot be done. Under torchrun / accelerate launch every rank
    trains (``rollout.train_feature_dot``) and rank 0 alone measures N, writes the Dot and judges it."""
    config, files, rt = request.settings, request.files, request.runtime
    # joined before any model is built, so that each rank's models land on its own GPU
    dp = distributed.from_env(use_cuda=rt.device.type == "cuda")
    try:
        setup = open_dash(request.dash, files.run_dir, rt.device)
        if setup.guidance_distilled and not request.cfg_given and (config.cfg_min, config.cfg_max) != (1.0, 1.0):
            config = replace(config, cfg_min=1.0, cfg_max=1.0)
            request = replace(request, settings=config)
            if dp is None or dp.is_main:
                print(f"{setup.base_family} is sampled at CFG 1 (one cond a step, as ComfyUI's templates run it): the "
                      "training runs are too (--rollout-cfg MIN,MAX trains at another)")
        blocks = blocks_of(setup.unet, request.dash.is_checkpoint)
        if dp is None or dp.is_main:
            ranks = f", one run a step on each of {dp.world_size} processes" if dp else ""
            print(f"Training a feature Dot for {setup.base_family} ({sum(p.numel() for p in setup.unet.parameters()) / 1e6:.2f}M "
                  f"params): {config.runs} runs of {config.batch} samples ({config.min_steps}-{config.max_steps} steps), "
                  f"{config.steps} steps{ranks} on {rt.describe()}; checkpoints in {files.state}")
        result = train_feature_dot(setup, blocks, config, files.state, resume=request.resume, runtime=rt, parallel=dp)
    finally:
        if dp:
            dp.close()
    if dp is not None and not dp.is_main:
        return  # every rank holds the same Dot; rank 0 alone measures N and writes it
    with rt.autocast():
        speed = rollout_n(setup, fill_for(result.dot, setup.unet, blocks), max(1, request.measure.n_batch // 2), rt.device)
    dot_params, dash_params = write_dot(request, result, setup, speed, layout="feature", loss=LOSS)
    print(f"Wrote {files.dot}\n"
          f"  Dot adds {dot_params / 1e6:.4f}M params to Dash's {dash_params / 1e6:.3f}M ({dot_params / dash_params:.2%})\n"
          f"  N = {speed['N']:.2f} (Dash {speed['dash_ms']:.1f} ms, fill {speed['fill_ms']:.1f} ms a call, batch "
          f"{speed['batch']})\n  trained in {result.seconds / 60:.1f} min; training runs' end error over reuse's, "
          f"last fifth: {result.final_loss:.3f}", flush=True)
    print_verdict(request, result)
