"""Faster Diffusion (Li et al. 2024, "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model
Inference"; hutaiHang/Faster-Diffusion ``utils_sd.py``): key steps run the whole UNet and keep the encoder's
features; the steps between run only the decoder on them, with their own time, several in one batched call. That
is the pack's ``propagate`` fill. The key steps are the paper's default for 50 DDIM steps (``mod='50ls'``: 0, 1,
2, 3, 5, 10, 15, 25, 35), placed at the same fractions of another step count (``schedules.KeySteps``); its
uniform mode (``mod=k``: every k-th step, k=4 in its README for community checkpoints) is ``EveryK(k)``.
"""
from __future__ import annotations

from typing import Optional

from ..fill_by_name import make_fill
from ..schedules import EveryK, KeySteps


def faster_diffusion(blocks, every: Optional[int] = None):
    """(schedule, fill): the paper's key steps, or every ``every``-th step."""
    return (KeySteps() if every is None else EveryK(every)), make_fill("propagate", blocks=blocks)
