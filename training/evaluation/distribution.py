"""Distribution metric with measured noise: Frechet distance (FD), its confidence interval,
the estimator's noise band, and speedups at equal quality only where the metric separates.

Why each piece exists:

* ``ReferenceStats`` / ``fd``: the reference distribution (the Dash's converged samples, or
  held-out data) is fixed, so its mean and covariance are summarised once and every run is
  compared against the same statistics.
* ``bootstrap_indices``: every run starts sample k from the same noise, so the SAME resampling
  rows are applied to every run (a paired bootstrap). Per-run values stay noisy, but the
  difference between two runs in one replicate cancels most of the shared noise.
* ``fd_with_ci``: an FD without an interval cannot say whether two runs differ. The interval
  is the bootstrap percentile interval shifted by (value - bootstrap median): resampling with
  replacement duplicates samples and biases every replicate's FD upwards by about the
  estimator's own finite-n floor (large at D = 64), so the raw percentiles of a run near the
  floor can lie wholly above its own value. The shift keeps the width and skew and puts the
  interval around the value. The raw replicates are kept under ``"_boot"`` for paired
  comparisons (the bias cancels there); keys starting with "_" are dropped before JSON.
* ``noise_band``: the FD of a finite sample from the converged distribution is not 0. Two
  disjoint converged sets of n give its floor and spread at this n; a run whose interval does
  not clear the band is indistinguishable from converged, at this n.
* ``separated`` / ``above_band``: the two decisions the speedup rules need.
* ``speedup_with_ci`` / ``average_speedup``: the paper's speedup at equal quality
  (``morse_engine.speedup.baseline_lsd_for``) with a per-replicate interval and a status that
  says when the number means nothing (see ``speedup_with_ci``).
* ``label_share``: class-conditional runs are also checked by how often the classifier agrees
  with the requested label, with a Wilson interval (fine at shares near 0 or 1).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from morse_engine.speedup import baseline_lsd_for

from ..reference.classifier import feature_stats, frechet_distance_from_stats, psd_sqrt

NOT_SEPARABLE = "not separable at this n"


def _as_np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def strip_private(d: dict) -> dict:
    """Copy of ``d`` without keys starting with "_" (per-replicate arrays), ready for JSON."""
    return {k: v for k, v in d.items() if not str(k).startswith("_")}


@dataclass(frozen=True)
class ReferenceStats:
    mu: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats) -> "ReferenceStats":
        f = _as_np(feats)
        mu, cov = feature_stats(f)
        return cls(mu=mu, cov=cov, n=int(f.shape[0]))


def fd(feats, ref_mu, ref_cov) -> float:
    """FD between the Gaussian fitted to ``feats`` [n, D] and the reference (mu, cov)."""
    return frechet_distance_from_stats(*feature_stats(_as_np(feats)), ref_mu, ref_cov)


def fd_replicates(f: np.ndarray, ref: ReferenceStats, boot_idx: np.ndarray, block: int = 32) -> np.ndarray:
    """FD of every bootstrap resample ``f[row]`` against ``ref``, batched (one Python loop per block of rows,
    not per row: a full evaluation scores ~10^5 resamples). tr((S S_ref)^1/2) is taken as the eigenvalues of
    S_ref^1/2 S S_ref^1/2, the same spectrum as ``frechet_distance_from_stats`` uses, with the fixed
    reference's square root computed once."""
    root = psd_sqrt(ref.cov)
    out = []
    for start in range(0, len(boot_idx), block):
        x = f[boot_idx[start:start + block]]  # [B, n, D]
        mu = x.mean(axis=1)
        xc = x - mu[:, None, :]
        cov = xc.transpose(0, 2, 1) @ xc / (x.shape[1] - 1)
        mid = root @ cov @ root
        tr_mean = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.transpose(0, 2, 1)) / 2), 0, None)).sum(-1)
        diff = mu - ref.mu
        value = (diff * diff).sum(-1) + np.trace(cov, axis1=1, axis2=2) + np.trace(ref.cov) - 2 * tr_mean
        out.append(np.maximum(value, 0.0))
    return np.concatenate(out)


def bootstrap_indices(n: int, replicates: int, seed: int) -> np.ndarray:
    """[replicates, n] indices drawn with replacement; reuse the same rows for every run."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [a, 1.0 - a])
    return float(lo), float(hi)


def _boot(point: dict) -> np.ndarray:
    b = point.get("_boot", point.get("boot"))
    if b is None:
        raise KeyError("point has no bootstrap replicates ('_boot'); build it with fd_with_ci")
    return np.asarray(b, dtype=np.float64)


def fd_with_ci(feats, ref: ReferenceStats, boot_idx: np.ndarray, level: float = 0.9) -> dict:
    """{"value", "lo", "hi", "level", "_boot"}: FD of all samples and its bootstrap interval."""
    f = _as_np(feats)
    boot_idx = np.asarray(boot_idx)
    if boot_idx.ndim != 2 or boot_idx.max(initial=-1) >= f.shape[0]:
        raise ValueError(f"boot_idx {list(boot_idx.shape)} does not index {f.shape[0]} samples")
    value = fd(f, ref.mu, ref.cov)
    boot = fd_replicates(f, ref, boot_idx)
    q_lo, q_hi = _interval(boot, level)
    shift = float(np.median(boot)) - value  # the resampling bias, see the module docstring
    return {"value": value, "lo": max(q_lo - shift, 0.0), "hi": max(q_hi - shift, value),
            "level": level, "_boot": boot}


def noise_band(set_a, set_b, ref: ReferenceStats, boot_idx: np.ndarray, level: float = 0.9) -> dict:
    """The estimator's noise at this n, from two disjoint sets of n converged samples.

    floor = mean(fd(a), fd(b)); half_width = max(|fd(a) - fd(b)|, (hi_a - lo_a) / 2): the
    larger of the observed set-to-set difference and set_a's bootstrap half width, so the band
    covers both resampling noise and a fresh draw of noise seeds. band = floor -/+ half_width.
    fd_between is set_a against set_b's own statistics (no reference involved).
    """
    a, b = _as_np(set_a), _as_np(set_b)
    pa = fd_with_ci(a, ref, boot_idx, level)
    fd_b = fd(b, ref.mu, ref.cov)
    floor = (pa["value"] + fd_b) / 2.0
    half = max(abs(pa["value"] - fd_b), (pa["hi"] - pa["lo"]) / 2.0)
    return {"value": [pa["value"], fd_b], "floor": floor, "spread": half,
            "band": [floor - half, floor + half], "lo": pa["lo"], "hi": pa["hi"], "level": level,
            "fd_between": frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))}


def _band_upper(band) -> float:
    if isinstance(band, dict):
        band = band["band"]
    return float(band[1])


def above_band(point: dict, band) -> bool:
    """True when the point's whole interval lies above the band (a dict from noise_band or [lo, hi])."""
    return point["lo"] > _band_upper(band)


def separated(point_a: dict, point_b: dict, level: float = 0.9) -> bool:
    """Whether the paired bootstrap differences a - b have an interval excluding 0.

    Both points must come from fd_with_ci with the same boot_idx (same resampling rows)."""
    da, db = _boot(point_a), _boot(point_b)
    if da.shape != db.shape:
        raise ValueError("points were bootstrapped with different boot_idx; pair them first")
    lo, hi = _interval(da - db, level)
    return lo > 0 or hi < 0


def speedup_with_ci(plain: list[dict], point: dict, band, level: float = 0.9) -> dict:
    """Speedup at equal quality of one accelerated ``point`` over the ``plain`` curve.

    Lower values are better. baseline LSD = LSD the plain curve (running minimum over increasing
    LSD, linearly interpolated: ``baseline_lsd_for``) needs for the point's value; speedup =
    baseline LSD / point LSD. Per replicate r the same is done with plain's r-th bootstrap values
    against the point's r-th, giving the interval. Status, checked in this order:

    * "not separable at this n": the point's interval does not clear the noise band, so the
      metric cannot tell which plain budget reaches it; speedup/lo/hi are None.
    * "upper bound": worse than every plain point (plain's cheapest point is already better);
      speedup = plain's smallest LSD / point LSD, hi = speedup, lo None (plain might need less).
    * "lower bound": better than every plain point beyond noise (lower value and ``separated``
      from each); speedup = plain's largest LSD / point LSD, lo = speedup, hi None.
    * "separable": otherwise (within plain's measured range, given the noise); interpolated
      speedup with the per-replicate interval, kept under "_boot" for ``average_speedup``.
    """
    lsd = float(point["lsd"])
    curve = [(float(p["lsd"]), float(p["value"])) for p in plain]
    row = {"lsd": lsd, "value": float(point["value"]), "speedup": None, "lo": None, "hi": None}
    if not above_band(point, band):
        return {**row, "status": NOT_SEPARABLE, "baseline_lsd": None}
    base, bound = baseline_lsd_for(float(point["value"]), curve)
    row["baseline_lsd"] = base
    if bound == "upper":
        return {**row, "status": "upper bound", "speedup": base / lsd, "hi": base / lsd}
    if all(point["value"] < p["value"] and separated(point, p, level) for p in plain):
        base = max(c[0] for c in curve)
        return {**row, "status": "lower bound", "baseline_lsd": base, "speedup": base / lsd,
                "lo": base / lsd}
    pb, plain_b = _boot(point), [_boot(p) for p in plain]
    reps = np.array([baseline_lsd_for(pb[r], [(c[0], b[r]) for c, b in zip(curve, plain_b)])[0]
                     for r in range(pb.shape[0])]) / lsd
    lo, hi = _interval(reps, level)
    s = base / lsd
    # like fd_with_ci: replicates need not centre on the full-sample estimate; keep it inside
    return {**row, "status": "separable", "speedup": s, "lo": min(lo, s), "hi": max(hi, s),
            "_boot": reps}


def average_speedup(rows: list[dict], level: float = 0.9) -> dict:
    """Mean speedup of the "separable" rows; interval from the per-replicate means.

    Bounds and non-separable rows are not averaged (they are not speedups); their counts are
    reported so a reader sees what was left out."""
    counts = dict(Counter(r["status"] for r in rows))
    sep = [r for r in rows if r["status"] == "separable"]
    if not sep:
        return {"speedup": None, "lo": None, "hi": None, "status": NOT_SEPARABLE,
                "n_separable": 0, "counts": counts}
    mean = float(np.mean([r["speedup"] for r in sep]))
    reps = np.mean(np.stack([_boot(r) for r in sep]), axis=0)
    lo, hi = _interval(reps, level)
    return {"speedup": mean, "lo": min(lo, mean), "hi": max(hi, mean), "status": "separable",
            "n_separable": len(sep), "counts": counts, "_boot": reps}


def label_share(logits_or_pred, labels, level: float = 0.9) -> dict:
    """Share of samples classified as their requested label, with a Wilson interval.

    ``logits_or_pred``: logits [n, C] (argmax taken) or predicted labels [n]; ``labels``: [n]
    or one int for all samples."""
    x = logits_or_pred.detach().cpu().numpy() if hasattr(logits_or_pred, "detach") \
        else np.asarray(logits_or_pred)
    pred = x.argmax(axis=1) if x.ndim == 2 else x.astype(np.int64)
    lab = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    n = int(pred.shape[0])
    if n == 0:
        raise ValueError("no samples to score")
    k = int((pred == np.broadcast_to(lab, pred.shape)).sum())
    p, z = k / n, NormalDist().inv_cdf(0.5 + level / 2.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the exact bounds at k = 0 or n are 0 and 1; round-off would otherwise leave 1 - 1e-16
    lo, hi = (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)
    return {"value": p, "lo": float(max(lo, 0.0)), "hi": float(min(hi, 1.0)),
            "n": n, "level": level}
