"""The paper's speedup at equal quality (Morse, section 3.1).

Quality is measured for the plain sampler at several step counts (its latency in LSD is
its step count) and for Morse at several LSD budgets. For each Morse point, the plain
sampler's curve is linearly interpolated to find the LSD it needs for the same quality;
speedup = that LSD / the Morse LSD. Lower quality values are better (FID, error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class SpeedupPoint:
    lsd: float
    quality: float
    baseline_lsd: float
    speedup: float
    bound: Optional[str] = None  # "lower": Morse beat every plain point; "upper": worse than all

    def to_dict(self) -> dict:
        d = {"lsd": self.lsd, "speedup": self.speedup, "quality": self.quality, "baseline_lsd": self.baseline_lsd}
        if self.bound:
            d["bound"] = self.bound
        return d


def _monotone(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sort by LSD and keep the best quality reached so far (more budget never hurts:
    a user with more budget can always spend less of it)."""
    out = []
    best = float("inf")
    for lsd, q in sorted(curve):
        best = min(best, q)
        out.append((float(lsd), best))
    return out


def baseline_lsd_for(quality: float, baseline: Sequence[tuple[float, float]]) -> tuple[float, Optional[str]]:
    """LSD the plain sampler needs to reach ``quality``, by linear interpolation."""
    curve = _monotone(baseline)
    if not curve:
        raise ValueError("the baseline curve is empty; measure the plain sampler at two or more step counts")
    if quality >= curve[0][1]:
        return curve[0][0], ("upper" if quality > curve[0][1] else None)
    for (l0, q0), (l1, q1) in zip(curve, curve[1:]):
        if q1 <= quality <= q0:
            if q0 == q1:
                return l0, None
            return l0 + (q0 - quality) / (q0 - q1) * (l1 - l0), None
    return curve[-1][0], "lower"


def speedup_curve(baseline: Sequence[tuple[float, float]], morse: Sequence[tuple[float, float]]) -> list[SpeedupPoint]:
    """Speedup of each Morse point (lsd, quality) over the baseline curve [(lsd, quality)].

    Where Morse is better than the plain sampler's best measured point, the speedup is a
    lower bound (the plain sampler never got there); where it is worse than the plain
    sampler's cheapest point, it is an upper bound. Both are flagged.
    """
    points = []
    for lsd, q in morse:
        base, bound = baseline_lsd_for(q, baseline)
        points.append(SpeedupPoint(float(lsd), float(q), base, base / float(lsd), bound))
    return points


def average_speedup(points: Sequence[SpeedupPoint]) -> float:
    if not points:
        raise ValueError("no speedup points to average; evaluate Morse at one budget or more")
    return sum(p.speedup for p in points) / len(points)
