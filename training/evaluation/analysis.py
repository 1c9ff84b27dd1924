"""From run records to the report's numbers: every metric with its interval, the noise bands, the best
pattern per fill and budget, and the speedups at equal quality where the metric separates the runs.

Metrics (lower is better except ``label``):

* ``fd_dash``: Frechet distance of classifier features to the Dash's own converged distribution (a
  many-step run from independent noise). What the paper's "lossless" means: the same distribution
  as Dash, not as the data.
* ``fd_data``: the same against the held-out digits (the test split).
* ``rmse``: trajectory error to a many-step run from the same noise (deterministic samplers only).
* ``label``: the share of samples the classifier labels as the requested digit (fidelity; no speedup).
"""
from __future__ import annotations

import math


import numpy as np

from .distribution import (NOT_SEPARABLE, ReferenceStats, above_band, average_speedup, bootstrap_indices, fd_with_ci,
                           label_share, noise_band, separated, speedup_with_ci, strip_private)
from .records import RunRecord

METRICS = {
    "fd_dash": "FD to the Dash's converged distribution",
    "fd_data": "FD to the held-out digits",
    "rmse": "trajectory RMSE to a many-step run",
    "label": "share labelled as the requested digit",
}
SPEEDUP_METRICS = ("fd_dash", "fd_data", "rmse")


class Scorer:
    """Scores a record on every metric with one set of paired bootstrap rows per sample count."""

    def __init__(self, dash_ref, data_ref, labels, replicates: int, seed: int, level: float = 0.9):
        self.dash_ref = ReferenceStats.from_features(dash_ref)
        self.data_ref = ReferenceStats.from_features(data_ref)
        self.labels = np.asarray(labels)
        self.replicates, self.seed, self.level = replicates, seed, level
        self._idx = {}

    def idx(self, n: int) -> np.ndarray:
        if n not in self._idx:
            self._idx[n] = bootstrap_indices(n, self.replicates, self.seed)
        return self._idx[n]

    def score(self, rec: RunRecord) -> dict:
        feats = rec.features.double().numpy()
        idx = self.idx(len(feats))
        out = {"fd_dash": fd_with_ci(feats, self.dash_ref, idx, self.level),
               "fd_data": fd_with_ci(feats, self.data_ref, idx, self.level)}
        if rec.predicted is not None:
            out["label"] = label_share(rec.predicted.numpy(), self.labels[: len(rec.predicted)], self.level)
        if rec.sq_error is not None:
            sq = rec.sq_error.double().numpy()
            boot = np.sqrt(sq[self.idx(len(sq))].mean(axis=1))
            value = math.sqrt(sq.mean())
            shift = value - float(np.median(boot))
            lo, hi = np.percentile(boot, [50 * (1 - self.level), 50 * (1 + self.level)]) + shift
            out["rmse"] = {"value": value, "lo": float(lo), "hi": float(hi), "_boot": boot}
        for point in out.values():
            point["lsd"] = rec.lsd
        return out

    def bands(self, dash_a, dash_b, data_a, data_b) -> dict:
        """The noise of each distribution metric at the runs' n: two disjoint converged sets against the Dash
        reference; two disjoint train-split subsets against the test split."""
        return {
            "fd_dash": noise_band(dash_a, dash_b, self.dash_ref, self.idx(len(dash_a)), self.level),
            "fd_data": noise_band(data_a, data_b, self.data_ref, self.idx(len(data_a)), self.level),
            "rmse": {"band": [0.0, 0.0], "floor": 0.0, "note": "the reference run itself"},
        }


def _row(rec: RunRecord, scores: dict) -> dict:
    return {"fill": rec.fill, "pattern": rec.pattern, "budget": rec.budget, "steps": rec.steps, "lsd": rec.lsd,
            "dash_steps": rec.dash_steps, "fill_steps": rec.fill_steps, "fallback_calls": rec.fallback_calls,
            "seconds": rec.seconds, **_chosen(rec), **{m: scores[m] for m in scores}}


def _chosen(rec: RunRecord) -> dict:
    """What an "auto" run's planner chose (pattern, measured or rule, why); nothing for a fixed pattern."""
    chosen = (rec.extra or {}).get("chosen")
    return {"chosen": chosen} if chosen else {}


def sampler_analysis(plain: list, fills: dict, bands: dict, deterministic: bool, level: float = 0.9) -> dict:
    """``plain``: [(record, scores)] by step count; ``fills``: {fill: [(record, scores)]} over patterns and budgets."""
    metrics = [m for m in SPEEDUP_METRICS if deterministic or m != "rmse"] + ["label"]
    out = {"plain": [_row(r, s) for r, s in sorted(plain, key=lambda p: p[0].lsd)], "fills": {}}
    for name, runs in fills.items():
        block = {"runs": [_row(r, s) for r, s in runs], "best": {}, "speedup": {}, "average": {}}
        for metric in metrics:
            plain_pts = [s[metric] for _, s in sorted(plain, key=lambda p: p[0].lsd) if metric in s]
            best_rows, speed_rows = [], []
            for budget in sorted({r.budget for r, _ in runs}):
                cands = [(r, s) for r, s in runs if r.budget == budget and metric in s]
                if not cands:
                    continue
                sign = -1 if metric == "label" else 1  # the label share: higher is better
                r, s = min(cands, key=lambda c: sign * c[1][metric]["value"])
                best_rows.append({"budget": budget, "pattern": r.pattern, "steps": r.steps, "lsd": r.lsd, **_chosen(r),
                                  **{k: v for k, v in s[metric].items()}})
                if metric not in SPEEDUP_METRICS:
                    continue
                sp = speedup_with_ci(plain_pts, s[metric], bands[metric]["band"], level) if plain_pts else None
                if sp is not None:
                    speed_rows.append({"budget": budget, "pattern": r.pattern, **sp})
            block["best"][metric] = best_rows
            block["speedup"][metric] = speed_rows
            if metric in SPEEDUP_METRICS:
                block["average"][metric] = average_speedup(speed_rows, level) if speed_rows else None
        out["fills"][name] = block
    out["plain_improves"] = plain_improvement(out["plain"], bands, [m for m in metrics if m in SPEEDUP_METRICS], level)
    return out


def plain_improvement(plain_rows: list, bands: dict, metrics, level: float) -> dict:
    """Does the plain sampler's curve improve with steps beyond the noise? Cheapest run against the best one."""
    out = {}
    for metric in metrics:
        pts = [r[metric] for r in plain_rows if metric in r]
        if len(pts) < 2:
            continue
        first, best = pts[0], min(pts, key=lambda p: p["value"])
        out[metric] = {"from_lsd": first["lsd"], "from": first["value"], "best_lsd": best["lsd"], "best": best["value"],
                       "separated": best is not first and separated(first, best, level),
                       "cheapest_above_band": above_band(first, bands[metric]["band"])}
    return out


def json_ready(obj):
    """The report without bootstrap arrays, with numpy scalars as floats."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in strip_private(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


__all__ = ["METRICS", "NOT_SEPARABLE", "Scorer", "json_ready", "sampler_analysis"]
