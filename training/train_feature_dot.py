"""``python -m training.train_dot --layout feature`` (the default): a feature Dot, trained on whole sampling runs.

The Dot and its loss are in ``morse_engine.feature_dot`` and ``training.trainer.rollout``; this is the command
line's part: its flags, the run's name and files, N measured on the trained fill, the Dot file written.
"""
from __future__ import annotations

import sys


from morse_engine import FeatureDotConfig, FeatureDotFiller, save_dot

from .dot_record import run_files, training_record
from .host import comfy_setup as comfy_cli
from .host.comfyui import ComfyUINotFound
from .host.unet_blocks import blocks_of
from .paths import DOT_DIR
from .trainer import distributed
from .trainer import runtime as runtimes
from .trainer.dash_setup import reference_setup
from .trainer.loop import TrainingDiverged
from .trainer.rollout import RolloutConfig, rollout_n, train_feature_dot

# train_dot flags the feature Dot shares with the paper's (the loop's and the ablation's); every other option of
# the paper's Dot or its tuples is refused with --layout feature rather than silently ignored
SHARED = {"steps", "lr", "warmup", "seed", "checkpoint_every", "trajectory"}


def _pair(kind):
    def parse(text):
        lo, hi = (kind(v) for v in text.split(","))
        return lo, hi

    parse.__name__ = f"MIN,MAX {kind.__name__}"
    return parse


def add_feature_arguments(p) -> None:
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
    g.add_argument("--rollout-steps", type=_pair(int), default=(d.min_steps, d.max_steps),
                   help="MIN,MAX sampling steps of a run (drawn log-uniformly)")
    g.add_argument("--rollout-cfg", type=_pair(float), default=None,
                   help=f"MIN,MAX CFG of a run (default: {d.cfg_min:g},{d.cfg_max:g}; a checkpoint's: --trajectory-cfg)")
    g.add_argument("--rollout-samplers", default=",".join(d.samplers), help="comma-separated: euler, dpmpp_2m")


def config_from_args(args, on_checkpoint: bool) -> RolloutConfig:
    from .trainer.config import _cli_fields

    paper_only = sorted(f.name for f, _ in _cli_fields() if hasattr(args, f.name) and f.name not in SHARED)
    if paper_only:
        flags = ", ".join("--" + n.replace("_", "-") for n in paper_only)
        raise ValueError(f"{flags}: {'an option' if len(paper_only) == 1 else 'options'} of the paper's Dot; add --layout paper, or leave {'it' if len(paper_only) == 1 else 'them'} out")
    shared = {n: getattr(args, n) for n in SHARED - {"trajectory"} if hasattr(args, n)}
    cfg = args.rollout_cfg or (tuple(args.trajectory_cfg) if on_checkpoint else (1.5, 4.0))
    dot = FeatureDotConfig(k=args.feature_k, forecast=args.forecast, width=args.change_width,
                           trajectory=getattr(args, "trajectory", True))
    return RolloutConfig(dot=dot, runs=args.rollout_runs, batch=args.rollout_batch, min_steps=args.rollout_steps[0],
                         max_steps=args.rollout_steps[1], cfg_min=cfg[0], cfg_max=cfg[1],
                         samplers=tuple(v.strip() for v in args.rollout_samplers.split(",") if v.strip()), **shared)


def main(args, on_checkpoint: bool) -> int:
    try:
        config = config_from_args(args, on_checkpoint)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if distributed.world_size() > 1:
        print("error: the feature Dot trains in one process (one run a step); start it without torchrun", file=sys.stderr)
        return 2
    try:
        _, out, state_path = run_files(args, on_checkpoint, config.dot.trajectory, DOT_DIR)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.grad_checkpointing:
            raise ValueError("--grad-checkpointing recomputes the paper's Dot's backbone call; the feature Dot has "
                             "none (add --layout paper, or leave it out)")
        rt = runtimes.resolve(args.device, args.precision, False)
        setup = (comfy_cli.setup_from_args(args, state_path.parent, device=str(rt.device)) if on_checkpoint
                 else reference_setup(args.checkpoint, rt.device))
    except (ComfyUINotFound, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    blocks = blocks_of(setup.unet, on_checkpoint)
    print(f"Training a feature Dot for {setup.base_family} ({sum(p.numel() for p in setup.unet.parameters()) / 1e6:.2f}M "
          f"params): {config.runs} runs of {config.batch} samples ({config.min_steps}-{config.max_steps} steps), "
          f"{config.steps} steps on {rt.describe()}; checkpoints in {state_path}")
    try:
        result = train_feature_dot(setup, blocks, config, state_path, resume=args.resume, runtime=rt)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as exc:  # --resume without a checkpoint, or with other settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    samples = max(1, (args.n_batch or (2 if on_checkpoint else 512)) // 2)
    with rt.autocast():
        speed = rollout_n(setup, FeatureDotFiller(blocks, result.dot), samples, rt.device)
    dash_params = sum(p.numel() for p in setup.unet.parameters())
    dot_params = sum(p.numel() for p in result.dot.parameters())
    fixed = result.summary["fixed_history"]
    training = training_record(args, result, config.flat(), dot_params, dash_params, speed, rt, layout="feature",
                               loss="squared distance of a run's end to Dash's at every step, over reuse's (pattern D.)")
    save_dot(out, result.dot, base_family=setup.base_family, fingerprint=setup.fingerprint, measured_n=speed["N"],
             training=training)
    print(f"Wrote {out}\n"
          f"  held-out runs' end error {fixed[-1][1]:.3f} of reusing the anchor's (untrained, = forecast_k"
          f"{config.dot.k}: {fixed[0][1]:.3f}); training runs, last fifth: {result.final_loss:.3f}\n"
          f"  Dot adds {dot_params / 1e6:.4f}M params to Dash's {dash_params / 1e6:.3f}M ({dot_params / dash_params:.2%})\n"
          f"  N = {speed['N']:.2f} (Dash {speed['dash_ms']:.1f} ms, fill {speed['fill_ms']:.1f} ms a call, batch "
          f"{speed['batch']})\n  trained in {result.seconds / 60:.1f} min")
    return 0
