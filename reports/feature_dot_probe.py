"""Probe for issue 15 (not a tool of the pack): does a learned change of the inherited deep feature beat the
training-free fills at fixed steps on the reference model?

    .venv/bin/python reports/feature_dot_probe.py --steps 1500 --seed 0

The fill is feature inheritance with k = 1 (rerun the first input block and the last output block on the
current input, inherit the deep feature entering that output block from the anchor's Dash call), plus a
small network that predicts the change of that deep feature from the anchor's deep feature, the change of
the first block's output since the anchor, and both times. Its last convolution starts at zero, so the
untrained fill is ``inherit_k1`` exactly; by default the change is scaled by 1 - sigma_i / sigma_s, so it
vanishes with the jump (``--no-gate``: unscaled). It is trained on the Dot's own tuples (Algorithm 1, the default
TupleRecipe) with the output-level loss weighted by the sigma step, and judged as compare_fills judges
fills (euler, pattern D., 6/12/20/40 steps, share of the reuse-to-Dash gap closed) with N measured by the
router in the same run. Prints the table; writes nothing. Figures: 2026-12-01-feature-dot-probe.md.

``--on-policy`` trains instead on the fill calls of real sampling runs with the current fill (euler or
dpmpp_2m, pattern D., 4-50 steps, CFG 1.5-4; collected anew every ``--refresh`` steps, DAgger), with the
loss on the guided estimate times the sampler's own sigma step. ``--forecast`` builds on feature forecasting
(the engine's ``forecast_k``: the inherited deep feature extrapolated from the last two Dash calls), so the
untrained fill is ``forecast_k`` exactly. ``--half`` runs the change network at half resolution.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from morse_engine.feature_fills import FeatureInheritFiller, captured  # noqa: E402
from morse_engine.training_tuples import TupleRecipe, make_training_tuple  # noqa: E402
from training.compare_fills import compare, default_cfg  # noqa: E402
from training.evaluation.fills import EvalFill, measure_fill_n  # noqa: E402
from training.evaluation.workload import load_models, reference_workload  # noqa: E402
from training.reference.blocks import ReferenceBlocks  # noqa: E402
from training.reference.unet import timestep_embedding  # noqa: E402
from training.trainer.dash_setup import reference_setup  # noqa: E402


class DeepChange(nn.Module):
    """The change of the inherited deep feature: from it, the first block's change since the anchor, both times."""

    def __init__(self, deep_ch: int, shallow_ch: int, width: int = 32, t_dim: int = 64, half: bool = False,
                 trajectory: bool = True):
        super().__init__()
        # trajectory=False is the Table 4 ablation: the change sees neither the anchor's first-block output nor its
        # time, only the (forecast) deep feature, the current first-block output and the current time
        self.t_dim, self.half, self.trajectory = t_dim, half, trajectory
        n_times, n_shallow = (2, 2) if trajectory else (1, 1)
        self.time = nn.Sequential(nn.Linear(n_times * t_dim, 4 * width), nn.SiLU(), nn.Linear(4 * width, 2 * width))
        self.inp = nn.Conv2d(deep_ch + n_shallow * shallow_ch, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(8, width)
        self.out = nn.Conv2d(width, deep_ch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, deep, shallow, anchor_shallow, t, t_s):
        if self.trajectory:
            emb = torch.cat([timestep_embedding(t, self.t_dim), timestep_embedding(t_s, self.t_dim)], dim=-1)
            h = torch.cat([deep, shallow - anchor_shallow, shallow], dim=1)
        else:
            emb, h = timestep_embedding(t, self.t_dim), torch.cat([deep, shallow], dim=1)
        scale, shift = self.time(emb.to(deep.dtype))[:, :, None, None].chunk(2, dim=1)
        if self.half:  # a quarter of the convolutions' cost: the change at half resolution, upsampled
            h = F.avg_pool2d(h, 2)
        h = F.silu(self.norm(self.inp(h)) * (1 + scale) + shift)
        out = self.out(F.silu(self.mid(h)))
        return F.interpolate(out, size=deep.shape[-2:], mode="bilinear", align_corners=False) if self.half else out


def deep_change_for(models, blocks, k: int, **kw) -> DeepChange:
    """An untrained :class:`DeepChange` sized from the reference UNet's features at k blocks per side (one probe call)."""
    probe = FeatureInheritFiller(blocks, k)
    with torch.no_grad(), captured({**probe.capture_modules(), "in0": blocks.input_blocks[k - 1]}) as f:
        blocks.unet(torch.zeros(1, 1, 32, 32), torch.tensor([500.0]), context=models.conditioner(torch.tensor([0])))
    return DeepChange(f["deep"].shape[1], f["in0"].shape[1], **kw)


class LearnedInherit(FeatureInheritFiller):
    """inherit_k with the deep feature moved by :class:`DeepChange` (conditioned on input block k-1's output)."""

    def __init__(self, blocks, change: DeepChange, k: int = 1, forecast: bool = False):
        super().__init__(blocks, k=k, forecast=forecast)
        self.change = change
        self.name = f"{self.name}+change"

    def capture_modules(self):
        return {**super().capture_modules(), "in0": self.blocks.input_blocks[self.k - 1]}

    gate = True  # scale the change by 1 - sigma_i / sigma_s: none for no jump (where inheriting is exact)
    gate_span = None  # instead: scale by the jump in timesteps over this many, capped at 1 (off for short jumps)

    def forward(self, x, t, deep, anchor_shallow, anchor_t, context, kwargs, sigma=None, anchor_sigma=None):
        b = self.blocks
        state = b.prepare(x, t, context, kwargs)
        hs, h = [], x
        for i in range(self.k):
            h = b.input(i, h, state)
            hs.append(h)
        change = self.change(deep, h, anchor_shallow, t, anchor_t)
        if self.gate_span:
            jump = (anchor_t.reshape(-1, 1, 1, 1) - t.reshape(-1, 1, 1, 1)).to(deep.dtype)
            change = change * (jump / self.gate_span).clamp(0, 1)
        elif self.gate:
            ratio = torch.as_tensor(sigma, dtype=deep.dtype).reshape(-1, 1, 1, 1) / anchor_sigma.reshape(-1, 1, 1, 1)
            change = change * (1 - ratio).clamp(0, 1)
        return self._up_to_head(deep + change, hs, state, x)

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        with torch.no_grad():
            return self.forward(x, t, self._deep_at(t, anchor), anchor.features["in0"], anchor.t, context, kwargs,
                                sigma, anchor.sigma)


def train(fill: LearnedInherit, steps: int, batch: int, seed: int, lr: float = 1e-3) -> list[float]:
    setup = reference_setup()
    unet = fill.blocks.unet
    gen = torch.Generator().manual_seed(seed)
    data = setup.batches(batch, gen)
    opt = torch.optim.AdamW(fill.change.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for step in range(steps):
        x0, cond = next(data)
        with torch.no_grad():
            tup = make_training_tuple(setup, x0, cond, TupleRecipe(), with_previous=False, gen=gen)
            with captured(fill.capture_modules()) as feats:
                unet(tup.anchor_x, tup.anchor_t, context=tup.context)
            feats = {k: v.detach() for k, v in feats.items()}
        pred = fill.forward(tup.x, tup.t, feats["deep"], feats["in0"], tup.anchor_t, tup.context, {}, tup.sigma, tup.anchor_sigma)
        w = tup.sigma_step.view(-1, 1, 1, 1) ** 2
        loss = (w * (pred - tup.target) ** 2).mean() / w.mean()
        reuse = (w * (tup.anchor_z - tup.target) ** 2).mean() / w.mean()
        optimise(opt, sched, loss, loss / reuse, losses, step)
    return losses


def optimise(opt, sched, objective, ratio, losses: list, step: int) -> None:
    """One optimizer step on ``objective``; logs ``ratio`` (the loss over reuse's), averaged every 100 steps."""
    opt.zero_grad()
    objective.backward()
    opt.step()
    sched.step()
    losses.append(float(ratio.detach()))
    if (step + 1) % 100 == 0:
        print(f"step {step + 1}: loss / reuse's {sum(losses[-100:]) / 100:.4f}", flush=True)


def judge(work, fills: list, samplers=("euler", "dpmpp_2m"), steps=(6, 12, 20, 40)) -> None:
    """Measure each fill's N, then print the share of the reuse-to-Dash gap each closes, as compare_fills does."""
    for f in fills:
        f.n = measure_fill_n(work, f.filler)["N"]
    for sampler in samplers:
        rows = compare(work, fills, sampler, list(steps), "D.", 200)
        print(f"{sampler}: steps  " + "  ".join(f"{f.name} (N {f.n:.2f})" for f in fills))
        for r in rows:
            print(f"{r['steps']:5d}  " + "  ".join(f"{r['fills'][f.name]['gap_closed']:.2f}" for f in fills), flush=True)


class RecordingFill:
    """Serves a fill on-policy inside real sampling runs and keeps, for each fill call, what :meth:`record`
    takes from it with Dash's own estimate there: training data from the states the fill itself leads the
    sampler to (DAgger), with the jumps of the step counts actually sampled."""

    name, free = "recorder", False

    def __init__(self, fill, unet):
        self.fill, self.unet, self.items = fill, unet, []
        self.sigmas, self.cfg = None, None
        self.earlier_feature_calls = getattr(fill, "earlier_feature_calls", 0)

    def capture_modules(self):
        return self.fill.capture_modules()

    def accepts(self, kwargs):
        return True

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        with torch.no_grad():
            target = self.unet(x, t, context=context)
            out = self.fill(backbone_call, x, t, anchor, context, kwargs, sigma=sigma)
        i = int((self.sigmas - sigma).abs().argmin())
        self.items.append(self.record(x, t, anchor, context, target, sigma, float(self.sigmas[i] - self.sigmas[i + 1])))
        return out

    def record(self, x, t, anchor, context, target, sigma, step) -> dict:
        raise NotImplementedError


class Recorder(RecordingFill):
    """The learned change's inputs: the (forecast) deep feature, the anchor's first-block output, the times."""

    def record(self, x, t, anchor, context, target, sigma, step):
        n = x.shape[0]
        return dict(x=x, t=t.expand(n).float(), deep=self.fill._deep_at(t, anchor), in0=anchor.features["in0"],
                    anchor_t=anchor.t.float(), anchor_sigma=anchor.sigma.float(),
                    sigma=torch.full((n,), float(sigma)), step=torch.full((n,), step),
                    cfg=torch.full((n,), self.cfg), context=context, target=target, anchor_z=anchor.z)


def collect(rec: Recorder, models, runs: int, batch: int, gen: torch.Generator, cfg_range, step_range):
    """``runs`` sampling runs (euler or dpmpp_2m, pattern D., step counts drawn log-uniformly from
    ``step_range``, CFG uniformly from ``cfg_range``, random digits) with the current fill; their fill calls
    become pairs of [cond, uncond] rows."""
    from morse_engine import Pattern
    from training.evaluation.samplers import normal_sigmas
    from training.evaluation.workload import Workload, sample_routed
    from training.reference.unet import NULL_CLASS, sd_alphas_cumprod
    from morse_engine.parameterization import DiscreteSchedule

    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    rec.items = []
    for _ in range(runs):
        lo, hi = math.log(step_range[0]), math.log(step_range[1] + 1)
        steps = int(math.exp(torch.empty(()).uniform_(lo, hi, generator=gen)))
        rec.cfg = float(torch.empty(()).uniform_(*cfg_range, generator=gen))
        sampler = "euler" if torch.rand((), generator=gen) < 0.5 else "dpmpp_2m"
        noise = torch.randn((batch, 1, 32, 32), generator=gen)
        labels = torch.randint(0, 10, (batch,), generator=gen)
        with torch.no_grad():
            cond, uncond = models.conditioner(labels), models.conditioner(torch.full((batch,), NULL_CLASS))
        work = Workload(models.unet, ms, noise, cond, uncond, rec.cfg, batch, int(torch.randint(0, 10**6, (), generator=gen)))
        rec.sigmas = normal_sigmas(ms, steps)
        sample_routed(sampler, work, steps, Pattern("D."), rec)
    pairs = {}
    for key in rec.items[0]:
        pairs[key] = torch.cat([torch.stack(it[key].chunk(2), dim=1) for it in rec.items])  # [P, 2, ...]
    return pairs


def train_on_policy(fill: LearnedInherit, models, steps: int, batch: int, seed: int, refresh: int, runs: int,
                    lr: float = 1e-3, cfg_range=(1.5, 4.0), step_range=(4, 50)) -> list[float]:
    """Train on the fill calls of sampling runs with the current fill, collected anew every ``refresh`` steps;
    the loss is the error of the guided estimate times the sampler's sigma step (what the fill moves x by),
    plus the same per branch, relative to reusing the anchor."""
    from morse_engine.parameterization import guidance

    gen = torch.Generator().manual_seed(seed)
    rec = Recorder(fill, models.unet)
    opt = torch.optim.AdamW(fill.change.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses, data = [], None
    for step in range(steps):
        if step % refresh == 0:
            t0 = time.time()
            data = collect(rec, models, runs, batch, gen, cfg_range, step_range)
            print(f"step {step}: collected {data['x'].shape[0]} pairs in {time.time() - t0:.0f} s", flush=True)
        idx = torch.randint(0, data["x"].shape[0], (batch,), generator=gen)
        d = {k: torch.cat(v[idx].unbind(1)) for k, v in data.items()}  # [cond rows, uncond rows]
        pred = fill.forward(d["x"], d["t"], d["deep"], d["in0"], d["anchor_t"], d["context"], {}, d["sigma"], d["anchor_sigma"])
        w = d["step"].chunk(2)[0].view(-1, 1, 1, 1) ** 2
        g = d["cfg"].chunk(2)[0].view(-1, 1, 1, 1)

        def err(z):
            guided = guidance(*z.chunk(2), g) - guidance(*d["target"].chunk(2), g)
            branches = (z - d["target"]).pow(2) * torch.cat([w, w])
            return (w * guided.pow(2)).mean() + branches.mean()

        loss, reuse = err(pred), err(d["anchor_z"])
        optimise(opt, sched, loss / reuse.detach(), loss / reuse, losses, step)
    return losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-gate", action="store_true", help="the change is not scaled by the jump")
    p.add_argument("--gate-span", type=float, default=None, help="scale the change by the jump in timesteps over "
                   "this many (capped at 1) instead of by 1 - sigma_i / sigma_s")
    p.add_argument("--k", type=int, default=1, help="blocks per side rerun at full resolution (inherit_k)")
    p.add_argument("--on-policy", action="store_true", help="train on the fill calls of sampling runs with the "
                   "current fill (DAgger), not on Algorithm 1's tuples")
    p.add_argument("--refresh", type=int, default=200, help="on-policy: training steps between collections")
    p.add_argument("--runs", type=int, default=24, help="on-policy: sampling runs per collection")
    p.add_argument("--width", type=int, default=32, help="the change network's width")
    p.add_argument("--half", action="store_true", help="the change network runs at half the deep feature's resolution")
    p.add_argument("--forecast", action="store_true", help="the inherited deep feature is first extrapolated from "
                   "the last two Dash calls (forecast_k); the change learns what that misses")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = load_models()
    unet = models.unet.eval().requires_grad_(False)
    blocks = ReferenceBlocks(unet)
    fill = LearnedInherit(blocks, deep_change_for(models, blocks, args.k, width=args.width, half=args.half), k=args.k,
                          forecast=args.forecast)
    fill.gate = not args.no_gate
    fill.gate_span = args.gate_span
    start = time.time()
    if args.on_policy:
        train_on_policy(fill, models, args.steps, args.batch, args.seed, args.refresh, args.runs)
    else:
        train(fill, args.steps, args.batch, args.seed)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s; "
          f"{sum(p.numel() for p in fill.change.parameters())} parameters")
    work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), 0, "cpu")
    free = FeatureInheritFiller(blocks, args.k, forecast=args.forecast)
    fills = [EvalFill(free.name, free), EvalFill(fill.name, fill)]
    judge(work, fills)


if __name__ == "__main__":
    main()
