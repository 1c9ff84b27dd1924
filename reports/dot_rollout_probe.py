"""Probe for issue 15 (not a tool of the pack): does training the Dot on whole sampling runs, with the loss on
where the run ends, make its fills better than training on single tuples?

    .venv/bin/python reports/dot_rollout_probe.py --steps 800 --seed 0

The issue's suggestion: a per-tuple loss does not see how fill errors compound under the sampler's update.
Here every optimizer step samples one run (euler or dpmpp_2m, pattern D., step count log-uniform in 4..50,
CFG uniform in 1.5..4, random digits, ``--batch`` samples) through the Morse router with the Dot, with the
gradient flowing through every later Dash call (the UNet frozen) back to each fill, and the loss is the squared
distance of the run's end to the same run with Dash at every step, over the same for reusing the anchor (so
every step count weighs alike). The targets (plain and reuse runs) are computed once for ``--runs`` runs.
The router detaches its anchors, so a fill's gradient reaches earlier fills through x only.
Starts from a Dot file (default: the committed reference Dot) or from scratch; judged as compare_fills judges
fills (euler and dpmpp_2m, pattern D., 6/12/20/40 steps, 48 samples), N measured in the same run.
Figures: 2026-12-02-rollout.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_dot_probe import judge  # noqa: E402

from morse_engine import DotFiller, MorseRouter, Pattern  # noqa: E402
from morse_engine.adapter_file import save_dot  # noqa: E402
from morse_engine.dot_model import DotModel  # noqa: E402
from morse_engine.fillers import ReuseFiller  # noqa: E402
from morse_engine.parameterization import DiscreteSchedule  # noqa: E402
from training.compare_fills import default_cfg  # noqa: E402
from training.evaluation.fills import EvalFill  # noqa: E402
from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample  # noqa: E402
from training.evaluation.workload import load_models, reference_workload  # noqa: E402
from training.reference.unet import NULL_CLASS, sd_alphas_cumprod  # noqa: E402


class GradDotFiller(DotFiller):
    """The Dot fill with the gradient kept (DotFiller serves under no_grad)."""

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        return self.dot(self.backbone, x, t, anchor.x, anchor.z, anchor.t, context=context, backbone_call=backbone_call,
                        sigma=sigma, anchor_sigma=anchor.sigma, prev_z=anchor.prev_z, prev_t=anchor.prev_t, **kwargs)


def run(unet, ms, sampler, noise, cond, uncond, cfg, steps, filler=None):
    """One batch sampled with ``filler`` on pattern D. (plain sampling where it is None). Not the evaluation's
    sample_routed: that one runs under no_grad over a Workload's chunks, and training needs the gradient."""
    sigmas = normal_sigmas(ms, steps)
    if filler is None:
        return sample(sampler, GuidedDenoiser(unet, ms, cond, uncond, cfg), noise, sigmas, ms)
    router = MorseRouter(Pattern("D."), filler, measure=False, timestep_of=ms.timestep)
    with router.run(sigmas) as r:
        return sample(sampler, GuidedDenoiser(unet, ms, cond, uncond, cfg, run=r), noise, sigmas, ms)


def make_targets(models, ms, runs: int, batch: int, gen: torch.Generator, samplers, steps_range=(4, 50),
                 cfg_range=(1.5, 4.0)) -> list[dict]:
    out = []
    t0 = time.time()
    for i in range(runs):
        steps = int(math.exp(torch.empty(()).uniform_(math.log(steps_range[0]), math.log(steps_range[1] + 1), generator=gen)))
        cfg = float(torch.empty(()).uniform_(*cfg_range, generator=gen))
        sampler = samplers[int(torch.randint(0, len(samplers), (), generator=gen))]
        noise = torch.randn((batch, 1, 32, 32), generator=gen)
        labels = torch.randint(0, 10, (batch,), generator=gen)
        with torch.no_grad():
            cond, uncond = models.conditioner(labels), models.conditioner(torch.full((batch,), NULL_CLASS))
            args = (models.unet, ms, sampler, noise, cond, uncond, cfg, steps)
            plain, reuse = run(*args), run(*args, filler=ReuseFiller())
        out.append(dict(sampler=sampler, steps=steps, cfg=cfg, noise=noise, cond=cond, uncond=uncond, plain=plain,
                        reuse_err=float((reuse - plain).pow(2).mean())))
        if (i + 1) % 50 == 0:
            print(f"targets: {i + 1}/{runs} runs in {time.time() - t0:.0f} s", flush=True)
    return out


def load_or_make_targets(path, models, ms, runs: int, batch: int, seed: int, samplers) -> list[dict]:
    """The targets cached at ``path`` (a seed's runs, reused across probes), else made (and cached where a path is given)."""
    if path and path.exists():
        return torch.load(path)
    targets = make_targets(models, ms, runs, batch, torch.Generator().manual_seed(seed), samplers)
    if path:
        torch.save(targets, path)
    return targets


def rollout_train(filler, params: list, models, ms, targets: list[dict], steps: int, seed: int, lr: float) -> None:
    """Optimise ``params`` on where the target runs end when ``filler`` serves their fill steps (one run a step)."""
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    ratios, t0 = [], time.time()
    for step in range(steps):
        d = targets[int(torch.randint(0, len(targets), (), generator=gen))]
        x = run(models.unet, ms, d["sampler"], d["noise"], d["cond"], d["uncond"], d["cfg"], d["steps"], filler)
        ratio = (x - d["plain"]).pow(2).mean() / max(d["reuse_err"], 1e-12)
        opt.zero_grad()
        if ratio.requires_grad:  # a run with no fill call (too few steps) has nothing to learn from
            ratio.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        sched.step()
        ratios.append(float(ratio.detach()))
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: end error / reuse's {sum(ratios[-50:]) / 50:.4f} ({time.time() - t0:.0f} s)", flush=True)


def train(dot: DotModel, models, ms, targets: list[dict], steps: int, seed: int, lr: float) -> None:
    params = list(dot.parameters())
    for q in params:
        q.requires_grad_(True)
    dot.train()
    rollout_train(GradDotFiller(dot, models.unet), params, models, ms, targets, steps, seed, lr)
    dot.eval()
    for q in params:
        q.requires_grad_(False)


def save_rollout_dot(path: Path, dot: DotModel, start_info, n: float, settings: dict) -> None:
    """The fine-tuned Dot as a Dot file the tools load (``--dot``), its start file's training record kept."""
    training = dict(start_info.training, rollout_probe={k: str(v) for k, v in settings.items()})
    save_dot(path, dot, base_family=start_info.base_family, fingerprint=start_info.fingerprint, measured_n=n,
             training=training)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--samplers", default="euler,dpmpp_2m")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dot", type=Path, default=None, help="Dot file to start from (default: the committed one)")
    p.add_argument("--from-scratch", action="store_true", help="the same config, untrained (equals its base fill)")
    p.add_argument("--save", type=Path, default=None, help="write the trained Dot here (a .safetensors Dot file)")
    p.add_argument("--targets", type=Path, default=None, help="cache of the targets (made and written if absent)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = load_models(dot_path=args.dot)
    models.unet.eval().requires_grad_(False)
    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    base = models.dot
    dot = DotModel.build(models.unet, models.dot_info.config) if args.from_scratch else load_models(dot_path=args.dot).dot
    start = time.time()
    targets = load_or_make_targets(args.targets, models, ms, args.runs, args.batch, args.seed, args.samplers.split(","))
    train(dot, models, ms, targets, args.steps, args.seed, args.lr)
    print(f"targets and {args.steps} steps in {time.time() - start:.0f} s", flush=True)
    work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), 0, "cpu")
    fills = [EvalFill("dot (file)", DotFiller(base, models.unet)), EvalFill("dot rollout", DotFiller(dot, models.unet))]
    judge(work, fills)
    if args.save:
        save_rollout_dot(args.save, dot, models.dot_info, fills[1].n, vars(args))


if __name__ == "__main__":
    main()
