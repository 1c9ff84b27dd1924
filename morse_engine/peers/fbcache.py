"""First Block Cache (WaveSpeed: chengzeyi/Comfy-WaveSpeed ``first_block_cache.py``, node "Apply First Block
Cache"; ParaAttention's FBCache).

Every step runs the first block. Its output (on Flux, the image stream leaving the first double block; on an SD
UNet, what the second input block adds to the first's output) is compared with the same signal of the last
*computed* step: ``mean |prev - cur| / mean |prev|``. Below ``residual_diff_threshold`` the rest of the model is
skipped and the residual it added on the last computed step is added to the first block's output (the model's
embeddings and head still run); otherwise the rest runs and the signal and residual are kept. The node's own
default threshold is 0, which disables it; its README gives 0.12 for Flux-dev at 28 steps and 0.2 for SDXL at
25 steps, the defaults here. The node's start / end (0, 1) and ``max_consecutive_cache_hits`` (-1: no cap) leave
every step to the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..adaptive import ProbingSchedule
from ..dit_fills import DiTBlocks
from ..errors import ScheduleError
from ..feature_fills import UNetBlocks, _FeatureFill
from ..schedules import ScheduleSpec, _check_steps
from .cached_blocks import SIGNAL, CachedBlocksFiller, relative_l1

DIT_THRESHOLD = 0.12  # WaveSpeed's README: flux-dev, 28 steps
UNET_THRESHOLD = 0.2  # WaveSpeed's README: sdxl_base, 25 steps


@dataclass(frozen=True)
class FirstBlockCache(ScheduleSpec):
    adaptive = True
    residual_diff_threshold: float = DIT_THRESHOLD

    def __post_init__(self):
        super().__post_init__()
        t = self.residual_diff_threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
            raise ScheduleError(f"residual_diff_threshold must be a number >= 0 (got {t!r}); WaveSpeed gives 0.12 "
                                "for Flux")

    def resolve(self, steps: int, percent_to_sigma=None, sigmas=None) -> "FirstBlockCacheSchedule":
        return FirstBlockCacheSchedule(self, _check_steps(steps))

    def describe(self) -> str:
        return f"First Block Cache (threshold {self.residual_diff_threshold:g})"


class FirstBlockCacheSchedule(ProbingSchedule):
    def __init__(self, spec: FirstBlockCache, steps: int):
        super().__init__(steps)
        self.spec = spec
        self.computed: Optional[torch.Tensor] = None  # the first block's signal on the last computed step

    def _forced(self, step, sigma):
        return "first step" if step == 0 or self.computed is None else ""

    def _judge(self, step, signal):
        if signal.shape != self.computed.shape:
            return True, "shape changed"
        diff = relative_l1(signal, self.computed)
        threshold = self.spec.residual_diff_threshold
        return (False, f"change {diff:.3f} < {threshold:g}") if diff < threshold else \
            (True, f"change {diff:.3f} >= {threshold:g}")

    def observe(self, x, out, whole_out=None, features=None):
        if features and SIGNAL in features:
            self.computed = features[SIGNAL]


def _first_block_output(args, out):
    """Flux's signal in WaveSpeed's Flux path: the image stream leaving the first double block (not a residual)."""
    return out["img"]


def dit_fill(blocks: DiTBlocks) -> CachedBlocksFiller:
    """The first block runs; blocks 1..n-1 are skipped and their residual on the last computed step added."""
    return CachedBlocksFiller(blocks, "fbcache", 1, None, signal=_first_block_output)


class UNetFirstBlockFiller(_FeatureFill):
    """WaveSpeed's SD UNet form: the first two input blocks run; the rest of the UNet is skipped and what it added
    to the second block's output on the last computed step (the last output block's output minus it) is added;
    the signal is what the second input block added to the first's output."""

    name = "fbcache"

    def capture_modules(self) -> dict:
        b = self.blocks
        return {"in0": b.input_blocks[0], "in1": b.input_blocks[1], "out": b.output_blocks[-1]}

    def probe(self, backbone_call, x, t, anchor, context, kwargs, sigma=None, step=None):
        f = anchor.features
        with torch.no_grad():
            state = self.blocks.prepare(x, t, context, kwargs)
            h0 = self.blocks.input(0, x, state)
            h1 = self.blocks.input(1, h0, state)
            return self.blocks.head(h1 + (f["out"] - f["in1"]), state, x), h1 - h0

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None, step=None):
        return self.probe(backbone_call, x, t, anchor, context, kwargs, sigma, step)[0]


class UNetFirstBlockSchedule(FirstBlockCacheSchedule):
    def observe(self, x, out, whole_out=None, features=None):
        if features and "in1" in features:
            self.computed = features["in1"] - features["in0"]


@dataclass(frozen=True)
class UNetFirstBlockCache(FirstBlockCache):
    residual_diff_threshold: float = UNET_THRESHOLD

    def resolve(self, steps: int, percent_to_sigma=None, sigmas=None) -> "UNetFirstBlockSchedule":
        return UNetFirstBlockSchedule(self, _check_steps(steps))


def fbcache(blocks, residual_diff_threshold: Optional[float] = None):
    """(schedule, fill) of First Block Cache on a DiT (``DiTBlocks``) or an SD-style UNet (``UNetBlocks``)."""
    if hasattr(blocks, "recording"):
        t = DIT_THRESHOLD if residual_diff_threshold is None else residual_diff_threshold
        return FirstBlockCache(residual_diff_threshold=t), dit_fill(blocks)
    t = UNET_THRESHOLD if residual_diff_threshold is None else residual_diff_threshold
    return UNetFirstBlockCache(residual_diff_threshold=t), UNetFirstBlockFiller(blocks)
