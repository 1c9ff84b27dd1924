"""Probe for issue 15 (not a tool of the pack): how much of the reuse-to-Dash gap can a fill built from Dash's
own blocks close at a given N on the reference model? The training-free frontier: feature inheritance with
k = 1..5 blocks per side rerun (k = 6 would rerun all but the middle block), and feature forecasting (forecast_k1,
forecast_k2: the inherited deep feature extrapolated in t from the last two Dash calls). Judged as compare_fills judges fills (euler and
dpmpp_2m, pattern D., 6/12/20/40 steps, 48 samples), N measured by the router in the same run.

    .venv/bin/python reports/fill_frontier_probe.py --json reports/fill_frontier.json

Figures and plot: 2026-12-01-dot-limits.md, fill_frontier.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from morse_engine.feature_fills import FeatureInheritFiller  # noqa: E402
from training.compare_fills import compare, default_cfg  # noqa: E402
from training.evaluation.fills import EvalFill, measure_fill_n  # noqa: E402
from training.evaluation.workload import load_models, reference_workload  # noqa: E402
from training.reference.blocks import ReferenceBlocks  # noqa: E402


class SecondOrderForecast(FeatureInheritFiller):
    """Forecasting through the last three Dash calls' deep features (the parabola in t through them,
    TaylorSeer's second order); the history is kept here, for one batch layout per run (a probe, not the
    engine's way: the router keeps only the previous call's features). Fewer than three calls: first order."""

    def __init__(self, blocks, k):
        super().__init__(blocks, k, forecast=True)
        self.name = f"forecast2_k{k}"
        self.history = []  # [(step, t, deep)], oldest first

    def _deep_at(self, t, anchor):
        deep = anchor.features["deep"]
        if not self.history or anchor.step != self.history[-1][0]:
            if self.history and (anchor.step < self.history[-1][0] or self.history[-1][2].shape != deep.shape):
                self.history = []  # a new run
            self.history = (self.history + [(anchor.step, anchor.t.float(), deep)])[-3:]
        if len(self.history) < 3:
            return super()._deep_at(t, anchor)
        (_, t0, f0), (_, t1, f1), (_, t2, f2) = self.history
        view = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
        t0, t1, t2, tt = view(t0), view(t1), view(t2), view(t.float())
        l0 = (tt - t1) * (tt - t2) / ((t0 - t1) * (t0 - t2))
        l1 = (tt - t0) * (tt - t2) / ((t1 - t0) * (t1 - t2))
        l2 = (tt - t0) * (tt - t1) / ((t2 - t0) * (t2 - t1))
        return l0 * f0 + l1 * f1 + l2 * f2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ks", default="1,2,3,4,5")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--second-order", action="store_true", help="forecast_k against the second-order forecast "
                   "through the last three Dash calls, for --ks")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = load_models()
    blocks = ReferenceBlocks(models.unet)
    work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), 0, "cpu")
    ks = [int(k) for k in args.ks.split(",")]
    if args.second_order:
        fills = [EvalFill(f"forecast_k{k}", FeatureInheritFiller(blocks, k, forecast=True)) for k in ks]
        fills += [EvalFill(f"forecast2_k{k}", SecondOrderForecast(blocks, k)) for k in ks]
    else:
        fills = None
    if fills is None:
        fills = [EvalFill(f"inherit_k{k}", FeatureInheritFiller(blocks, k)) for k in ks]
        fills += [EvalFill(f"forecast_k{k}", FeatureInheritFiller(blocks, k, forecast=True)) for k in ks[:2]]
    for f in fills:
        f.n = measure_fill_n(work, f.filler)["N"]
    out = {"samples": args.samples, "n": {f.name: f.n for f in fills}, "samplers": {}}
    for sampler in ("euler", "dpmpp_2m"):
        rows = compare(work, fills, sampler, [6, 12, 20, 40], "D.", 200)
        out["samplers"][sampler] = rows
        print(f"{sampler}: steps  " + "  ".join(f"{f.name} (N {f.n:.2f})" for f in fills), flush=True)
        for r in rows:
            print(f"{r['steps']:5d}  " + "  ".join(f"{r['fills'][f.name]['gap_closed']:.2f}" for f in fills), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
