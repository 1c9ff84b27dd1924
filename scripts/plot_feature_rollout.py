"""Plot of reports/2026-12-05-feature-rollout.md (not a tool of the pack): the share of the reuse-to-Dash gap each fill
closes at 6/12/20/40 steps, read from the probe logs in reports/2026-12-05-feature-rollout/, beside the earlier fills'
committed figures (compare_fills_forecast2_*.json, 2026-12-02-rollout.md).

    .venv/bin/python scripts/plot_feature_rollout.py   (writes reports/2026-12-05-feature-rollout/gap_closed.png)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPORTS = Path(__file__).resolve().parents[1] / "reports"
RUNS = REPORTS / "2026-12-05-feature-rollout"
LOGS = {"learned, 500 steps, seed 0": "probe_k1_seed0.log", "learned, 500 steps, seed 1": "probe_k1_seed1.log",
        "learned, 1500 steps, seed 0": "probe_k1_seed0_1500.log",
        "learned without trajectory inputs (Table 4), seed 0": "probe_k1_no_trajectory_seed0.log"}
# the paper-layout Dot fine-tuned on rollouts, seed 0 (2026-12-02-rollout.md)
ROLLOUT_DOT = {"euler": [0.33, 0.57, 0.57, 0.43], "dpmpp_2m": [-0.09, 0.40, 0.43, 0.41]}


def from_log(path: Path) -> dict:
    """{sampler: [base fill's gaps], [learned fill's gaps]} from a judge() table."""
    out, sampler = {}, None
    for line in path.read_text().splitlines():
        head = re.match(r"(\w+): steps", line)
        if head:
            sampler = head.group(1)
            out[sampler] = ([], [])
        elif sampler and re.match(r"\s+\d+\s", line):
            _, base, learned = line.split()
            out[sampler][0].append(float(base))
            out[sampler][1].append(float(learned))
    return out


def main():
    steps = [6, 12, 20, 40]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), sharey=True)
    for ax, sampler in zip(axes, ("euler", "dpmpp_2m")):
        committed = json.loads((REPORTS / f"compare_fills_forecast2_{sampler}.json").read_text())["rows"]
        for name, style in (("dot", "k:"), ("forecast_k1", "C0--"), ("forecast2_k2", "C7-.")):
            ax.plot(steps, [r["fills"][name]["gap_closed"] for r in committed], style, marker="o",
                    label={"dot": "committed Dot (paper layout)", "forecast_k1": "forecast_k1 (free, N ~6-10)",
                           "forecast2_k2": "forecast2_k2 (free, N ~3)"}[name])
        ax.plot(steps, ROLLOUT_DOT[sampler], "k-", alpha=0.4, marker="s", label="Dot + rollout fine-tune (12-02)")
        for i, (label, log) in enumerate(LOGS.items()):
            ax.plot(steps, from_log(RUNS / log)[sampler][1], f"C{i + 1}-", marker="^", label=label)
        ax.axhline(0.7, color="r", lw=0.8)
        ax.set_title(f"{sampler}, pattern D., 48 samples")
        ax.set_xlabel("steps")
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_ylabel("share of the reuse-to-Dash gap closed")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(RUNS / "gap_closed.png", dpi=120)
    print(RUNS / "gap_closed.png")


if __name__ == "__main__":
    main()
