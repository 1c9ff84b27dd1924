"""Probe for issue 15 (not a tool of the pack): how much of the reuse-to-Dash gap can a fill built from Dash's
own blocks close at a given N on the reference model? The training-free frontier: feature inheritance with
k = 1..5 blocks per side rerun (k = 6 would rerun all but the middle block), and feature forecasting (forecast_k1,
forecast_k2: the inherited deep feature extrapolated in t from the last two Dash calls; with --second-order,
forecast2_k: along the parabola through the last three, the engine's since session 8). Judged as compare_fills judges fills (euler and
dpmpp_2m, pattern D., 6/12/20/40 steps, 48 samples), N measured by the router in the same run.

    .venv/bin/python scripts/fill_frontier_probe.py --json reports/fill_frontier.json

Figures and plot: reports/2026-12-01-dot-limits.md, reports/fill_frontier.png (scripts/plot_fill_frontier.py).
Moved from reports/ to scripts/ on 2026-12-07.
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
        fills = [EvalFill(f"forecast_k{k}", FeatureInheritFiller(blocks, k, forecast=1)) for k in ks]
        fills += [EvalFill(f"forecast2_k{k}", FeatureInheritFiller(blocks, k, forecast=2)) for k in ks]
    else:
        fills = None
    if fills is None:
        fills = [EvalFill(f"inherit_k{k}", FeatureInheritFiller(blocks, k)) for k in ks]
        fills += [EvalFill(f"forecast_k{k}", FeatureInheritFiller(blocks, k, forecast=1)) for k in ks[:2]]
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
