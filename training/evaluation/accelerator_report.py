"""The accelerators table as people read it (``reports/accelerators.md``), its JSON, and the plot of quality
against LSD for all of them. No model runs here: :mod:`training.accelerators` measures; this formats its JSON
(``python -m training.evaluation.accelerator_report reports/accelerators.json`` renders it again).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .frontier import BUDGETS

SHOWN_BUDGETS = (4, 8, 16, 32, 50)


def _speedup(avg) -> str:
    if not avg:
        return "-"
    if avg.get("speedup") is None:
        return "none separable"
    total = sum(avg["counts"].values())
    return f"{avg['speedup']:.2f}x [{avg['lo']:.2f}, {avg['hi']:.2f}] ({avg['n_separable']}/{total})"


def _table(head, rows) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _at(rows: list, budget) -> str:
    for r in rows:
        if r["budget"] == budget:
            return f"{r['value']:.4f}"
    return "-"


def sampler_section(kind: str, sampler: str, model: dict, rep: dict) -> list[str]:
    rmse, fd = rep["tables"]["rmse"], rep["tables"]["fd_dash"]
    out = [f"### {kind}, {sampler}", ""]
    head = ["accelerator", "N", "default", "speedup at equal RMSE", "at equal FD"] + \
        [f"RMSE @{b}" for b in SHOWN_BUDGETS]
    rows = [["plain", "-", "-", "1", "1"] + [_plain_at(rep["plain"], b) for b in SHOWN_BUDGETS]]
    for name, block in rmse.items():
        row = model["rows"][name]
        n = model["n"].get(name) or model["n"].get(name.replace("morse_fixed_", "").replace("morse_adaptive_", ""))
        rows.append([row["label"], "free" if n is None else f"{n:.1f}", str(row["default"]) if row["default"] is not None else "-",
                     _speedup(block["average"]), _speedup(fd[name]["average"])] +
                    [_at(block["budgets"], b) for b in SHOWN_BUDGETS])
    out += _table(head, rows) + [""]
    vs = rep["versus"]["rmse"]
    out.append(f"Best Morse configuration against each peer's best within each budget (RMSE; best peer by speedup: "
               f"{vs['best_peer']}; Morse over it at equal RMSE: {_speedup(vs['over_best_peer_average'])}):")
    out.append("")
    head = ["budget", "best Morse (setting, steps, LSD)", "RMSE", "best peer there", "RMSE", "Morse >= every peer"]
    rows = []
    for r in vs["budgets"]:
        m = r["morse"]
        morse_value = _value(rep, m)
        peer = min(r["peers"].items(), key=lambda kv: _value(rep, kv[1]), default=None)
        rows.append([f"{r['budget']:g}", f"{m['name']} ({m['setting']}, {m['steps']}, {m['lsd']:.2f})", f"{morse_value:.4f}",
                     f"{peer[0]} ({peer[1]['setting']}, {peer[1]['steps']})" if peer else "-",
                     f"{_value(rep, peer[1]):.4f}" if peer else "-", "yes" if r["morse_ahead_of_all"] else "**no**"])
    out += _table(head, rows) + [""]
    out += adaptive_section(rmse)
    return out


def adaptive_against_fixed(rmse: dict) -> list:
    """Per Morse fill with both rows: at each budget both reach, the best fixed run's RMSE over the best adaptive
    run's (above 1: adaptive better at equal budget), their geometric mean, and both rows' mean speedups."""
    out = []
    for name in rmse:
        if not name.startswith("morse_adaptive_"):
            continue
        fill = name[len("morse_adaptive_"):]
        fixed = rmse.get(f"morse_fixed_{fill}")
        if fixed is None:
            continue
        a = {r["budget"]: r["value"] for r in rmse[name]["budgets"]}
        f = {r["budget"]: r["value"] for r in fixed["budgets"]}
        both = sorted(set(a) & set(f))
        ratios = [f[b] / a[b] for b in both]
        gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None
        out.append({"fill": fill, "budgets": both, "ratios": ratios, "geometric_mean": gmean,
                    "adaptive_wins": sum(r > 1 for r in ratios), "adaptive": rmse[name]["average"],
                    "fixed": fixed["average"]})
    return out


def adaptive_section(rmse: dict) -> list[str]:
    rows = []
    for r in adaptive_against_fixed(rmse):
        rows.append([r["fill"], ", ".join(f"{b:g}" for b in r["budgets"]),
                     f"{r['geometric_mean']:.2f}" if r["geometric_mean"] else "-",
                     f"{r['adaptive_wins']} of {len(r['budgets'])}", _speedup(r["adaptive"]), _speedup(r["fixed"])])
    if not rows:
        return []
    return ["Adaptive Dash against the fixed patterns of the same fill (RMSE at equal budget: fixed over adaptive, "
            "geometric mean over the budgets both reach; above 1 adaptive is better):", "",
            *_table(["fill", "budgets", "fixed / adaptive RMSE", "adaptive better at", "adaptive over plain",
                     "fixed over plain"], rows), ""]


def _plain_at(plain: list, budget) -> str:
    inside = [p for p in plain if p["lsd"] <= budget * 1.02]
    return f"{min(p['rmse']['value'] for p in inside):.4f}" if inside else "-"


def _value(rep: dict, ref: dict) -> float:
    for run in rep["runs"][ref["name"]]:
        if run["setting"] == ref["setting"] and run["steps"] == ref["steps"]:
            return run["rmse"]["value"]
    raise KeyError(ref)


def format_report(report: dict) -> str:
    st = report["settings"]
    out = [f"# {report['title']}", "",
           f"{st['samples']} samples per run, {st['replicates']} paired-bootstrap replicates, 90% intervals; "
           f"{st['threads']} threads on {st['device']}; {report['date']}; wall {report['wall_seconds'] / 60:.1f} min"
           + (" (quick: a test-sized run)" if st.get("quick") else "") + ".",
           "", "Speedup at equal quality over plain sampling: the mean over the budgets "
           f"({', '.join(str(b) for b in BUDGETS)} LSD) where the metric separates the run from the converged "
           "distribution; each budget's best run within it; (k/m): k of the m budgets separable. Morse's adaptive "
           f"Dash uses the window {st['morse_window']}.", "", "![RMSE against LSD](accelerators.png)", ""]
    for kind, model in report["models"].items():
        out.append(f"## {kind} ({model['dash']}, CFG {model['cfg']:g})")
        out.append("")
        for sampler, rep in model["samplers"].items():
            out += sampler_section(kind, sampler, model, rep)
    return "\n".join(out)


def plot(report: dict, path: Path) -> Path:
    """RMSE against LSD, each accelerator's best run per budget, one panel per model and sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, s, m, r) for k, m in report["models"].items() for s, r in m["samplers"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, (kind, sampler, model, rep) in zip(axes[0], panels):
        plain = sorted((p["lsd"], p["rmse"]["value"]) for p in rep["plain"])
        ax.plot(*zip(*plain), "k-o", ms=3, lw=2, label="plain")
        for name, block in rep["tables"]["rmse"].items():
            pts = [(r["lsd"], r["value"]) for r in block["budgets"]]
            if not pts:
                continue
            morse = model["rows"][name]["family"] == "morse"
            ax.plot(*zip(*pts), "-" if morse else "--", marker="s" if morse else ".", ms=3,
                    lw=1.6 if morse else 1.0, label=model["rows"][name]["label"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("LSD spent (Dash calls + fill calls / N)")
        ax.set_ylabel("trajectory RMSE")
        ax.set_title(f"{kind}, {sampler}", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "accelerators.json"
    js.write_text(json.dumps(report, indent=1))
    md = out_dir / "accelerators.md"
    md.write_text(format_report(report) + "\n")
    return {"json": js, "md": md, "png": plot(report, out_dir / "accelerators.png")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluation.accelerator_report")
    p.add_argument("json", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    report = json.loads(args.json.read_text())
    for path in write(report, args.out_dir or args.json.parent).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
