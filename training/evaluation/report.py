"""Turn measured quality curves into the evaluation report: speedups, table, JSON, plot.

No model runs here; :mod:`training.evaluate` measures the curves and hands them over. A
curve is a list of points, each a dict with at least ``lsd`` (latency in LSD, the latency of
one Dash call) and ``fd`` (Frechet distance, lower is better), and ``rmse`` (trajectory
error against a many-step reference) for deterministic samplers. Morse points also carry
``budget``, ``steps``, ``dash_steps`` and ``dot_steps``.

Speedup at equal quality is the engine's (:func:`morse_engine.speedup_curve`, paper
section 3.1): the plain sampler's curve is linearly interpolated to find the LSD it needs
for a Morse point's quality, and speedup = that LSD / the Morse LSD. A point better than
every plain point gets the plain sampler's largest LSD ("lower" bound: the speedup is at
least that); a point worse than every plain point gets its smallest ("upper" bound).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from morse_engine import average_speedup, speedup_curve

PRIMARY = "morse"  # the curve whose speedup is the headline (Morse with the trained Dot)
CURVE_LABELS = {
    "plain": "plain sampler",
    "morse": "Morse (Dash + Dot)",
    "training-free": "training-free (reuse)",
    "training-free-extrapolate": "training-free (extrapolate)",
    "ablation": "ablation: Dot without trajectory inputs",
}
CURVE_STYLES = {
    "plain": dict(color="black", marker="o", linestyle="-"),
    "morse": dict(color="tab:red", marker="s", linestyle="-"),
    "training-free": dict(color="tab:blue", marker="^", linestyle="--"),
    "training-free-extrapolate": dict(color="tab:cyan", marker="v", linestyle=":"),
    "ablation": dict(color="tab:gray", marker="x", linestyle="-."),
}


def _finite(points: Sequence[dict], key: str) -> list[dict]:
    return [p for p in points if p.get(key) is not None and math.isfinite(p[key])]


def speedup_block(plain: Sequence[dict], curve: Sequence[dict], key: str) -> Optional[dict]:
    """Speedup of each point of ``curve`` over ``plain`` at equal ``key`` (``"fd"`` or ``"rmse"``).

    Returns ``{"average_speedup", "average_speedup_interpolated", "bounded_points",
    "per_budget": [{"lsd", "speedup", "quality", "baseline_lsd", "bound", ...}]}`` or None
    when either curve has no usable point. ``average_speedup`` averages every point (as the
    paper does over its selected latencies); ``average_speedup_interpolated`` only those whose
    quality lies within the plain curve's measured range (None if there are none).
    """
    base = _finite(plain, key)
    pts = _finite(curve, key)
    if not base or not pts:
        return None
    speedups = speedup_curve([(p["lsd"], p[key]) for p in base], [(p["lsd"], p[key]) for p in pts])
    per_budget = []
    for p, s in zip(pts, speedups):
        row = {
            "lsd": s.lsd,
            "speedup": s.speedup,
            "quality": s.quality,
            "baseline_lsd": s.baseline_lsd,
            "bound": s.bound,  # None, "lower" (at least) or "upper" (at most)
        }
        for extra in ("budget", "steps", "dash_steps", "dot_steps"):
            if extra in p:
                row[extra] = p[extra]
        per_budget.append(row)
    exact = [s for s in speedups if s.bound is None]
    return {
        "metric": key,
        "average_speedup": average_speedup(speedups),
        "average_speedup_interpolated": average_speedup(exact) if exact else None,
        "bounded_points": len(speedups) - len(exact),
        "per_budget": per_budget,
    }


def lossless_check(plain: Sequence[dict], morse: Sequence[dict], key: str = "fd", tolerance: float = 0.0) -> Optional[dict]:
    """Does Morse's best quality reach the plain sampler's best (within ``tolerance``)?"""
    base, pts = _finite(plain, key), _finite(morse, key)
    if not base or not pts:
        return None
    pb = min(base, key=lambda p: p[key])
    mb = min(pts, key=lambda p: p[key])
    return {
        "metric": key,
        "plain_best": pb[key],
        "plain_best_lsd": pb["lsd"],
        "morse_best": mb[key],
        "morse_best_lsd": mb["lsd"],
        "morse_max_lsd": max(p["lsd"] for p in pts),
        "tolerance": tolerance,
        "reaches_plain_best": mb[key] <= pb[key] + tolerance,
    }


def monotone_check(points: Sequence[dict], key: str, tolerance: float = 0.0) -> Optional[dict]:
    """Does quality improve (not get worse by more than ``tolerance``) as LSD grows?

    The speedup at equal quality assumes it does; where a later point is worse than an
    earlier one by more than the noise, interpolating the curve says little.
    """
    pts = sorted(_finite(points, key), key=lambda p: p["lsd"])
    if len(pts) < 2:
        return None
    violations = []
    best = pts[0]
    for p in pts[1:]:
        if p[key] > best[key] + tolerance:
            violations.append({"from_lsd": best["lsd"], "from": best[key], "to_lsd": p["lsd"], "to": p[key],
                               "worse_by": p[key] - best[key]})
        if p[key] < best[key]:
            best = p
    return {"monotone": not violations, "tolerance": tolerance, "violations": violations}


def sampler_report(name: str, curves: dict, deterministic: bool, fd_tolerance: float = 0.0, reference: Optional[dict] = None) -> dict:
    """Everything reported for one sampler, from its raw curves.

    ``curves`` maps curve names (``plain``, ``morse``, ``training-free``, ...) to point
    lists. The headline ``average_speedup`` / ``per_budget`` are Morse's, on FD; the
    trajectory-error speedup sits under ``trajectory_error`` (deterministic samplers only);
    every other curve's speedups sit under ``other_curves``.
    """
    plain = curves.get("plain", [])
    fd = speedup_block(plain, curves.get(PRIMARY, []), "fd")
    out = {
        "deterministic": deterministic,
        "average_speedup": fd["average_speedup"] if fd else None,
        "average_speedup_interpolated": fd["average_speedup_interpolated"] if fd else None,
        "bounded_points": fd["bounded_points"] if fd else None,
        "per_budget": fd["per_budget"] if fd else [],
        "trajectory_error": None,
        "lossless": lossless_check(plain, curves.get(PRIMARY, []), "fd", fd_tolerance),
        "other_curves": {},
        "curves": curves,
    }
    out["plain_monotone"] = {"fd": monotone_check(plain, "fd", fd_tolerance)}
    if deterministic:
        out["trajectory_error"] = speedup_block(plain, curves.get(PRIMARY, []), "rmse")
        out["plain_monotone"]["rmse"] = monotone_check(plain, "rmse", 0.0)
    for other, points in curves.items():
        if other in ("plain", PRIMARY):
            continue
        block = {"fd": speedup_block(plain, points, "fd")}
        if deterministic:
            block["trajectory_error"] = speedup_block(plain, points, "rmse")
        out["other_curves"][other] = block
    if reference is not None:
        out["reference"] = reference
    return out


# --------------------------------------------------------------------------- the table
def _fmt(v, spec=".2f", missing="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return format(v, spec)


def _speedup_text(row: Optional[dict]) -> str:
    if not row:
        return "-"
    mark = {"lower": ">=", "upper": "<="}.get(row.get("bound"), "")
    return f"{mark}{row['speedup']:.2f}x"


def _by_budget(points: Sequence[dict]) -> dict:
    return {p.get("budget"): p for p in points if p.get("budget") is not None}


METRICS = {"fd": ("Frechet distance", "FD", ".3f"), "rmse": ("trajectory RMSE vs the many-step reference", "RMSE", ".4f")}
OTHER_SHORT = {"training-free": "reuse", "training-free-extrapolate": "extrap", "ablation": "no-traj"}


def _metric_table(rep: dict, key: str) -> list[str]:
    """Rows per budget for one metric: Morse's value, the plain LSD for it, speedup, other curves."""
    curves = rep["curves"]
    block = {"fd": rep_fd_block(rep), "rmse": rep.get("trajectory_error")}[key]
    if not block:
        return []
    label, short, spec = METRICS[key]
    others = {k: _by_budget(v) for k, v in curves.items() if k not in ("plain", PRIMARY)}
    other_names = [k for k in ("training-free", "training-free-extrapolate", "ablation") if k in others]
    head = ["budget", "Morse LSD", "steps", "Dash+Dot", f"Morse {short}", f"plain LSD@{short}", "speedup"]
    head += [f"{OTHER_SHORT[k]} {short}" for k in other_names]
    rows = []
    for r in block["per_budget"]:
        b = r.get("budget")
        row = [_fmt(b, "g"), _fmt(r["lsd"]), _fmt(r.get("steps"), "d"), f"{r.get('dash_steps', '?')}+{r.get('dot_steps', '?')}",
               _fmt(r["quality"], spec), _fmt(r["baseline_lsd"], ".1f"), _speedup_text(r)]
        row += [_fmt(others[k].get(b, {}).get(key), spec) for k in other_names]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [f"-- {label} --", line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    plain = [p for p in curves.get("plain", []) if p.get(key) is not None]
    lines.append(f"plain {short} by LSD: " + ", ".join(f"{p['lsd']:g}:{format(p[key], spec)}" for p in plain))
    avg = f"average speedup ({short}): Morse {_fmt(block['average_speedup'])}x over {len(block['per_budget'])} budgets"
    if block.get("bounded_points"):
        avg += f" ({block['bounded_points']} bounded; interpolated points only: {_fmt(block['average_speedup_interpolated'])}x)"
    for k in other_names:
        ob = rep["other_curves"][k].get("fd" if key == "fd" else "trajectory_error")
        if ob:
            avg += f"; {OTHER_SHORT[k]} {_fmt(ob['average_speedup'])}x"
    lines.append(avg)
    mono = (rep.get("plain_monotone") or {}).get(key)
    if mono and not mono["monotone"]:
        worst = max(mono["violations"], key=lambda v: v["worse_by"])
        lines.append(
            f"WARNING: the plain sampler's {short} does not improve with LSD ({len(mono['violations'])} reversals beyond "
            f"the tolerance {mono['tolerance']:.3f}; worst: {worst['from_lsd']:g} LSD {worst['from']:.3f} -> "
            f"{worst['to_lsd']:g} LSD {worst['to']:.3f}), so speedups at equal {short} are not meaningful here"
        )
    return lines


def rep_fd_block(rep: dict) -> Optional[dict]:
    if not rep.get("per_budget"):
        return None
    return {k: rep[k] for k in ("average_speedup", "average_speedup_interpolated", "bounded_points", "per_budget")}


def format_sampler_table(name: str, rep: dict) -> str:
    """Readable tables for one sampler: FD, and trajectory RMSE for deterministic samplers."""
    det = rep["deterministic"]
    lines = [f"== {name} ({'deterministic' if det else 'stochastic'}) =="]
    lines += _metric_table(rep, "fd")
    if det:
        lines += _metric_table(rep, "rmse")
    ll = rep.get("lossless")
    if ll:
        verdict = "yes" if ll["reaches_plain_best"] else "no"
        lines.append(
            f"lossless check: plain best FD {ll['plain_best']:.3f} at {ll['plain_best_lsd']:g} LSD; Morse best "
            f"{ll['morse_best']:.3f} at {ll['morse_best_lsd']:.2f} LSD (budgets up to {ll['morse_max_lsd']:.2f} LSD); "
            f"reaches plain best (tolerance {ll['tolerance']:.3f}): {verdict}"
        )
    return "\n".join(lines)


def _fmt_list(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def format_report(report: dict) -> str:
    lat = report.get("latency") or {}
    checks = []
    if lat.get("N_median_of_pairs"):
        checks.append(f"median of paired ratios {lat['N_median_of_pairs']:.2f}")
    if lat.get("N_of_fastest"):
        checks.append(f"fastest calls {lat['N_of_fastest']:.2f}")
    if report.get("N_in_run"):
        checks.append(f"inside the Morse runs {report['N_in_run']:.2f}")
    head = [
        f"N (Dash / Dot latency, measured): {report['N']:.2f}"
        + (f" (Dash {lat['dash_seconds'] * 1e3:.1f} ms, Dot {lat['dot_seconds'] * 1e3:.1f} ms, batch {lat.get('batch')})" if lat else "")
        + (f"; cross-checks: {', '.join(checks)}" if checks else "")
        + (f"; ablation Dot N {report['N_ablation']:.2f}" if report.get("N_ablation") else ""),
    ]
    if report.get("fd_floor") is not None:
        head.append(f"FD floor (real train split vs test split): {report['fd_floor']:.3f}")
    if report.get("fd_spread"):
        s = report["fd_spread"]
        seeds = list(s["fd"])
        txt = (f"FD across two noise seeds ({s['sampler']} plain, steps {s['steps']}): seed {seeds[0]} "
               f"{_fmt_list(s['fd'][seeds[0]])}, seed {seeds[1]} {_fmt_list(s['fd'][seeds[1]])}; level moves "
               f"{s['level_diff']:.3f}")
        if "difference_noise" in s:
            txt += (f", the difference between the two step counts moves {s['difference_noise']:.3f} "
                    f"({s['difference'][0]:.3f} vs {s['difference'][1]:.3f}; every run shares one noise seed, so this "
                    "is the noise on comparisons and the lossless tolerance)")
        head.append(txt)
    head += [f"WARNING: {w}" for w in floor_warnings(report)]
    body = [format_sampler_table(name, rep) for name, rep in report["samplers"].items()]
    return "\n".join(head) + "\n\n" + "\n\n".join(body)


def floor_warnings(report: dict) -> list[str]:
    """Runs whose FD is below the real-data floor: there FD rewards something other than fidelity."""
    floor = report.get("fd_floor")
    if floor is None:
        return []
    out = []
    for name, rep in report["samplers"].items():
        below = [(c, p) for c, pts in rep["curves"].items() for p in pts if p.get("fd") is not None and p["fd"] < floor]
        if below:
            c, p = min(below, key=lambda cp: cp[1]["fd"])
            out.append(f"{name}: {len(below)} run(s) score an FD below real data's own ({floor:.3f}), e.g. {c} at "
                       f"{p['lsd']:.2f} LSD: {p['fd']:.3f}; FD is not measuring fidelity there")
    return out


def rebuild(report: dict) -> dict:
    """Recompute every derived figure of a report from its raw curves (for ``python -m``)."""
    tolerance = (report.get("fd_spread") or {}).get("difference_noise", 0.0)
    report = dict(report)
    report["samplers"] = {
        name: sampler_report(name, rep["curves"], rep["deterministic"], tolerance, rep.get("reference"))
        for name, rep in report["samplers"].items()
    }
    return report


def main(argv=None) -> int:
    """Re-derive the table and plot of an ``evaluation.json``: ``python -m training.evaluation.report PATH``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.evaluation.report", description=main.__doc__)
    p.add_argument("report", type=Path, help="an evaluation.json written by python -m training.evaluate")
    p.add_argument("--out-dir", type=Path, default=None, help="write evaluation.json/.png here (default: print only)")
    args = p.parse_args(argv)
    report = rebuild(json.loads(args.report.read_text()))
    print(format_report(report))
    if args.out_dir:
        print(f"Wrote {write_json(report, args.out_dir / 'evaluation.json')} and "
              f"{plot_report(report, args.out_dir / 'evaluation.png')}")
    return 0


# --------------------------------------------------------------------------- files
def write_json(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(v):
    if isinstance(v, (set, tuple)):
        return sorted(v) if isinstance(v, set) else list(v)
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"cannot write {type(v).__name__} to JSON")


def plot_report(report: dict, path) -> Path:
    """FD (log y) against LSD, one column per sampler; trajectory RMSE below for deterministic ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = list(report["samplers"])
    any_det = any(report["samplers"][n]["deterministic"] for n in names)
    rows = 2 if any_det else 1
    fig, axes = plt.subplots(rows, len(names), figsize=(4.6 * len(names), 3.8 * rows), squeeze=False)
    for col, name in enumerate(names):
        rep = report["samplers"][name]
        for row, key, label in ((0, "fd", "Frechet distance (lower is better)"), (1, "rmse", "trajectory RMSE vs reference")):
            if row >= rows:
                continue
            ax = axes[row][col]
            if key == "rmse" and not rep["deterministic"]:
                ax.axis("off")
                ax.text(0.5, 0.5, f"{name}: stochastic,\nno trajectory error", ha="center", va="center")
                continue
            for cname, points in rep["curves"].items():
                pts = sorted(_finite(points, key), key=lambda p: p["lsd"])
                pts = [p for p in pts if p[key] > 0]
                if pts:
                    ax.plot([p["lsd"] for p in pts], [p[key] for p in pts], label=CURVE_LABELS.get(cname, cname),
                            markersize=4, **CURVE_STYLES.get(cname, {}))
            if key == "fd" and report.get("fd_floor"):
                ax.axhline(report["fd_floor"], color="tab:green", linewidth=0.8, linestyle=":", label="real data (train vs test)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis, subs in ((ax.xaxis, (1.0, 2.0, 3.0, 5.0)), (ax.yaxis, (1.0, 1.5, 2.0, 3.0, 5.0, 7.0))):
                axis.set_major_locator(LogLocator(base=10, subs=subs))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("latency (LSD)")
            ax.set_ylabel(label)
            title = name
            if key == "fd" and rep.get("average_speedup") is not None:
                title += f": average speedup at equal FD {rep['average_speedup']:.2f}x"
            if key == "rmse" and rep.get("trajectory_error"):
                title += f": average speedup at equal RMSE {rep['trajectory_error']['average_speedup']:.2f}x"
            mono = (rep.get("plain_monotone") or {}).get(key)
            if mono and not mono["monotone"]:
                title += "\n(plain curve not monotone: speedup not meaningful)"
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{report.get('title', 'Morse')} (N = {report['N']:.2f}, measured; {report.get('date', '')})", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
