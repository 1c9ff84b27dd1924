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

    def __init__(self, deep_ch: int, shallow_ch: int, width: int = 32, t_dim: int = 64):
        super().__init__()
        self.t_dim = t_dim
        self.time = nn.Sequential(nn.Linear(2 * t_dim, 4 * width), nn.SiLU(), nn.Linear(4 * width, 2 * width))
        self.inp = nn.Conv2d(deep_ch + 2 * shallow_ch, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(8, width)
        self.out = nn.Conv2d(width, deep_ch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, deep, shallow, anchor_shallow, t, t_s):
        emb = torch.cat([timestep_embedding(t, self.t_dim), timestep_embedding(t_s, self.t_dim)], dim=-1)
        scale, shift = self.time(emb.to(deep.dtype))[:, :, None, None].chunk(2, dim=1)
        h = self.inp(torch.cat([deep, shallow - anchor_shallow, shallow], dim=1))
        h = F.silu(self.norm(h) * (1 + scale) + shift)
        return self.out(F.silu(self.mid(h)))


class LearnedInherit(FeatureInheritFiller):
    """inherit_k with the deep feature moved by :class:`DeepChange` (conditioned on input block k-1's output)."""

    def __init__(self, blocks, change: DeepChange, k: int = 1):
        super().__init__(blocks, k=k)
        self.change = change
        self.name = f"inherit_k{k}+change"

    def capture_modules(self):
        return {**super().capture_modules(), "in0": self.blocks.input_blocks[self.k - 1]}

    gate = True  # scale the change by 1 - sigma_i / sigma_s: none for no jump (where inheriting is exact)

    def forward(self, x, t, deep, anchor_shallow, anchor_t, context, kwargs, sigma=None, anchor_sigma=None):
        b = self.blocks
        state = b.prepare(x, t, context, kwargs)
        hs, h = [], x
        for i in range(self.k):
            h = b.input(i, h, state)
            hs.append(h)
        change = self.change(deep, h, anchor_shallow, t, anchor_t)
        if self.gate:
            ratio = torch.as_tensor(sigma, dtype=deep.dtype).reshape(-1, 1, 1, 1) / anchor_sigma.reshape(-1, 1, 1, 1)
            change = change * (1 - ratio).clamp(0, 1)
        return self._up_to_head(deep + change, hs, state, x)

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        with torch.no_grad():
            return self.forward(x, t, anchor.features["deep"], anchor.features["in0"], anchor.t, context, kwargs,
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
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach() / reuse))
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss / reuse's {sum(losses[-100:]) / 100:.4f}", flush=True)
    return losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-gate", action="store_true", help="the change is not scaled by the jump")
    p.add_argument("--k", type=int, default=1, help="blocks per side rerun at full resolution (inherit_k)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = load_models()
    unet = models.unet.eval().requires_grad_(False)
    blocks = ReferenceBlocks(unet)
    probe = FeatureInheritFiller(blocks, args.k)
    with torch.no_grad(), captured({**probe.capture_modules(), "in0": blocks.input_blocks[args.k - 1]}) as f:
        unet(torch.zeros(1, 1, 32, 32), torch.tensor([500.0]), context=models.conditioner(torch.tensor([0])))
    fill = LearnedInherit(blocks, DeepChange(f["deep"].shape[1], f["in0"].shape[1]), k=args.k)
    fill.gate = not args.no_gate
    start = time.time()
    train(fill, args.steps, args.batch, args.seed)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s; "
          f"{sum(p.numel() for p in fill.change.parameters())} parameters")
    work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), 0, "cpu")
    fills = [EvalFill(f"inherit_k{args.k}", FeatureInheritFiller(blocks, args.k)), EvalFill(fill.name, fill)]
    for f in fills:
        f.n = measure_fill_n(work, f.filler)["N"]
    rows = compare(work, fills, "euler", [6, 12, 20, 40], "D.", 200)
    print("steps  " + "  ".join(f"{f.name} (N {f.n:.2f})" for f in fills))
    for r in rows:
        print(f"{r['steps']:5d}  " + "  ".join(f"{r['fills'][f.name]['gap_closed']:.2f}" for f in fills))


if __name__ == "__main__":
    main()
