"""Train a Dot adapter: ``python -m training.train_dot``.

With no arguments it trains a feature Dot for the embedded reference Dash on the digits training
split and writes ``models/dot_models/reference_digits_trained.safetensors`` (beside the committed
``reference_digits.safetensors``, a longer run of the same recipe, which it never overwrites). A run writes a
resumable checkpoint every ``--checkpoint-every`` steps to ``runs/<name>/train-state.safetensors``;
``--resume`` continues a killed run from it.

For your own checkpoint (SD1.x, SD2.x incl. v-prediction, SDXL; run with ComfyUI's Python):
``--checkpoint model.safetensors --prompts prompts.txt`` (data-free) or ``--images DIR``
(captions in name.txt); the Dot goes to ComfyUI's models/dot_models (see training/host/comfy_setup.py).

Cost (training/trainer/runtime.py): ``--device`` (default: CUDA where available), ``--precision``
(default: bf16 on CUDA, fp16 where the GPU lacks bf16, fp32 on the CPU), and for the paper's layout
``--grad-checkpointing`` (default: on for CUDA) and ``--grad-accum K``.

This module is the command's edge: its flags become one :class:`~training.request.TrainRequest`, handed to the
layout's trainer (``training.trainer.feature_layout`` or ``paper_layout``); a request that cannot be served ends
here, in one place, as one line on stderr and exit code 2 (3 for a loss that stopped being finite).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from morse_engine import FeatureDotConfig

from .dash_source import CheckpointDash, ReferenceDash, is_reference_weights
from .dot_record import run_files
from .host.checkpoint import TrajectorySettings
from .host.comfyui import ComfyUINotFound
from .paths import DOT_DIR, RUNS_DIR
from .request import LAYOUTS, Measurements, TrainRequest
from .trainer import distributed
from .trainer import runtime as runtimes
from .trainer.config import add_config_arguments, config_from_options, option_names
from .trainer.optim import TrainingDiverged
from .trainer.rollout import RolloutConfig

# train_dot flags the feature Dot shares with the paper's (the loop's and the ablation's); every other option of
# the paper's Dot or its tuples is refused with --layout feature rather than silently ignored
SHARED = {"steps", "lr", "warmup", "seed", "checkpoint_every", "trajectory"}


def min_max(kind):
    """An argparse type for ``MIN,MAX`` (or one value, for both)."""

    def parse(text):
        values = [kind(v) for v in text.split(",") if v.strip()]
        if len(values) == 1:
            values *= 2
        if len(values) != 2:
            raise ValueError(f"expected MIN,MAX or one value, got {text!r}")
        return tuple(values)

    parse.__name__ = "MIN,MAX"  # argparse names the type in its error message
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train_dot", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Dash weights: your checkpoint, loaded by ComfyUI (with --prompts or --images), or reference-format "
                        "weights (default: the embedded reference model)")
    p.add_argument("--data", default="digits", choices=["digits"], help="training data (default: scikit-learn digits, train split)")
    p.add_argument("--name", default=None, help="output name (default: reference_digits_trained, or reference_digits_no_trajectory_trained; the "
                   "committed reference_digits*.safetensors are longer runs of the same recipe and stay as they are)")
    p.add_argument("--out", type=Path, default=None, help="output .safetensors (default: models/dot_models/<name>.safetensors)")
    p.add_argument("--layout", choices=LAYOUTS, default="feature",
                   help="feature (default): Dash's own outer blocks on the current input, the deep feature forecast "
                        "from the Dash calls before plus a learned change, trained on where whole sampling runs end; "
                        "paper: the paper's Dot (light blocks around the backbone at 1/2^m resolution, LoRA), trained "
                        "on Algorithm 1's tuples")
    _feature_arguments(p)
    add_config_arguments(p)  # every option of the paper's Dot, its tuples, its loss and the loop, from DotTrainConfig's fields
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/train-state.safetensors")
    p.add_argument("--runs", type=Path, default=RUNS_DIR,
                   help="folder of the run folders (checkpoints, cached latents and text embeddings; default: runs/ in the pack)")
    p.add_argument("--n-batch", type=int, default=None,
                   help="batch on which N (Dot speed-up) is measured (default: 512 for the reference model, 2 = one CFG pair for a checkpoint)")
    p.add_argument("--compare-samples", type=int, default=48,
                   help="feature Dot of the reference model: samples on which the trained Dot is compared with its "
                        "untrained start at fixed step counts, as training.compare_fills does (default: 48, its own; 0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _cost_arguments(p)
    _checkpoint_arguments(p)
    return p


def _feature_arguments(p) -> None:
    d = RolloutConfig()
    g = p.add_argument_group("the feature Dot (--layout feature) and its rollout training; --steps, --lr, --warmup, "
                             "--seed, --checkpoint-every and --no-trajectory apply too (defaults: %d steps, lr %g, "
                             "warm-up %d)" % (d.steps, d.lr, d.warmup))
    g.add_argument("--feature-k", type=int, default=d.dot.k, help="outer UNet blocks per side rerun on the current input")
    g.add_argument("--forecast", type=int, choices=(0, 1, 2), default=d.dot.forecast,
                   help="order of the deep feature's forecast from the Dash calls before (0: inherit it)")
    g.add_argument("--change-width", type=int, default=d.dot.width, help="width of the learned change network")
    g.add_argument("--rollout-runs", type=int, default=d.runs, help="fixed training runs (their targets made once)")
    g.add_argument("--rollout-batch", type=int, default=d.batch, help="samples per run")
    g.add_argument("--rollout-steps", type=min_max(int), default=(d.min_steps, d.max_steps),
                   help="MIN,MAX sampling steps of a run (drawn log-uniformly)")
    g.add_argument("--rollout-cfg", type=min_max(float), default=None,
                   help=f"MIN,MAX CFG of a run (default: {d.cfg_min:g},{d.cfg_max:g}; a checkpoint's: --trajectory-cfg)")
    g.add_argument("--rollout-samplers", default=",".join(d.samplers), help="comma-separated: euler, dpmpp_2m")


def _cost_arguments(p) -> None:
    g = p.add_argument_group("cost: device, precision, memory")
    g.add_argument("--device", default=None,
                   help="where Dash, the Dot, the LoRA and the batches live: cpu, cuda, cuda:1, ... (default: cuda if "
                        "available, else cpu; under torchrun each process uses cuda:LOCAL_RANK)")
    g.add_argument("--precision", default=None, choices=runtimes.PRECISIONS,
                   help="autocast for Dash's passes and the Dot's forward/backward; trainable weights stay fp32 "
                        "(default: bf16 on CUDA, fp16 with loss scaling where the GPU has no bf16, fp32 on the CPU; "
                        "fp16 needs CUDA)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="paper layout: recompute the backbone call inside the Dot during the backward instead of "
                        "keeping its activations (default: on for CUDA, off on the CPU)")


def _checkpoint_arguments(p) -> None:
    d = TrajectorySettings()
    g = p.add_argument_group("training for your checkpoint (needs ComfyUI)")
    g.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, else the ComfyUI this pack is installed in)")
    g.add_argument("--prompts", type=Path, default=None,
                   help="data-free: a text file with one prompt per line; anchors are taken on the checkpoint's own sampling runs")
    g.add_argument("--images", type=Path, default=None, help="a folder of images with name.txt captions, encoded with the checkpoint's VAE")
    g.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels (default: 512 SD1.x, 768 SD2.x-v, 1024 SDXL and flow image models, 640 video)")
    g.add_argument("--frames", type=int, default=33, help="clip length of a video family's runs (Wan: 1 + 4k; default 33)")
    g.add_argument("--text-encoder", type=Path, action="append", default=[], metavar="FILE",
                   help="--checkpoint is a diffusion model alone (models/diffusion_models); its text encoder file(s), "
                        "as CLIPLoader (once) or DualCLIPLoader (twice) reads them")
    g.add_argument("--clip-type", default=None, help="CLIPLoader's type for --text-encoder (default: the model family's)")
    g.add_argument("--vae", type=Path, default=None, help="the VAE file of a diffusion model alone (for --images)")
    g.add_argument("--trajectory-sampler", default=d.sampler, help="ComfyUI sampler of the data-free runs (default: euler)")
    g.add_argument("--trajectory-scheduler", default=d.scheduler, help="ComfyUI scheduler of the data-free runs (default: normal)")
    g.add_argument("--trajectory-steps", type=min_max(int), default=d.steps, help="MIN,MAX steps of a data-free run, drawn per batch")
    g.add_argument("--trajectory-cfg", type=min_max(float), default=d.cfg, help="MIN,MAX CFG scale of a data-free run, drawn per batch")


# ---- flags -> request ------------------------------------------------------------------------


def wants_comfy(args) -> bool:
    """A ComfyUI checkpoint run: a data source for it was given, or --checkpoint is not a reference-Dash file."""
    if args.prompts is not None or args.images is not None or args.text_encoder:
        return True
    return args.checkpoint is not None and not is_reference_weights(Path(args.checkpoint))


def dash_source(args) -> CheckpointDash | ReferenceDash:
    """The user's checkpoint (``wants_comfy``), else the reference model (the embedded one, or --checkpoint's
    weights in its format)."""
    if not wants_comfy(args):
        return ReferenceDash(args.checkpoint, args.data)
    if args.checkpoint is None:
        raise ValueError("--prompts/--images train a Dot for your checkpoint: give it with --checkpoint PATH")
    trajectory = TrajectorySettings(args.trajectory_sampler, args.trajectory_scheduler, args.trajectory_steps,
                                    args.trajectory_cfg)
    return CheckpointDash(Path(args.checkpoint), args.prompts, args.images, args.comfyui, args.resolution, trajectory,
                          frames=args.frames, text_encoders=tuple(args.text_encoder), clip_type=args.clip_type,
                          vae=args.vae)


def options_given(args) -> dict:
    """The paper's options given as flags, by field name (a flag not given is not in the namespace)."""
    return {name: getattr(args, name) for name in option_names() if hasattr(args, name)}


def feature_settings(args, dash) -> RolloutConfig:
    """The feature Dot's settings; ValueError for an option only the paper's Dot has."""
    given = options_given(args)
    paper_only = sorted(name for name in given if name not in SHARED)
    if paper_only:
        flags, one = ", ".join("--" + n.replace("_", "-") for n in paper_only), len(paper_only) == 1
        raise ValueError(f"{flags}: {'an option' if one else 'options'} of the paper's Dot; add --layout paper, "
                         f"or leave {'it' if one else 'them'} out")
    cfg = args.rollout_cfg or (tuple(args.trajectory_cfg) if dash.is_checkpoint else (1.5, 4.0))
    dot = FeatureDotConfig(k=args.feature_k, forecast=args.forecast, width=args.change_width,
                           trajectory=given.pop("trajectory", True))
    return RolloutConfig(dot=dot, runs=args.rollout_runs, batch=args.rollout_batch, min_steps=args.rollout_steps[0],
                         max_steps=args.rollout_steps[1], cfg_min=cfg[0], cfg_max=cfg[1],
                         samplers=tuple(v.strip() for v in args.rollout_samplers.split(",") if v.strip()), **given)


def paper_settings(args, dash):
    """The paper's Dot and loop; a checkpoint's Dot is trained at the guidance its own trajectories are sampled with."""
    cfg_range = dict(zip(("cfg_min", "cfg_max"), args.trajectory_cfg)) if dash.is_checkpoint else {}
    return config_from_options(options_given(args), **cfg_range)


def runtime_for(args, layout: str) -> runtimes.Runtime:
    if layout == "paper":
        return runtimes.resolve(args.device, args.precision, args.grad_checkpointing, local_rank=distributed.local_rank())
    if args.grad_checkpointing:
        raise ValueError("--grad-checkpointing recomputes the paper's Dot's backbone call; the feature Dot has "
                         "none (add --layout paper, or leave it out)")
    return runtimes.resolve(args.device, args.precision, False, local_rank=distributed.local_rank())


def request_from_args(args) -> TrainRequest:
    """The one typed request the flags ask for; ValueError naming the flag where they ask for something impossible
    (an empty range, an option of the other layout, a device or precision this machine lacks)."""
    dash = dash_source(args)
    settings = (feature_settings if args.layout == "feature" else paper_settings)(args, dash)
    files = run_files(dash, settings.dot.trajectory, args.runs, DOT_DIR, args.name, args.out)
    measure = Measurements(n_batch=args.n_batch or (2 if dash.is_checkpoint else 512),
                           compare_samples=args.compare_samples)
    cfg_given = args.rollout_cfg is not None or tuple(args.trajectory_cfg) != TrajectorySettings().cfg
    return TrainRequest(args.layout, dash, settings, files, runtime_for(args, args.layout), measure, args.resume,
                        cfg_given)


def trainer_for(layout: str):
    """The layout's trainer module (imported on demand: the paper's needs peft, the feature Dot's does not)."""
    if layout == "feature":
        from .trainer import feature_layout as trainer
    else:
        from .trainer import paper_layout as trainer
    return trainer


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        request = request_from_args(args)
        trainer_for(request.layout).train(request)
    except TrainingDiverged as exc:
        return _refuse(exc, 3)
    except (ComfyUINotFound, FileNotFoundError, ValueError) as exc:  # the request cannot be served: nothing written
        return _refuse(exc, 2)
    return 0


def _refuse(exc: Exception, code: int) -> int:
    if distributed.is_main_process():  # under torchrun every rank hits the same error: one line, not one a rank
        print(f"error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
