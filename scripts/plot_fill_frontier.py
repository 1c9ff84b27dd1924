"""Plot for issue 15 (not a tool of the pack): the share of the reuse-to-Dash gap each fill closes against its N,
per sampler, from JSON written by ``scripts/fill_frontier_probe.py`` and ``python -m training.compare_fills --json``.

    .venv/bin/python scripts/plot_fill_frontier.py reports/fill_frontier.json \
        reports/compare_fills_forecast_euler.json reports/compare_fills_forecast_dpmpp_2m.json --out reports/fill_frontier.png \
        --drop inherit_k1_extrapolated,inherit_k2_extrapolated

Each fill is a point at its mean over the step counts (6/12/20/40), with a bar from its worst to its best step
count; the issue's bar (N >= 5, >= 0.7 at every step count) is the shaded corner.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(paths) -> dict:
    """{sampler: {fill: (N, [gap closed per step count])}}; a fill measured twice keeps the later file's."""
    out: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        per_sampler = data["samplers"] if "samplers" in data else {data["sampler"]: data["rows"]}
        for sampler, rows in per_sampler.items():
            for fill in rows[0]["fills"]:
                n = data["n"].get(fill)
                if n is None:
                    continue  # a free fill: no N to place it at
                out.setdefault(sampler, {})[fill] = (n, [r["fills"][fill]["gap_closed"] for r in rows])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--drop", default="", help="comma-separated fills to leave out (e.g. a probe's copy of an engine fill)")
    args = p.parse_args()
    data = points(args.json)
    for fills in data.values():
        for name in filter(None, args.drop.split(",")):
            fills.pop(name, None)
    fig, axes = plt.subplots(1, len(data), figsize=(6.2 * len(data), 4.8), squeeze=False)
    for ax, (sampler, fills) in zip(axes[0], sorted(data.items(), key=lambda kv: kv[0] != "euler")):
        ax.fill_between([5, 100], 0.7, 1.2, color="tab:green", alpha=0.12, label="issue 15's bar (N >= 5, >= 0.7)")
        for name, (n, gaps) in sorted(fills.items()):
            mean = sum(gaps) / len(gaps)
            color = "tab:red" if name.startswith("dot") else "tab:blue" if name.startswith("forecast") else "tab:gray"
            ax.errorbar([n], [mean], yerr=[[mean - min(gaps)], [max(gaps) - mean]], fmt="o", color=color, capsize=3)
            ax.annotate(name, (n, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(1, 20)
        ax.set_ylim(-0.4, 1.1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("N (fill calls per Dash call's time, measured)")
        ax.set_ylabel("gap closed (mean; bar: worst..best step count)")
        ax.set_title(f"{sampler}, pattern D., reference model")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
