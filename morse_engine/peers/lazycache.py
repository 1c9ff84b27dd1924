"""LazyCache, as ComfyUI 0.8.0 ships it: ``comfy_extras/nodes_easycache.py``, node "LazyCache".

EasyCache's gate (:class:`..adaptive.AdaptiveDash`: the output's change per input change at the last computed step,
times the input's change since, accumulated until ``reuse_threshold``; inputs and outputs subsampled by 8 over the
last two axes; between ``start_percent`` and ``end_percent`` of the noise range) one level up: around the whole
guided prediction (ComfyUI's ``PREDICT_NOISE`` wrapper), so its input is the sampler's latent and its output the
denoised estimate after CFG, one decision and one cache for all conds. Unlike EasyCache it records the steps
before ``start`` (the first step inside the window already has an input change). A skipped step returns
``x + (denoised - x)`` of the last computed step: the denoised estimate moved with the latent.

:class:`LazyCacheRun` wraps any ``denoise(x, sigma) -> x0`` for one sampling run; the evaluation puts it around
its guided denoiser, where ComfyUI puts the node's wrapper.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..adaptive import AdaptiveDash
from ..parameterization import step_at

SUBSAMPLE = 8  # nodes_easycache.py: subsample_factor=8, fixed by the node


def lazycache(reuse_threshold: float = 0.2, start_percent: float = 0.15, end_percent: float = 0.95) -> AdaptiveDash:
    """LazyCache's gate at these settings (the node's defaults)."""
    return AdaptiveDash(threshold=reuse_threshold, start=start_percent, end=end_percent, subsample=SUBSAMPLE,
                        track_before_start=True)


class LazyCacheRun:
    """One sampling run: ``run(denoise, x, sigma)`` computes the denoised estimate or serves it from the cache.
    ``calls`` / ``skipped``: the steps computed and served (a step is decided once, at its first call)."""

    def __init__(self, spec: AdaptiveDash, sigmas, percent_to_sigma: Optional[Callable] = None):
        self.sigmas = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
        self.schedule = spec.resolve(len(self.sigmas) - 1, percent_to_sigma, self.sigmas)
        self.diff: Optional[torch.Tensor] = None
        self.calls = self.skipped = 0

    def __call__(self, denoise: Callable, x: torch.Tensor, sigma) -> torch.Tensor:
        s = float(sigma)
        step = step_at(self.sigmas, s)
        dash = self.schedule.decide(step, s, x)
        if not dash and self.diff is not None and self.diff.shape == x.shape:
            self.skipped += 1
            return x + self.diff
        out = denoise(x, sigma)
        self.calls += 1
        self.schedule.observe(x, out, out)
        self.diff = out - x
        return out
