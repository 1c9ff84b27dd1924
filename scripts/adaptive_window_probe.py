"""Probe for issue 28 (not a tool of the pack): which window should Morse's adaptive Dash use? Chosen on a
training split of the workload (noise seed 11: none of the table's runs, converged sets or calibrations use it),
never on the table's own runs.

For each reference model (euler), each fill (the Dot, extrapolate) and each candidate window (start, end), the
adaptive runs at several thresholds and step counts against the fixed patterns D., D.., D... of the same fill:
the mean over an RMSE grid both reach of LSD(fixed) / LSD(adaptive) (``adaptive_probe.ratio_at_equal_rmse``).

    .venv/bin/python scripts/adaptive_window_probe.py --json reports/2026-12-07-adaptive-window.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptive_probe import frontier, ratio_at_equal_rmse  # noqa: E402
from morse_engine import AdaptiveDash, Pattern  # noqa: E402
from training.accelerators import MODELS  # noqa: E402
from training.evaluation.fills import collect_fills, measure_fill_n  # noqa: E402
from training.evaluation.workload import default_cfg, load_models, reference_workload, run_plain, sample_routed  # noqa: E402

WINDOWS = ((0.15, 0.95), (0.0, 0.95), (0.0, 1.0))
THRESHOLDS = (0.05, 0.2, 0.8)
STEPS = (8, 16, 32)
FIXED_STEPS = (4, 8, 16, 32)
SPLIT_SEED = 11


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0, out = time.time(), {"seed": SPLIT_SEED, "samples": args.samples, "models": {}}
    for kind, spec in MODELS.items():
        models = load_models(spec["dash"], spec["dot"])
        work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), SPLIT_SEED, "cpu")
        reference, _ = run_plain("euler", work, 200)
        rmse = lambda x: float((x - reference).pow(2).mean().sqrt())  # noqa: E731
        res = out["models"][kind] = {}
        for fill in collect_fills(models, ["dot", "extrapolate"]):
            n = None if fill.free else measure_fill_n(work, fill.filler, repeats=1)["N"]

            def lsd(totals):
                return (totals["dash_calls"] + (totals["dot_calls"] / n if n else 0.0)) / work.n_chunks

            fixed = []
            for pattern in ("D.", "D..", "D..."):
                for steps in FIXED_STEPS:
                    x, totals = sample_routed("euler", work, steps, Pattern(pattern), fill.filler)
                    fixed.append((lsd(totals), rmse(x)))
            rows = res[fill.name] = {}
            for start, end in WINDOWS:
                pts = []
                for threshold in THRESHOLDS:
                    for steps in STEPS:
                        x, totals = sample_routed("euler", work, steps, AdaptiveDash(threshold=threshold, start=start,
                                                                                      end=end), fill.filler)
                        pts.append((lsd(totals), rmse(x)))
                ratio, rng = ratio_at_equal_rmse(frontier(fixed), frontier(pts))
                rows[f"{start}-{end}"] = {"adaptive_over_fixed": ratio, "rmse_range": rng, "points": pts}
                print(f"{kind} {fill.name} window {start}-{end}: adaptive {ratio}x the fixed over {rng}", flush=True)
    out["seconds"] = time.time() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"done in {out['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
