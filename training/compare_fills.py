"""Fills against reused estimates on the same schedule: how much of Dash's quality each fill recovers.

``python -m training.evaluate`` compares at equal cost, where the training-free fills are free
and so buy more Dash steps than the Dot's. This tool holds the step count fixed instead: for
each step count it samples with every step on Dash, with the pattern's non-Dash steps reusing
the anchor estimate, and with them served by each fill (the Dot by default; ``--fills`` adds the
training-free ones), all from the same noise, and prints each run's RMSE to a many-step reference
and the share of the reuse-to-Dash gap each fill closes (1 = as good as Dash, 0 = no better than
reusing, < 0 = worse), with the N of each fill that calls a network.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from morse_engine import MorseError, Pattern, ReuseFiller

from .evaluation.fills import collect_fills, measure_fill_n
from .evaluation.samplers import DETERMINISTIC
from .evaluation.workload import DEFAULT_DOT, Workload, default_cfg, load_models, reference_workload, run_plain, sample_routed


def gap_closed(dash: float, reuse: float, dot: float) -> float:
    """Share of the reuse-to-Dash error gap the Dot closes."""
    return (reuse - dot) / (reuse - dash) if reuse != dash else float("nan")


def compare(work: Workload, fills: list, sampler: str, step_counts, pattern: str, reference_steps: int) -> list[dict]:
    reference, _ = run_plain(sampler, work, reference_steps)
    rmse = lambda x: float((x - reference).pow(2).mean().sqrt())  # noqa: E731
    spec = Pattern(pattern)
    rows = []
    for steps in step_counts:
        dash, _ = run_plain(sampler, work, steps)
        reuse, _ = sample_routed(sampler, work, steps, spec, ReuseFiller())
        row = {"steps": steps, "dash_rmse": rmse(dash), "reuse_rmse": rmse(reuse), "fills": {}}
        for fill in fills:
            x, calls = sample_routed(sampler, work, steps, spec, fill.filler)
            err = rmse(x)
            row["fills"][fill.name] = {"rmse": err, "gap_closed": gap_closed(row["dash_rmse"], row["reuse_rmse"], err),
                                       "fill_calls_per_run": calls["dot_calls"] / work.n_chunks}
        rows.append(row)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.compare_fills", description=__doc__.splitlines()[0])
    p.add_argument("--dash", type=Path, default=None, help="reference-format Dash weights (default: the embedded reference model)")
    p.add_argument("--dot", type=Path, default=None, help=f"Dot adapter (default: {DEFAULT_DOT.name})")
    p.add_argument("--fills", default="dot", help="comma-separated fills to compare (default: dot); e.g. "
                   "dot,extrapolate,inherit_k1,inherit_k2,forecast_k1,forecast_k2,forecast2_k2,propagate")
    p.add_argument("--sampler", default="euler", choices=sorted(DETERMINISTIC), help="a deterministic sampler")
    p.add_argument("--steps", default="6,12,20,40", help="step counts, comma-separated")
    p.add_argument("--pattern", default="D.", help="Dash/Dot pattern ('D' Dash, '.' a fill); default 'D.'")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the Dash file's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        steps = [int(v) for v in args.steps.split(",") if v.strip()]
        Pattern(args.pattern)
    except (ValueError, MorseError) as exc:
        print(f"error: --steps must be whole numbers and --pattern a valid pattern ({exc})", file=sys.stderr)
        return 2
    if not steps or min(steps) < 2 or args.samples < 1:
        print("error: --steps must all be >= 2 (one Dash step and one fill) and --samples >= 1", file=sys.stderr)
        return 2
    try:
        models = load_models(args.dash, args.dot, ablation_path=None, device=torch.device("cpu"))
    except (MorseError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = args.cfg if args.cfg is not None else default_cfg(models.dash_meta)
    work = reference_workload(models, args.samples, args.samples, cfg, args.seed, "cpu")
    try:
        fills = collect_fills(models, [f for f in args.fills.split(",") if f.strip()])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = {f.name: measure_fill_n(work, f.filler)["N"] for f in fills if not f.free}
    rows = compare(work, fills, args.sampler, steps, args.pattern, args.reference_steps)
    print(f"{args.sampler}, pattern {args.pattern}, CFG {cfg:g}, {args.samples} samples; RMSE to a {args.reference_steps}-step run "
          "from the same noise; share of the reuse-to-Dash gap each fill closes")
    print("N: " + ", ".join(f"{f.name} {n[f.name]:.2f}" if f.name in n else f"{f.name} free" for f in fills))
    print(f"{'steps':>5} {'all Dash':>9} {'reuse':>9} " + " ".join(f"{f.name:>16}" for f in fills))
    for r in rows:
        cells = " ".join(f"{r['fills'][f.name]['rmse']:9.4f} ({r['fills'][f.name]['gap_closed']:5.2f})" for f in fills)
        print(f"{r['steps']:5d} {r['dash_rmse']:9.4f} {r['reuse_rmse']:9.4f} {cells}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sampler": args.sampler, "pattern": args.pattern, "cfg": cfg, "n": n, "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
