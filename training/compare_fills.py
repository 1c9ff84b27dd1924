"""Dot fills against reused estimates on the same schedule: how much of Dash's quality a fill recovers.

``python -m training.evaluate`` compares at equal cost, where the training-free fills are free
and so buy more Dash steps than the Dot's. This tool holds the step count fixed instead: for
each step count it samples with every step on Dash, with the pattern's non-Dash steps reusing
the anchor estimate, and with them filled by the Dot, all from the same noise, and prints each
run's RMSE to a many-step reference and the share of the reuse-to-Dash gap the Dot closes
(1 = as good as Dash, 0 = no better than reusing, < 0 = worse).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from morse_engine import DotFiller, MorseError, Pattern, ReuseFiller

from .evaluation.samplers import DETERMINISTIC
from .evaluation.workload import DEFAULT_DOT, Workload, default_cfg, load_models, reference_workload, run_plain, sample_routed


def gap_closed(dash: float, reuse: float, dot: float) -> float:
    """Share of the reuse-to-Dash error gap the Dot closes."""
    return (reuse - dot) / (reuse - dash) if reuse != dash else float("nan")


def compare(work: Workload, dot, sampler: str, step_counts, pattern: str, reference_steps: int) -> list[dict]:
    reference, _ = run_plain(sampler, work, reference_steps)
    rmse = lambda x: float((x - reference).pow(2).mean().sqrt())  # noqa: E731
    spec = Pattern(pattern)
    rows = []
    for steps in step_counts:
        dash, _ = run_plain(sampler, work, steps)
        reuse, _ = sample_routed(sampler, work, steps, spec, ReuseFiller())
        filled, calls = sample_routed(sampler, work, steps, spec, DotFiller(dot, work.unet))
        row = {"steps": steps, "dash_rmse": rmse(dash), "reuse_rmse": rmse(reuse), "dot_rmse": rmse(filled),
               "dot_calls_per_run": calls["dot_calls"] / work.n_chunks}
        row["gap_closed"] = gap_closed(row["dash_rmse"], row["reuse_rmse"], row["dot_rmse"])
        rows.append(row)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.compare_fills", description=__doc__.splitlines()[0])
    p.add_argument("--dash", type=Path, default=None, help="reference-format Dash weights (default: the embedded reference model)")
    p.add_argument("--dot", type=Path, default=None, help=f"Dot adapter (default: {DEFAULT_DOT.name})")
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
    rows = compare(work, models.dot, args.sampler, steps, args.pattern, args.reference_steps)
    print(f"{args.sampler}, pattern {args.pattern}, CFG {cfg:g}, {args.samples} samples; RMSE to a {args.reference_steps}-step run "
          "from the same noise")
    print(f"{'steps':>5} {'all Dash':>9} {'reuse':>9} {'Dot':>9} {'gap closed':>11}")
    for r in rows:
        print(f"{r['steps']:5d} {r['dash_rmse']:9.4f} {r['reuse_rmse']:9.4f} {r['dot_rmse']:9.4f} {r['gap_closed']:11.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sampler": args.sampler, "pattern": args.pattern, "cfg": cfg, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
