"""EasyCache (Zhou et al. 2025, "Less is Enough: Training-Free Video Diffusion Acceleration via Runtime-Adaptive
Caching"), as ComfyUI 0.8.0 ships it: ``comfy_extras/nodes_easycache.py``, node "EasyCache".

Its decision is :class:`..adaptive.AdaptiveDash` (the output's change per input change at the last computed step,
times the input's change since, accumulated until ``reuse_threshold``), compared on inputs and outputs subsampled
by 8 over the last two axes, between ``start_percent`` and ``end_percent`` of the model's noise range; a skipped
step is served with the cached output-minus-input residual (:class:`..fillers.ResidualFiller`). The defaults are
the node's: 0.2, 0.15, 0.95.
"""
from __future__ import annotations

from ..adaptive import AdaptiveDash
from ..fillers import ResidualFiller

SUBSAMPLE = 8  # nodes_easycache.py: subsample_factor=8, fixed by the node


def easycache(reuse_threshold: float = 0.2, start_percent: float = 0.15, end_percent: float = 0.95):
    """(schedule, fill) of EasyCache at these settings; the router needs the model's ``percent_to_sigma`` to place
    the window as the node does."""
    return AdaptiveDash(threshold=reuse_threshold, start=start_percent, end=end_percent, subsample=SUBSAMPLE), \
        ResidualFiller()
