"""From the runs of every accelerator to the table: per budget, each accelerator's best run within it, its speedup
at equal quality over plain sampling and the best Morse configuration against the best peer, with intervals.

A run's LSD is what it spent (measured); at a budget B an accelerator is represented by its best run (lowest
metric value) with LSD <= B, and the speedup at equal quality is the LSD the other curve needs for that run's
value over the run's own LSD (``distribution.speedup_with_ci``: interpolated on the other curve, per bootstrap
replicate for the interval, "not separable" inside the metric's noise band, bounds outside the curve's range).
"""
from __future__ import annotations

from .distribution import average_speedup, separated, speedup_with_ci

BUDGETS = (4, 6, 8, 12, 16, 24, 32, 50)
TOLERANCE = 1.02  # a run that spent up to 2% more than a budget still counts for it (N is measured, it moves)


def best_within(runs: list, budget: float, metric: str):
    """The run (a dict with "lsd" and the metric's point) with the lowest value within ``budget``, or None."""
    inside = [r for r in runs if r["lsd"] <= budget * TOLERANCE and metric in r]
    return min(inside, key=lambda r: r[metric]["value"]) if inside else None


def curve(runs: list, metric: str) -> list:
    """The accelerator's points by budget (its best run within each), as a curve another is measured against."""
    pts, seen = [], set()
    for b in BUDGETS:
        r = best_within(runs, b, metric)
        if r is not None and id(r) not in seen:
            seen.add(id(r))
            pts.append(r[metric])
    return pts


def accelerator_table(plain: list, runs_by_name: dict, band, metric: str, level: float = 0.9) -> dict:
    """{name: {"budgets": [{budget, run, speedup...}], "average": ...}} over plain sampling."""
    plain_pts = [r[metric] for r in plain if metric in r]
    out = {}
    for name, runs in runs_by_name.items():
        rows = []
        for b in BUDGETS:
            r = best_within(runs, b, metric)
            if r is None:
                continue
            sp = speedup_with_ci(plain_pts, r[metric], band, level)
            rows.append({"budget": b, "setting": r["setting"], "steps": r["steps"], "lsd": r["lsd"],
                         "value": r[metric]["value"], "lo_value": r[metric]["lo"], "hi_value": r[metric]["hi"], **sp})
        out[name] = {"budgets": rows, "average": average_speedup(rows, level) if rows else None}
    return out


def morse_against_peers(runs_by_name: dict, families: dict, band, metric: str, level: float = 0.9,
                        best_peer=None) -> dict:
    """Per budget: the best Morse run and the best peer run within it (lowest value), whether Morse is at least
    as good beyond the noise (not worse, or worse but not separated by the paired bootstrap), and the speedup at
    equal quality of Morse's curve over the best peer's curve (``best_peer``: the peer with the highest average
    speedup over plain; each budget's best run of each)."""
    morse = [r for n, runs in runs_by_name.items() if families[n] == "morse" for r in runs]
    peers = {n: runs for n, runs in runs_by_name.items() if families[n] == "peer"}
    rows = []
    for b in BUDGETS:
        m = best_within(morse, b, metric)
        if m is None:
            continue
        row = {"budget": b, "morse": _ref(m), "peers": {}}
        for name, runs in peers.items():
            p = best_within(runs, b, metric)
            if p is None:
                continue
            worse = m[metric]["value"] > p[metric]["value"]
            row["peers"][name] = {**_ref(p), "morse_at_least_as_good": not (worse and separated(m[metric], p[metric], level))}
        row["morse_ahead_of_all"] = all(v["morse_at_least_as_good"] for v in row["peers"].values())
        rows.append(row)
    over_peer = []
    if best_peer:
        peer_curve = curve(peers[best_peer], metric)
        for b in BUDGETS:
            m = best_within(morse, b, metric)
            if m is not None:
                over_peer.append({"budget": b, **speedup_with_ci(peer_curve, m[metric], band, level)})
    return {"budgets": rows, "best_peer": best_peer, "over_best_peer": over_peer,
            "over_best_peer_average": average_speedup(over_peer, level) if over_peer else None}


def _ref(run: dict) -> dict:
    return {"name": run["name"], "setting": run["setting"], "steps": run["steps"], "lsd": run["lsd"]}
