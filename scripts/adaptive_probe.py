"""Probe for issue 28 (not a tool of the pack): does deciding Dash during the run (``AdaptiveDash``, EasyCache's
signal) beat the fixed patterns of the same fill at equal LSD, and where does ComfyUI's EasyCache itself land?

On a reference model (the UNet by default, the DiT with --dash), one sampler, the evaluation's workload (n samples
from seeded noise, labels cycling, the Dash file's CFG): the plain sampler at several step counts; each fill with
the fixed patterns D., D.., D... at several step counts; the same fill under AdaptiveDash at its defaults
(start 0.15, end 0.95, no subsampling) at several thresholds and step counts; and EasyCache as ComfyUI's node runs
it (residual fill, subsampling 8, its window). Each run's LSD is counted from the calls the router made (a fill
with a network costs 1/N a call, N measured here); quality is the trajectory RMSE to a many-step run from the same
noise. Per fill, the fixed and the adaptive Pareto frontiers are compared at equal RMSE: the LSD each needs,
interpolated on a log scale, over the RMSE range both reach.

    .venv/bin/python scripts/adaptive_probe.py --json reports/2026-12-07-adaptive-probe/unet.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from morse_engine import AdaptiveDash, Pattern  # noqa: E402
from morse_engine.peers.easycache import easycache  # noqa: E402
from training.compare_fills import default_cfg  # noqa: E402
from training.evaluation.fills import collect_fills, measure_fill_n  # noqa: E402
from training.evaluation.workload import load_models, reference_workload, run_plain, sample_routed  # noqa: E402

PATTERNS = ("D.", "D..", "D...")
FIXED_STEPS = (4, 6, 8, 12, 16, 24, 32)
ADAPTIVE_STEPS = (8, 12, 16, 24, 32, 48)
THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
PLAIN_STEPS = (3, 4, 6, 8, 12, 16, 24, 32, 48)


def frontier(points):
    """The Pareto frontier of (lsd, rmse): sorted by LSD, each point better than every cheaper one."""
    out, best = [], math.inf
    for lsd, err in sorted(points):
        if err < best:
            out.append((lsd, err))
            best = err
    return out


def lsd_at(curve, err):
    """The LSD a frontier needs to reach ``err`` (log-log interpolation), None outside its range."""
    for (l0, e0), (l1, e1) in zip(curve, curve[1:]):
        if e1 <= err <= e0:
            w = (math.log(e0) - math.log(err)) / max(math.log(e0) - math.log(e1), 1e-12)
            return math.exp(math.log(l0) + w * (math.log(l1) - math.log(l0)))
    return None


def ratio_at_equal_rmse(slow, fast, samples=25):
    """Mean over an RMSE grid (where both frontiers reach) of LSD(slow) / LSD(fast): > 1, ``fast`` is cheaper."""
    lo = max(min(e for _, e in slow), min(e for _, e in fast))
    hi = min(max(e for _, e in slow), max(e for _, e in fast))
    if not lo < hi:
        return None, None
    grid = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (samples - 1)) for i in range(samples)]
    ratios = [a / b for a, b in ((lsd_at(slow, e), lsd_at(fast, e)) for e in grid) if a and b]
    return (sum(ratios) / len(ratios) if ratios else None), [lo, hi]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dash", type=Path, default=None)
    p.add_argument("--dot", type=Path, default=None, help="the Dot (the reference DiT needs its own)")
    p.add_argument("--fills", default="extrapolate,forecast_k1,residual,dot")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    models = load_models(args.dash, args.dot)
    work = reference_workload(models, args.samples, args.samples, default_cfg(models.dash_meta), 0, "cpu")
    reference, _ = run_plain(args.sampler, work, args.reference_steps)
    rmse = lambda x: float((x - reference).pow(2).mean().sqrt())  # noqa: E731
    out = {"sampler": args.sampler, "samples": args.samples, "reference_steps": args.reference_steps, "plain": [],
           "fills": {}}
    for steps in PLAIN_STEPS:
        x, info = run_plain(args.sampler, work, steps)
        out["plain"].append({"steps": steps, "lsd": info["lsd"], "rmse": rmse(x)})
    fills = {f.name: f for f in collect_fills(models, args.fills.split(","))}

    def cost(totals, n):
        return (totals["dash_calls"] + (0.0 if n is None else totals["dot_calls"] / n)) / work.n_chunks

    for name, fill in fills.items():
        n = None if fill.free else measure_fill_n(work, fill.filler)["N"]
        rows = {"n": n, "fixed": [], "adaptive": []}
        for pattern in PATTERNS:
            for steps in FIXED_STEPS:
                x, totals = sample_routed(args.sampler, work, steps, Pattern(pattern), fill.filler)
                rows["fixed"].append({"pattern": pattern, "steps": steps, "lsd": cost(totals, n), "rmse": rmse(x)})
        for threshold in THRESHOLDS:
            for steps in ADAPTIVE_STEPS:
                x, totals = sample_routed(args.sampler, work, steps, AdaptiveDash(threshold=threshold), fill.filler)
                rows["adaptive"].append({"threshold": threshold, "steps": steps, "lsd": cost(totals, n), "rmse": rmse(x)})
        fixed = frontier([(r["lsd"], r["rmse"]) for r in rows["fixed"]])
        adaptive = frontier([(r["lsd"], r["rmse"]) for r in rows["adaptive"]])
        rows["adaptive_over_fixed"], rows["rmse_range"] = ratio_at_equal_rmse(fixed, adaptive)
        out["fills"][name] = rows
        print(f"{name} (N {n if n else 'free'}): adaptive needs 1/{rows['adaptive_over_fixed']} of the fixed "
              f"patterns' LSD at equal RMSE over {rows['rmse_range']}", flush=True)
    peer = []
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        for steps in ADAPTIVE_STEPS:
            spec, residual = easycache(threshold)
            x, totals = sample_routed(args.sampler, work, steps, spec, residual)
            peer.append({"threshold": threshold, "steps": steps, "lsd": cost(totals, None), "rmse": rmse(x)})
    out["easycache"] = peer
    plain = frontier([(r["lsd"], r["rmse"]) for r in out["plain"]])
    out["speedup_over_plain"] = {}
    for name, rows in [*out["fills"].items(), ("easycache", {"adaptive": peer, "fixed": []})]:
        for kind in ("fixed", "adaptive"):
            pts = rows[kind]
            if pts:
                out["speedup_over_plain"][f"{name}/{kind}"] = ratio_at_equal_rmse(plain, frontier(
                    [(r["lsd"], r["rmse"]) for r in pts]))
    for key, (ratio, rng) in out["speedup_over_plain"].items():
        print(f"  {key}: {ratio if ratio is None else round(ratio, 3)}x over plain at equal RMSE over {rng}")
    out["seconds"] = time.time() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"done in {out['seconds'] / 60:.1f} min")


def plot(path_json: Path, path_png: Path) -> None:
    """RMSE against LSD: the plain sampler, each fill's fixed and adaptive frontiers, EasyCache's runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    data = json.loads(path_json.read_text())
    names = list(data["fills"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True)
    plain = frontier([(r["lsd"], r["rmse"]) for r in data["plain"]])
    peer = frontier([(r["lsd"], r["rmse"]) for r in data["easycache"]])
    for ax, name in zip(axes, names):
        rows = data["fills"][name]
        ax.plot(*zip(*plain), "k-", label="plain")
        ax.plot(*zip(*peer), "-", color="0.6", label="EasyCache (ComfyUI's)")
        for kind, style in (("fixed", "o-"), ("adaptive", "s-")):
            pts = [(r["lsd"], r["rmse"]) for r in rows[kind]]
            ax.plot(*zip(*pts), style[0], alpha=0.25, ms=3)
            ax.plot(*zip(*frontier(pts)), style, ms=4, label=f"{name} {kind}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(2.5, 60)
        ax.set_xticks([3, 4, 6, 8, 12, 16, 24, 32, 48])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ratio = rows.get("adaptive_over_fixed")
        ax.set_title(f"{name}: adaptive {ratio:.2f}x the fixed" if ratio else name, fontsize=9)
        ax.set_xlabel("LSD (Dash calls + fill calls / N)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"trajectory RMSE ({data['samples']} samples, {data['sampler']})")
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--plot":  # --plot RESULT.json OUT.png: the figure of a finished run
        plot(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
