"""The evaluation report as people read it: the headline table, per-budget tables, and the plots.

No model runs here: :mod:`training.evaluate` measures and :mod:`training.evaluation.analysis` turns
records into numbers; this module formats an ``evaluation.json`` (so a report can be re-rendered
from its JSON: ``python -m training.evaluation.report reports/evaluation.json``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .analysis import METRICS, SPEEDUP_METRICS

# The headline's speedups: to the Dash's own distribution and to its own trajectories. FD to the data is
# reported per budget but not as a headline speedup: the converged Dash itself is far from the data on the
# reference model, so a fill can score better than the converged Dash by departing from it.
HEADLINE = ("fd_dash", "rmse")

SHORT = {"fd_dash": "FD-Dash", "fd_data": "FD-data", "rmse": "RMSE", "label": "label"}
FMT = {"fd_dash": ".2f", "fd_data": ".2f", "rmse": ".4f", "label": ".3f"}


def speedup_text(avg) -> str:
    if not avg:
        return "-"
    if avg.get("speedup") is None:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(avg["counts"].items()))
        return f"no separable budget ({counts})"
    return f"{avg['speedup']:.2f}x [{avg['lo']:.2f}, {avg['hi']:.2f}] ({avg['n_separable']} of {sum(avg['counts'].values())})"


def headline_rows(report: dict) -> list[list[str]]:
    rows = []
    for sampler, rep in report["samplers"].items():
        for fill, block in rep["fills"].items():
            n = report["fills"].get(fill, {}).get("n")
            row = [sampler, fill, "free" if n is None else f"{n:.2f}"]
            row += [speedup_text(block["average"].get(m)) if m in block["average"] else "-" for m in HEADLINE]
            rows.append(row)
    return rows


def _table(head, rows) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def format_report(report: dict) -> str:
    st = report["settings"]
    out = [f"# {report['title']}", "",
           f"{st['samples']} samples per run, CFG {st['cfg']:g}, patterns {', '.join(st['patterns'])}"
           f"{f' (last {fd} steps Dash)' if (fd := st.get('final_dash')) else ''}, "
           f"budgets {', '.join(f'{b:g}' for b in st['budgets'])} LSD; {report['machine'].get('gpu') or report['machine']['processor']}, "
           f"{report['date']}; intervals {int(st['level'] * 100)}% paired bootstrap ({st['replicates']} replicates).", ""]
    out.append("Noise floor of each distribution metric at this n (two disjoint converged sets; train against test):")
    for m in ("fd_dash", "fd_data"):
        b = report["bands"][m]
        out.append(f"- {METRICS[m]}: floor {b['floor']:.2f}, band [{b['band'][0]:.2f}, {b['band'][1]:.2f}]"
                   + (f" (measured with {b['n']} samples per set)" if b.get("n") else ""))
    out += ["", "Average speedup at equal quality over the plain sampler (mean of the budgets where the metric "
            "separates the runs; [interval]; separable budgets of all):", ""]
    out += _table(["sampler", "fill", "N"] + [f"speedup at equal {SHORT[m]}" for m in HEADLINE], headline_rows(report))
    for fill, info in report["fills"].items():
        if info.get("latency"):
            lat = info["latency"]
            out.append(f"\nN of {fill}: {lat['N']:.2f} measured on {lat.get('device', '?')} in this run (Dash {lat['dash_ms']:.1f} ms, "
                       f"fill {lat['fill_ms']:.1f} ms per call at batch {lat['batch']}; {lat['how']}).")
    out.append("\nFD to the held-out digits is shown per budget below; it is no headline speedup: the plain sampler "
               "at its most steps scores " + ", ".join(f"{s} {max(rep['plain'], key=lambda r: r['lsd'])['fd_data']['value']:.0f}"
                                     for s, rep in report["samplers"].items())
               + f" against a train-vs-test floor of {report['bands']['fd_data']['floor']:.0f}, so fills that "
               "depart from the Dash can score better than it.")
    for sampler, rep in report["samplers"].items():
        out += ["", f"## {sampler}", ""]
        for metric, imp in rep["plain_improves"].items():
            verdict = "improves beyond noise" if imp["separated"] else "does NOT improve beyond noise"
            out.append(f"- plain {SHORT[metric]} {imp['from']:{FMT[metric]}} at {imp['from_lsd']:g} LSD -> best "
                       f"{imp['best']:{FMT[metric]}} at {imp['best_lsd']:g} LSD: {verdict}")
        metrics = [m for m in METRICS if any(m in r for r in rep["plain"])]
        for metric in metrics:
            out += ["", f"{METRICS[metric]} ({SHORT[metric]}):", ""]
            plain = ", ".join(f"{r['lsd']:g}: {r[metric]['value']:{FMT[metric]}}" for r in rep["plain"] if metric in r)
            out.append(f"plain by LSD: {plain}")
            out.append("")
            head, rows = ["budget"], []
            fills = list(rep["fills"])
            head += fills
            budgets = sorted({b["budget"] for f in fills for b in rep["fills"][f]["best"].get(metric, [])})
            for budget in budgets:
                row = [f"{budget:g}"]
                for f in fills:
                    best = {b["budget"]: b for b in rep["fills"][f]["best"].get(metric, [])}.get(budget)
                    sp = {s["budget"]: s for s in rep["fills"][f]["speedup"].get(metric, [])}.get(budget)
                    if best is None:
                        row.append("-")
                        continue
                    chosen = f"={best['chosen']['pattern']}" if best.get("chosen") else ""  # what "auto" chose
                    cell = f"{best['value']:{FMT[metric]}} `{best['pattern']}{chosen}` @{best['lsd']:.1f}"
                    if sp and sp.get("speedup") is not None:
                        mark = {"lower bound": ">=", "upper bound": "<="}.get(sp["status"], "")
                        cell += f" {mark}{sp['speedup']:.2f}x"
                    elif sp:
                        cell += " n/s"
                    row.append(cell)
                rows.append(row)
            out += _table(head, rows)
    out += ["", "Cells: the best pattern's value, the pattern, its measured LSD, and its speedup (>= lower bound, "
            "<= upper bound, n/s: not separable from the converged distribution at this n)."]
    return "\n".join(out)


def write_json(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def plot_report(report: dict, path) -> Path:
    """Quality against LSD (one panel per sampler and metric; the noise band shaded; intervals as bars)
    and, below each, the speedup per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(report["samplers"])
    metrics = [m for m in METRICS]
    fig, axes = plt.subplots(2 * len(samplers), len(metrics), figsize=(4.2 * len(metrics), 6.4 * len(samplers)),
                             squeeze=False)
    colors = {"plain": "black", "dot": "tab:red", "ablation": "tab:gray", "reuse": "tab:blue", "extrapolate": "tab:cyan"}
    for i, sampler in enumerate(samplers):
        rep = report["samplers"][sampler]
        for j, metric in enumerate(metrics):
            ax, sx = axes[2 * i][j], axes[2 * i + 1][j]
            pts = [r for r in rep["plain"] if metric in r]
            if metric not in SPEEDUP_METRICS:
                sx.set_axis_off()
            if not pts:
                ax.set_axis_off()
                sx.set_axis_off()
                continue
            _curve(ax, [r["lsd"] for r in pts], [r[metric] for r in pts], "plain", colors["plain"], "o")
            for k, (fill, block) in enumerate(rep["fills"].items()):
                best = block["best"].get(metric, [])
                color = colors.get(fill, f"C{k + 4}")
                _curve(ax, [b["lsd"] for b in best], best, fill, color, "s")
                sp = [s for s in block["speedup"].get(metric, []) if s.get("speedup") is not None]
                if not sp:
                    continue
                sx.plot([s["budget"] for s in sp], [s["speedup"] for s in sp], marker="s", color=color, label=fill)
                for s in sp:
                    if s.get("lo") is not None and s.get("hi") is not None:
                        sx.vlines(s["budget"], s["lo"], s["hi"], color=color, alpha=0.5)
            band = report["bands"].get(metric, {}).get("band")
            if band and band[1] > 0:  # on a log axis the band starts at half the smallest value shown
                low = max(band[0], 0.5 * min(r[metric]["value"] for r in pts))
                ax.axhspan(low, band[1], color="green", alpha=0.15, label="noise band (converged)")
            _log_x(ax)
            if metric != "label":
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, 1.02)
            ax.set_title(f"{sampler}: {SHORT[metric]}")
            ax.set_xlabel("LSD")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
            if metric not in SPEEDUP_METRICS:
                continue
            sx.axhline(1.0, color="black", lw=0.8)
            _log_x(sx)
            sx.set_title(f"{sampler}: speedup at equal {SHORT[metric]}")
            sx.set_xlabel("budget (LSD)")
            if i == 0 and j == 0:
                sx.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _log_x(ax):
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([4, 8, 16, 32, 64])


def _curve(ax, xs, points, label, color, marker):
    ys = [p["value"] for p in points]
    ax.plot(xs, ys, marker=marker, color=color, label=label, lw=1)
    lo = [p["value"] - p["lo"] if p.get("lo") is not None else 0 for p in points]
    hi = [p["hi"] - p["value"] if p.get("hi") is not None else 0 for p in points]
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=color, alpha=0.5)


def main(argv=None) -> int:
    """Re-render the table and plot of an ``evaluation.json``."""
    p = argparse.ArgumentParser(prog="python -m training.evaluation.report", description=main.__doc__)
    p.add_argument("json", type=Path)
    args = p.parse_args(argv)
    report = json.loads(args.json.read_text())
    text = format_report(report)
    print(text)
    args.json.with_suffix(".md").write_text(text + "\n")
    plot_report(report, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
