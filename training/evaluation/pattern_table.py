"""A fill's measured pattern table from an evaluation report, and the planner's rule next to it.

The table, ``{sampler: [[budget, pattern], ...]}``, is what a Dot file can carry for the budget planner
(``morse_engine.pattern_choice.choose_pattern``); ``python -m training.pattern_table`` writes it.
"""
from __future__ import annotations

from typing import Optional

from morse_engine import MorseError, choose_pattern
from morse_engine.pattern_choice import MAX_FILLS, fills_of

from .workload import TRAINING_FREE_N

DEFAULT_METRIC = "fd_dash"  # the distribution metric: "lossless" means Dash's own distribution
FALLBACK_METRIC = "rmse"
LOWER_IS_BETTER = ("fd_dash", "fd_data", "rmse")


def _fixed(pattern) -> bool:
    try:
        fills_of(pattern)
        return True
    except MorseError:
        return False  # "auto" runs are the planner's own choice, not a candidate


def _best(runs: list, metric: str) -> Optional[dict]:
    scored = [r for r in runs if isinstance(r.get(metric), dict)]
    return min(scored, key=lambda r: (r[metric]["value"], len(r["pattern"]))) if scored else None


def _decide(at: list, metric: str, fallback: Optional[str], band_top: float) -> tuple[Optional[dict], Optional[str]]:
    """(the best run among ``at``, the metric that decided)."""
    best = _best(at, metric)
    if fallback and (best is None or best[metric]["lo"] <= band_top):
        other = _best(at, fallback)
        if other is not None:
            return other, fallback
    return best, metric if best is not None else None


def _decisions(report: dict, fill: str, metric: str, fallback: Optional[str]):
    if metric not in LOWER_IS_BETTER or (fallback is not None and fallback not in LOWER_IS_BETTER):
        raise ValueError(f"metric {metric!r} / fallback {fallback!r}: choose from {list(LOWER_IS_BETTER)}")
    band_top = report.get("bands", {}).get(metric, {}).get("band", [float("-inf")] * 2)[1]
    found = False
    for sampler, block in report.get("samplers", {}).items():
        runs = [r for r in block.get("fills", {}).get(fill, {}).get("runs", []) if _fixed(r.get("pattern"))]
        for budget in sorted({r["budget"] for r in runs}):
            at = [r for r in runs if r["budget"] == budget]
            best, used = _decide(at, metric, fallback, band_top)
            if best is not None:
                found = True
                yield sampler, float(budget), best, used, at
    if not found:
        fills = sorted({f for b in report.get("samplers", {}).values() for f in b.get("fills", {})})
        raise ValueError(f"the report has no runs of the fill {fill!r} with a fixed pattern; its fills are {fills}")


def pattern_table_from_report(report: dict, fill: str = "dot", metric: str = DEFAULT_METRIC,
                              fallback: Optional[str] = FALLBACK_METRIC) -> dict:
    """Per sampler and budget, the pattern ``"D" + "." * f`` whose run of ``fill`` scored best on ``metric``.

    Where ``metric`` cannot tell that best run from the Dash's converged distribution (its interval is not wholly
    above the metric's noise band, ``report["bands"][metric]``), the patterns are equal on it and ``fallback``
    decides (trajectory RMSE; deterministic samplers only) where the report has it: on the published run FD
    separates only the 4-LSD budget, so without this the table above 4 LSD would be the FD estimator's noise.
    Samplers without runs of ``fill`` are left out (the planner's rule serves them)."""
    table = {}
    for sampler, budget, best, _, _ in _decisions(report, fill, metric, fallback):
        table.setdefault(sampler, []).append([budget, best["pattern"]])
    return table


def fill_speed(report: dict, fill: str) -> float:
    """The fill's N as the report measured it; a free fill is planned as (almost) free, as the evaluation does."""
    n = report.get("fills", {}).get(fill, {}).get("n")
    return float(n) if n else TRAINING_FREE_N


def rule_against_report(report: dict, fill: str = "dot", metric: str = DEFAULT_METRIC,
                        fallback: Optional[str] = FALLBACK_METRIC, max_fills: int = MAX_FILLS) -> list[dict]:
    """Each measured row of :func:`pattern_table_from_report` next to the planner's rule there (given no table):
    the deciding metric's value for both, and whether the rule's pattern is within the best one's interval
    (its interval's low end at or below the best's high end). A rule's pattern the report did not run has no value."""
    n_speed = fill_speed(report, fill)
    rows = []
    for sampler, budget, best, used, at in _decisions(report, fill, metric, fallback):
        rule = choose_pattern(budget, n_speed, sampler, None, max_fills).pattern
        mine = next((r for r in at if r["pattern"] == rule and isinstance(r.get(used), dict)), None)
        rows.append({"sampler": sampler, "budget": budget, "measured": best["pattern"], "rule": rule, "metric": used,
                     "measured_value": best[used]["value"], "rule_value": mine[used]["value"] if mine else None,
                     "within": mine is not None and mine[used]["lo"] <= best[used]["hi"]})
    return rows
