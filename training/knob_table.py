"""Write the speedup knob's table (``morse_engine/knob_table.json``) from an accelerators report:
``python -m training.knob_table reports/accelerators.json``; check its promise: ``--check reports/knob-check.json``.

Per model kind and sampler: each training-free fill's fixed-pattern runs (pattern, steps, trajectory RMSE with its
90% interval) and the plain sampler's RMSE at the same step count; ``morse_engine.speedup_knob`` picks from it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from morse_engine.speedup_knob import TABLE_PATH

FIXED_PREFIX = "morse_fixed_"


def knob_table(report: dict, source: str) -> dict:
    kinds = {}
    for kind, model in report["models"].items():
        free = {name for name, n in model["n"].items()}
        for sampler, rep in model["samplers"].items():
            plain = {p["steps"]: p["rmse"]["value"] for p in rep["plain"]}
            rows = []
            for name, runs in rep["runs"].items():
                fill = name[len(FIXED_PREFIX):] if name.startswith(FIXED_PREFIX) else None
                if fill is None or fill in free:  # training-free fills only: their spend is known before the run
                    continue
                for run in runs:
                    if run["steps"] in plain:
                        rows.append({"fill": fill, "pattern": run["setting"], "steps": run["steps"],
                                     "rmse": run["rmse"]["value"], "rmse_lo": run["rmse"]["lo"],
                                     "rmse_hi": run["rmse"]["hi"], "plain_rmse": plain[run["steps"]]})
            kinds.setdefault(kind, {})[sampler] = sorted(rows, key=lambda r: (r["fill"], r["pattern"], r["steps"]))
    return {"source": source, "date": report["date"], "samples": report["settings"]["samples"], "kinds": kinds}


CHECK_SEED = 21  # held-out noise: not the table's runs (seed 0), its converged sets, calibrations or probes
CHECK_REQUESTS, CHECK_STEPS = ("1.5x", "2x", "3x"), (12, 24)


def check(samples: int, threads: int) -> dict:
    """The knob's promise on both reference models, on held-out noise: asked for S x at a step count the table
    measured, the run spends at most 1/S of plain's LSD (within 5%) and its RMSE falls in the table's interval."""
    import torch

    from morse_engine.fillers import TRAINING_FREE_FILLS
    from morse_engine.schedules import Pattern
    from morse_engine.speedup_knob import SLACK, SPEEDUPS, choose

    from .accelerators import MODELS
    from .evaluation.workload import default_cfg, load_models, reference_workload, run_plain, sample_routed

    torch.set_num_threads(threads)
    rows = []
    for kind, spec in MODELS.items():
        models = load_models(spec["dash"], spec["dot"])
        work = reference_workload(models, samples, samples, default_cfg(models.dash_meta), CHECK_SEED, "cpu")
        for sampler in spec["samplers"]:
            reference, _ = run_plain(sampler, work, 200)
            for request in CHECK_REQUESTS:
                for steps in CHECK_STEPS:
                    c = choose(request, steps, kind, sampler)
                    x, totals = sample_routed(sampler, work, steps, Pattern(c.pattern), TRAINING_FREE_FILLS[c.fill]())
                    lsd = totals["dash_calls"] / work.n_chunks
                    rmse = float((x - reference).pow(2).mean().sqrt())
                    e = c.expected
                    xp, _ = run_plain(sampler, work, steps)
                    ratio = rmse / float((xp - reference).pow(2).mean().sqrt())
                    rows.append({"kind": kind, "sampler": sampler, "request": request, "steps": steps,
                                 "fill": c.fill, "pattern": c.pattern, "lsd": lsd,
                                 "spends_at_most": lsd <= steps / SPEEDUPS[request] * SLACK, "rmse": rmse,
                                 "table": [e["rmse_lo"], e["rmse"], e["rmse_hi"]], "table_steps": e["at_steps"],
                                 "within": e["rmse_lo"] <= rmse <= e["rmse_hi"], "ratio": ratio,
                                 "table_ratio": [e["lo"], e["ratio"], e["hi"]],
                                 "ratio_within": e["lo"] <= ratio <= e["hi"]})
                    print(f"{kind} {sampler} {request} at {steps}: {c.fill} {c.pattern}, {lsd:.2f} LSD, RMSE "
                          f"{rmse:.4f} against the table's {e['rmse']:.4f} [{e['rmse_lo']:.4f}, {e['rmse_hi']:.4f}]; "
                          f"{ratio:.2f}x plain's against {e['ratio']:.2f}x [{e['lo']:.2f}, {e['hi']:.2f}]",
                          flush=True)
    return {"seed": CHECK_SEED, "samples": samples, "rows": rows,
            "spends_at_most": sum(r["spends_at_most"] for r in rows), "within": sum(r["within"] for r in rows),
            "ratio_within": sum(r["ratio_within"] for r in rows),
            "runs": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.knob_table", description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, nargs="?", help="an accelerators.json (python -m training.accelerators)")
    p.add_argument("--out", type=Path, default=TABLE_PATH)
    p.add_argument("--check", type=Path, default=None,
                   help="instead: check the shipped table's promise on both reference models (held-out noise), "
                        "writing this JSON")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.check:
        result = check(args.samples, args.threads)
        args.check.write_text(json.dumps(result, indent=1) + "\n")
        print(f"spent at most its share in {result['spends_at_most']} of {result['runs']} runs; RMSE within the "
              f"table's interval in {result['within']} of {result['runs']}; RMSE relative to plain's within the "
              f"table's in {result['ratio_within']} of {result['runs']}")
        return 0
    if args.report is None:
        p.error("give an accelerators.json, or --check FILE")
    table = knob_table(json.loads(args.report.read_text()), str(args.report))
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k}/{s} {len(rows)} rows" for k, v in table["kinds"].items()
                                            for s, rows in v.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
