"""Probe for issue 15 (not a tool of the pack): does a learned change of the forecast deep feature, trained on
where whole sampling runs end, beat the training-free feature forecasting it starts from?

    .venv/bin/python reports/feature_rollout_probe.py --k 1 --steps 500 --seed 0

The two earlier probes each tried half of this: the learned change of the inherited/forecast deep feature
(``feature_dot_probe.py``) trained per tuple or on-policy, which traded cells and did not help; and the rollout
loss (``dot_rollout_probe.py``), which lifted the paper-layout Dot in 14 of 16 cells but from too low a start.
Here the fill is ``forecast_k`` (rerun the outer k blocks per side, the deep feature extrapolated in t from the
last two Dash calls; ``--order 2``: the parabola through three) plus :class:`DeepChange` (zero-initialised: the
untrained fill is the training-free fill exactly, so training can only add), trained with the rollout loss
(each step samples one of ``--runs`` fixed runs through the Morse router on pattern ``D.``, gradient through
every later Dash call and the captured features, loss = squared distance of the run's end to the plain
sampler's end over reuse's). Judged as compare_fills judges fills (euler and dpmpp_2m, pattern D., 6/12/20/40
steps, 48 samples) beside the free fill, N of both measured in the same run. ``--save`` keeps the change's
weights (safetensors); ``--judge-only FILE`` judges a saved change again (``--judge-steps``, ``--samples``).
Figures: 2026-12-05-feature-rollout.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dot_rollout_probe import load_or_make_targets, rollout_train  # noqa: E402
from feature_dot_probe import LearnedInherit, deep_change_for, judge  # noqa: E402

from morse_engine.feature_fills import FeatureInheritFiller  # noqa: E402
from morse_engine.parameterization import DiscreteSchedule  # noqa: E402
from training.compare_fills import default_cfg  # noqa: E402
from training.evaluation.fills import EvalFill  # noqa: E402
from training.evaluation.workload import load_models, reference_workload  # noqa: E402
from training.reference.blocks import ReferenceBlocks  # noqa: E402
from training.reference.unet import sd_alphas_cumprod  # noqa: E402


class GradLearnedInherit(LearnedInherit):
    """The learned fill with the gradient kept (LearnedInherit serves under no_grad)."""

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        if not torch.is_grad_enabled():
            return super().__call__(backbone_call, x, t, anchor, context, kwargs, sigma)
        return self.forward(x, t, self._deep_at(t, anchor), anchor.features["in0"], anchor.t, context, kwargs,
                            sigma, anchor.sigma)


def build_fill(models, blocks, k: int, order: int, width: int, half: bool, trajectory: bool) -> GradLearnedInherit:
    """forecast_k (of ``order``) plus an untrained change network sized from the reference UNet's features."""
    change = deep_change_for(models, blocks, k, width=width, half=half, trajectory=trajectory)
    return GradLearnedInherit(blocks, change, k=k, forecast=order)


def load_fill(path: Path, models, blocks) -> GradLearnedInherit:
    """The fill whose change ``--save`` wrote to ``path`` (its settings are in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    fill = build_fill(models, blocks, int(meta["k"]), int(meta["order"]), int(meta["width"]), meta["full"] != "True",
                      meta.get("no_trajectory", "False") != "True")
    fill.change.load_state_dict(load_file(str(path)))
    fill.gate = meta["no_gate"] != "True"
    return fill


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--k", type=int, default=1, help="blocks per side rerun at full resolution")
    p.add_argument("--order", type=int, default=1, choices=(0, 1, 2), help="feature forecasting order of the base fill")
    p.add_argument("--width", type=int, default=16, help="the change network's width")
    p.add_argument("--full", action="store_true", help="the change network at the deep feature's resolution "
                   "(default: half, a quarter of the cost)")
    p.add_argument("--no-gate", action="store_true", help="the change is not scaled by 1 - sigma_i / sigma_s")
    p.add_argument("--no-trajectory", action="store_true", help="the Table 4 ablation: the change does not see the "
                   "anchor's first-block output or time")
    p.add_argument("--samplers", default="euler,dpmpp_2m")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--targets", type=Path, default=None, help="cache of the targets (made and written if absent)")
    p.add_argument("--save", type=Path, default=None, help="write the change network's weights here (safetensors)")
    p.add_argument("--judge-only", type=Path, default=None, help="no training: judge the change ``--save`` wrote there")
    p.add_argument("--judge-steps", default="6,12,20,40", help="step counts the fills are judged at")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = load_models()
    unet = models.unet.eval().requires_grad_(False)
    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    blocks = ReferenceBlocks(unet)
    if args.judge_only:
        fill = load_fill(args.judge_only, models, blocks)
    else:
        fill = build_fill(models, blocks, args.k, args.order, args.width, not args.full, not args.no_trajectory)
        fill.gate = not args.no_gate
        train_and_save(fill, models, ms, args)
    work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), 0, "cpu")
    free = FeatureInheritFiller(blocks, fill.k, forecast=fill.forecast)
    judge(work, [EvalFill(free.name, free), EvalFill(fill.name, fill)], steps=[int(v) for v in args.judge_steps.split(",")])


def train_and_save(fill: GradLearnedInherit, models, ms, args) -> None:
    start = time.time()
    targets = load_or_make_targets(args.targets, models, ms, args.runs, args.batch, args.seed, args.samplers.split(","))
    rollout_train(fill, list(fill.change.parameters()), models, ms, targets, args.steps, args.seed, args.lr)
    print(f"targets and {args.steps} steps in {time.time() - start:.0f} s; "
          f"{sum(q.numel() for q in fill.change.parameters())} parameters", flush=True)
    if args.save:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in fill.change.state_dict().items()}, str(args.save),
                  metadata={k: str(v) for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
