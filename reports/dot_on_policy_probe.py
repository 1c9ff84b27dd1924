"""Probe for issue 15 (not a tool of the pack): does training the Dot on the states sampling actually visits
(on-policy, DAgger) instead of Algorithm 1's tuples make its fills better at fixed steps?

    .venv/bin/python reports/dot_on_policy_probe.py --steps 1500 --seed 0

Starts from a Dot file (default: the committed reference Dot) or from scratch (``--from-scratch``: the same
config, untrained). Every ``--refresh`` training steps it runs ``--runs`` sampling runs (euler or dpmpp_2m,
pattern D., step counts log-uniform in 4..50, CFG uniform in 1.5..4, random digits) through the router with
the current Dot; each fill call is recorded with Dash's own estimate at that input. The loss is the error of
the guided estimate times the sampler's sigma step (how far the fill moves x off Dash's path), plus the same
per branch, relative to reusing the anchor. Then judged as compare_fills judges fills (euler, pattern D.,
6/12/20/40 steps, 48 samples), N measured in the same run.
Figures: 2026-12-01-dot-on-policy-probe.md.
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

from feature_dot_probe import RecordingFill, judge, optimise  # noqa: E402

from morse_engine import DotFiller, Pattern  # noqa: E402
from morse_engine.dot_model import DotModel  # noqa: E402
from morse_engine.parameterization import DiscreteSchedule, guidance  # noqa: E402
from training.compare_fills import default_cfg  # noqa: E402
from training.evaluation.fills import EvalFill  # noqa: E402
from training.evaluation.samplers import normal_sigmas  # noqa: E402
from training.evaluation.workload import Workload, load_models, reference_workload, sample_routed  # noqa: E402
from training.reference.unet import NULL_CLASS, sd_alphas_cumprod  # noqa: E402

FIELDS = ("x", "t", "anchor_x", "anchor_z", "anchor_t", "anchor_sigma", "prev_z", "prev_t", "sigma", "step", "cfg",
          "context", "target")


class Recorder(RecordingFill):
    """The Dot's inputs at each fill call (the anchor, the estimate before it, the times)."""

    def record(self, x, t, anchor, context, target, sigma, step):
        n = x.shape[0]
        full = lambda v: torch.full((n,), float(v))  # noqa: E731
        prev_z, prev_t = (anchor.z, anchor.t) if anchor.prev_z is None else (anchor.prev_z, anchor.prev_t)
        return dict(x=x, t=t.expand(n).float(), anchor_x=anchor.x, anchor_z=anchor.z,
                    anchor_t=anchor.t.float().expand(n), anchor_sigma=anchor.sigma.float().expand(n),
                    prev_z=prev_z, prev_t=prev_t.float().expand(n), sigma=full(sigma), step=full(step),
                    cfg=full(self.cfg), context=context, target=target)


def collect(rec: Recorder, models, runs: int, batch: int, gen: torch.Generator, samplers=("euler", "dpmpp_2m"),
            steps_range=(4, 50), cfg_range=(1.5, 4.0)) -> dict:
    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    rec.items = []
    for _ in range(runs):
        steps = int(math.exp(torch.empty(()).uniform_(math.log(steps_range[0]), math.log(steps_range[1] + 1), generator=gen)))
        rec.cfg = float(torch.empty(()).uniform_(*cfg_range, generator=gen))
        sampler = samplers[int(torch.randint(0, len(samplers), (), generator=gen))]
        noise = torch.randn((batch, 1, 32, 32), generator=gen)
        labels = torch.randint(0, 10, (batch,), generator=gen)
        with torch.no_grad():
            cond, uncond = models.conditioner(labels), models.conditioner(torch.full((batch,), NULL_CLASS))
        seed = int(torch.randint(0, 10**6, (), generator=gen))
        rec.sigmas = normal_sigmas(ms, steps)
        sample_routed(sampler, Workload(models.unet, ms, noise, cond, uncond, rec.cfg, batch, seed), steps, Pattern("D."), rec)
    # each call is a [cond, uncond] batch: keep the pairs together, [P, 2, ...]
    return {k: torch.cat([torch.stack(it[k].chunk(2), dim=1) for it in rec.items]) for k in FIELDS}


def guided_error(z, d) -> torch.Tensor:
    """Squared error of the guided estimate times the sigma step, plus the same per branch (mean)."""
    w = d["step"].chunk(2)[0].view(-1, 1, 1, 1) ** 2
    g = d["cfg"].chunk(2)[0].view(-1, 1, 1, 1)
    guided = guidance(*z.chunk(2), g) - guidance(*d["target"].chunk(2), g)
    return (w * guided.pow(2)).mean() + ((z - d["target"]).pow(2) * torch.cat([w, w])).mean()


def train(dot: DotModel, models, steps: int, batch: int, seed: int, refresh: int, runs: int, lr: float) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    rec = Recorder(DotFiller(dot, models.unet), models.unet)
    params = list(dot.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses, data = [], None
    for step in range(steps):
        if step % refresh == 0:
            t0 = time.time()
            dot.eval()
            data = collect(rec, models, runs, batch, gen)
            dot.train()
            print(f"step {step}: collected {data['x'].shape[0]} pairs in {time.time() - t0:.0f} s", flush=True)
        idx = torch.randint(0, data["x"].shape[0], (batch,), generator=gen)
        d = {k: torch.cat(v[idx].unbind(1)) for k, v in data.items()}  # [cond rows, uncond rows]
        pred = dot(models.unet, d["x"], d["t"], d["anchor_x"], d["anchor_z"], d["anchor_t"], context=d["context"],
                   sigma=d["sigma"], anchor_sigma=d["anchor_sigma"], prev_z=d["prev_z"], prev_t=d["prev_t"])
        loss, reuse = guided_error(pred, d), guided_error(d["anchor_z"], d)
        optimise(opt, sched, loss / reuse.detach(), loss / reuse, losses, step)
    dot.eval()
    return losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--refresh", type=int, default=300)
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dot", type=Path, default=None, help="Dot file to start from (default: the committed one)")
    p.add_argument("--from-scratch", action="store_true", help="the same config, untrained (eta = 0)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = load_models(dot_path=args.dot)
    models.unet.eval().requires_grad_(False)
    base = models.dot
    dot = DotModel.build(models.unet, models.dot_info.config) if args.from_scratch else load_models(dot_path=args.dot).dot
    start = time.time()
    train(dot, models, args.steps, args.batch, args.seed, args.refresh, args.runs, args.lr)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s")
    work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), 0, "cpu")
    fills = [EvalFill("dot (file)", DotFiller(base, models.unet)), EvalFill("dot on-policy", DotFiller(dot, models.unet))]
    judge(work, fills)


if __name__ == "__main__":
    main()
