"""MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache"; Zehong-Ma/MagCache
``MagCache4FLUX``, and its ComfyUI node).

Calibrated once per model (:func:`magnitude_ratios`): in one full run, the residual all blocks add (their output
minus their input) is recorded at every step, and the step's *magnitude ratio* is the mean over tokens of
``||r_t|| / ||r_{t-1}||`` (1 at the first step). At sampling, from step ``int(retention_ratio * steps + 0.5)`` on,
each step multiplies the ratio into a running product, adds ``|1 - product|`` to an error sum and counts itself;
while the error stays within ``magcache_thresh`` and at most ``magcache_K`` steps have been skipped in a row, the
step skips every block and adds the last computed step's residual as it is; otherwise it is computed and the
three sums restart. The ratios are taken to another step count by nearest index (the authors' ``nearest_interp``).
Defaults are the authors' for Flux: threshold 0.24, retention 0.1, K 5 (their Flux script also always computes
step 11 of 28, a rule calibrated for Flux and left out here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..adaptive import DecidedSchedule
from ..dit_fills import DiTBlocks
from ..errors import ScheduleError
from ..schedules import ScheduleSpec, _check_steps
from .cached_blocks import CachedBlocksFiller

DEFAULT_THRESHOLD, DEFAULT_RETENTION, DEFAULT_K = 0.24, 0.1, 5


def magnitude_ratio(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """The mean over tokens (and batch) of ||r_t|| / ||r_{t-1}||, norms over the last axis."""
    return float((residual.norm(dim=-1) / previous.norm(dim=-1)).mean())


def magnitude_ratios(residuals: Sequence[torch.Tensor]) -> tuple:
    """The calibration table from one full run's residuals of all blocks, in step order: [1, r1/r0, r2/r1, ...]."""
    return (1.0, *(magnitude_ratio(r, p) for p, r in zip(residuals, residuals[1:])))


def nearest_interp(ratios: Sequence[float], steps: int) -> list:
    """The table taken to ``steps`` steps by nearest index, ``round(i * (L - 1) / (steps - 1))``."""
    n = len(ratios)
    if steps == 1:
        return [ratios[-1]]
    return [ratios[int(round(i * (n - 1) / (steps - 1)))] for i in range(steps)]


@dataclass(frozen=True)
class MagCache(ScheduleSpec):
    adaptive = True
    ratios: tuple = ()
    magcache_thresh: float = DEFAULT_THRESHOLD
    retention_ratio: float = DEFAULT_RETENTION
    magcache_K: int = DEFAULT_K

    def __post_init__(self):
        super().__post_init__()
        if len(self.ratios) < 2:
            raise ScheduleError("MagCache needs the model's calibrated magnitude ratios (magnitude_ratios of a full "
                                "run); calibrate it first")
        if not 0 <= self.retention_ratio <= 1:
            raise ScheduleError(f"retention_ratio must be in [0, 1] (got {self.retention_ratio!r}); the authors' "
                                f"Flux default is {DEFAULT_RETENTION}")
        if not isinstance(self.magcache_K, int) or self.magcache_K < 0:
            raise ScheduleError(f"magcache_K must be a whole number >= 0 (got {self.magcache_K!r})")

    def resolve(self, steps: int, percent_to_sigma=None, sigmas=None) -> "MagCacheSchedule":
        return MagCacheSchedule(self, _check_steps(steps))

    def describe(self) -> str:
        return f"MagCache (threshold {self.magcache_thresh:g}, retention {self.retention_ratio:g}, K {self.magcache_K})"


class MagCacheSchedule(DecidedSchedule):
    def __init__(self, spec: MagCache, steps: int):
        super().__init__(steps)
        self.spec = spec
        self.ratios = nearest_interp(spec.ratios, steps)
        self.retained = int(spec.retention_ratio * steps + 0.5)
        self.product, self.skipped, self.error = 1.0, 0, 0.0

    def _gate(self, step, sigma, x):
        if step == 0 or step < self.retained:
            return True, "retention"
        self.product *= self.ratios[step]
        self.skipped += 1
        self.error += abs(1 - self.product)
        if self.error <= self.spec.magcache_thresh and self.skipped <= self.spec.magcache_K:
            return False, f"error {self.error:.3f} <= {self.spec.magcache_thresh:g}"
        why = (f"error {self.error:.3f} > {self.spec.magcache_thresh:g}" if self.error > self.spec.magcache_thresh
               else f"{self.spec.magcache_K} skipped in a row")
        self.product, self.skipped, self.error = 1.0, 0, 0.0
        return True, why


def magcache_fill(blocks: DiTBlocks) -> CachedBlocksFiller:
    return CachedBlocksFiller(blocks, "magcache", 0, None)


def magcache(blocks: DiTBlocks, ratios, magcache_thresh=DEFAULT_THRESHOLD, retention_ratio=DEFAULT_RETENTION,
             magcache_K=DEFAULT_K):
    """(schedule, fill) of MagCache on a DiT with its calibrated ``ratios``."""
    return MagCache(ratios=tuple(float(r) for r in ratios), magcache_thresh=magcache_thresh,
                    retention_ratio=retention_ratio, magcache_K=magcache_K), magcache_fill(blocks)
