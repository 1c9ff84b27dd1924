"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers";
Shenyi-Z/TaylorSeer ``TaylorSeer-FLUX``, and philipy1219/ComfyUI-TaylorSeer).

Full steps: the first ``first_enhance`` steps, then every ``fresh_threshold``-th (0, 1, 2, 8, 14, ... with the
defaults). At each full step the cached features' derivatives are updated by backward differences in the step
index, ``F[i+1] = (F[i] - F_prev[i]) / (s - s_prev)`` up to ``max_order``; a step between full steps is served
by the Taylor expansion ``sum_i F[i] (k - s)^i / i!`` from the last full step s. Defaults are the authors' (their
``cache_init``): interval 6, order 1, three first steps; the ComfyUI node's order is 2.

What is expanded here is the residual all the blocks add (one feature), where the authors expand every block's
attention and MLP outputs before their gates: the same where the gates do not move between the steps; the
model's embeddings and head run on every step, as in the original.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..dit_fills import RESIDUAL, DiTBlocks
from ..errors import ScheduleError
from ..schedules import ScheduleSpec
from .cached_blocks import CachedBlocksFiller

DEFAULT_INTERVAL, DEFAULT_ORDER, DEFAULT_FIRST = 6, 1, 3


@dataclass(frozen=True)
class TaylorSeerSchedule(ScheduleSpec):
    """Full (Dash) steps: the first ``first_enhance``, then every ``fresh_threshold``-th."""

    fresh_threshold: int = DEFAULT_INTERVAL
    first_enhance: int = DEFAULT_FIRST

    def __post_init__(self):
        super().__post_init__()
        for name in ("fresh_threshold", "first_enhance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ScheduleError(f"{name} must be a whole number >= 1 (got {v!r})")

    def _base(self, steps):
        flags, counter = [], 0
        for i in range(steps):
            full = i < self.first_enhance or counter == self.fresh_threshold - 1
            counter = 0 if full else counter + 1
            flags.append(full)
        return flags

    def describe(self):
        return f"TaylorSeer (interval {self.fresh_threshold}, first {self.first_enhance})"


def taylor_factors(calls, order: int) -> list:
    """[F, F', F'', ...] at the newest of ``calls`` ((step, feature), newest first), by TaylorSeer's recursive
    backward differences in the step index, to ``order`` or as far as the calls allow."""
    steps, feats = [s for s, _ in calls], [f for _, f in calls]
    factors = [feats[0]]
    levels = [list(feats)]  # levels[i][j]: the i-th difference at call j
    for i in range(1, min(order, len(calls) - 1) + 1):
        prev = levels[-1]
        level = [(prev[j] - prev[j + 1]) / (steps[j] - steps[j + 1]) for j in range(len(prev) - 1)]
        levels.append(level)
        factors.append(level[0])
    return factors


def taylor_residual(order: int):
    def predict(anchor, t, step):
        calls = [(anchor.step, anchor.features[RESIDUAL])]
        calls += [(c.step, c.features[RESIDUAL]) for c in anchor.earlier if c.features and c.step is not None]
        factors = taylor_factors(calls, order)
        x = step - anchor.step
        return sum(f * (x ** i / math.factorial(i)) for i, f in enumerate(factors))

    return predict


def taylorseer(blocks: DiTBlocks, max_order: int = DEFAULT_ORDER, fresh_threshold: int = DEFAULT_INTERVAL,
               first_enhance: int = DEFAULT_FIRST):
    """(schedule, fill) of TaylorSeer on a DiT."""
    if max_order not in (1, 2):
        raise ScheduleError(f"max_order must be 1 or 2 (got {max_order!r})")
    fill = CachedBlocksFiller(blocks, f"taylorseer{max_order}", 0, None, predict=taylor_residual(max_order),
                              history=max_order)
    return TaylorSeerSchedule(fresh_threshold=fresh_threshold, first_enhance=first_enhance), fill
