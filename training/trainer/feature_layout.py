"""The feature layout's trainer (``train_dot``'s default): a feature Dot trained on whole sampling runs.

From the request: the Dash opened, the Dot trained (``rollout.train_feature_dot``), its N measured by the router,
the Dot file written, and the verdict printed: whether the trained Dot beats its untrained start, the
training-free ``forecast_k`` fill (``verdict``).
"""
from __future__ import annotations

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
    ComfyUINotFound or TrainingDiverged where that cannot be done."""
    if distributed.world_size() > 1:
        raise ValueError("the feature Dot trains in one process (one run a step); start it without torchrun")
    config, files, rt = request.settings, request.files, request.runtime
    setup = open_dash(request.dash, files.run_dir, rt.device)
    blocks = blocks_of(setup.unet, request.dash.is_checkpoint)
    print(f"Training a feature Dot for {setup.base_family} ({sum(p.numel() for p in setup.unet.parameters()) / 1e6:.2f}M "
          f"params): {config.runs} runs of {config.batch} samples ({config.min_steps}-{config.max_steps} steps), "
          f"{config.steps} steps on {rt.describe()}; checkpoints in {files.state}")
    result = train_feature_dot(setup, blocks, config, files.state, resume=request.resume, runtime=rt)
    with rt.autocast():
        speed = rollout_n(setup, fill_for(result.dot, setup.unet, blocks), max(1, request.measure.n_batch // 2), rt.device)
    dot_params, dash_params = write_dot(request, result, setup, speed, layout="feature", loss=LOSS)
    print(f"Wrote {files.dot}\n"
          f"  Dot adds {dot_params / 1e6:.4f}M params to Dash's {dash_params / 1e6:.3f}M ({dot_params / dash_params:.2%})\n"
          f"  N = {speed['N']:.2f} (Dash {speed['dash_ms']:.1f} ms, fill {speed['fill_ms']:.1f} ms a call, batch "
          f"{speed['batch']})\n  trained in {result.seconds / 60:.1f} min; training runs' end error over reuse's, "
          f"last fifth: {result.final_loss:.3f}", flush=True)
    print_verdict(request, result)
