"""TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"), as its
ComfyUI port runs it on Flux (welltop-cn/ComfyUI-TeaCache ``nodes.py``; the authors' ``TeaCache4FLUX``).

Signal: the first double block's modulated input, ``(1 + scale) * norm1(img) + shift`` with the block's own
modulation of the time vector, compared with the previous step's (every step, skipped ones included) by its
relative L1 change ``mean |a - b| / mean |b|``; the change is rescaled by a polynomial fitted per model and its
absolute value accumulated. Below ``rel_l1_thresh`` the step skips every block and adds the residual all blocks
added on the last computed step (the model's embeddings and head still run); at or above it the step is computed
and the sum restarts. The first step is always computed; the port forces no last step (the authors' script does).

Defaults are the port's for Flux: ``rel_l1_thresh`` 0.4 (its README: ~2x on Flux-dev), the whole run (start 0,
end 1), the Flux coefficients. A model without published coefficients gets its own, fitted as the authors fit
theirs (:func:`fit_coefficients`: ``np.polyfit(x, y, 4)`` over every consecutive pair of steps of full runs, x the
input's relative change, y the output's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..adaptive import ProbingSchedule
from ..dit_fills import DiTBlocks
from ..errors import MorseError, ScheduleError
from ..schedules import ScheduleSpec, _check_steps
from .cached_blocks import SIGNAL, CachedBlocksFiller, relative_l1

#: TeaCache's Flux polynomial, highest power first (TeaCache4FLUX/teacache_flux.py and the ComfyUI port)
FLUX_COEFFICIENTS = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)
DEFAULT_THRESHOLD = 0.4  # the ComfyUI port's default for Flux


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """``np.poly1d(coefficients)(x)``: highest power first."""
    value = 0.0
    for c in coefficients:
        value = value * x + float(c)
    return value


def fit_coefficients(x: Sequence[float], y: Sequence[float], degree: int = 4) -> tuple:
    """The least-squares polynomial through (x, y), highest power first (``np.polyfit(x, y, degree)``)."""
    xs = torch.tensor(list(x), dtype=torch.float64)
    ys = torch.tensor(list(y), dtype=torch.float64)
    if xs.numel() <= degree:
        raise MorseError(f"fitting a degree-{degree} polynomial needs more than {degree} points (got {xs.numel()})")
    vander = torch.stack([xs ** p for p in range(degree, -1, -1)], dim=1)
    return tuple(float(c) for c in torch.linalg.lstsq(vander, ys[:, None]).solution[:, 0])


def modulated_input(block: torch.nn.Module):
    """TeaCache's signal of a Flux-layout double block: ``(1 + scale) * img_norm1(img) + shift`` with the block's
    first modulation of ``vec`` (ComfyUI's Flux returns ``ModulationOut`` pairs, the reference DiT plain chunks)."""
    if block is None or not hasattr(block, "img_mod") or not hasattr(block, "img_norm1"):
        raise MorseError("TeaCache's signal needs a Flux-layout first block (img_mod, img_norm1): Flux, Chroma or "
                         "the reference DiT; this model has another layout")

    def signal(args, out):
        mod = block.img_mod(args["vec"])
        first = mod[0]
        shift, scale = (first.shift, first.scale) if hasattr(first, "shift") else (mod[0], mod[1])
        return (1 + scale) * block.img_norm1(args["img"]) + shift

    return signal


@dataclass(frozen=True)
class TeaCache(ScheduleSpec):
    """TeaCache's decision at ``rel_l1_thresh`` with these polynomial ``coefficients``."""

    adaptive = True
    rel_l1_thresh: float = DEFAULT_THRESHOLD
    coefficients: tuple = FLUX_COEFFICIENTS

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rel_l1_thresh, (int, float)) or isinstance(self.rel_l1_thresh, bool) \
                or not self.rel_l1_thresh >= 0:
            raise ScheduleError(f"rel_l1_thresh must be a number >= 0 (got {self.rel_l1_thresh!r}); the port's "
                                f"default is {DEFAULT_THRESHOLD}")

    def resolve(self, steps: int, percent_to_sigma=None, sigmas=None) -> "TeaCacheSchedule":
        return TeaCacheSchedule(self, _check_steps(steps))

    def describe(self) -> str:
        return f"TeaCache (rel_l1_thresh {self.rel_l1_thresh:g})"


class TeaCacheSchedule(ProbingSchedule):
    def __init__(self, spec: TeaCache, steps: int):
        super().__init__(steps)
        self.spec = spec
        self.previous: Optional[torch.Tensor] = None
        self.accumulated = 0.0

    def _forced(self, step, sigma):
        if step == 0 or self.previous is None:
            self.accumulated = 0.0
            return "first step"
        return ""

    def _judge(self, step, signal):
        change = abs(polynomial(self.spec.coefficients, relative_l1(signal, self.previous)))
        self.previous = signal
        self.accumulated += change
        if self.accumulated < self.spec.rel_l1_thresh:
            return False, f"change {self.accumulated:.3f} < {self.spec.rel_l1_thresh:g}"
        why = f"change {self.accumulated:.3f} >= {self.spec.rel_l1_thresh:g}"
        self.accumulated = 0.0
        return True, why

    def observe(self, x, out, whole_out=None, features=None):
        if features and SIGNAL in features:  # every computed step's modulated input is the next one's reference
            self.previous = features[SIGNAL]


def teacache_fill(blocks: DiTBlocks) -> CachedBlocksFiller:
    """Every block skipped, the last computed step's residual of all of them added; the modulated input reported."""
    return CachedBlocksFiller(blocks, "teacache", 0, None, signal=modulated_input(getattr(blocks, "first_block", None)))


def teacache(blocks: DiTBlocks, rel_l1_thresh: float = DEFAULT_THRESHOLD, coefficients=FLUX_COEFFICIENTS):
    """(schedule, fill) of TeaCache on a Flux-layout DiT."""
    return TeaCache(rel_l1_thresh=rel_l1_thresh, coefficients=tuple(coefficients)), teacache_fill(blocks)
