"""Block fills for transformer backbones (DiTs): the first k and the last k blocks run on the current input, the
blocks between are skipped and their residual is taken from the anchor's Dash call.

A DiT is one sequence of blocks (Flux: its double-stream blocks, then its single-stream blocks) that each add
to a hidden state. On a Dash call the host records the *residual* across the middle blocks ``k .. n-k-1``: what
the state leaving block n-k-1 holds beyond the state entering block k (carried as the identity would carry it,
e.g. Flux's text and image streams concatenated where the single-stream blocks begin). On a fill call the host
skips those blocks and adds the residual where they end, inherited from the anchor (``inherit_k``, the DiT form of
A-SDM / DeepCache's inheritance, FORA's and Δ-DiT's cached residual), or moved to the current time along the
line through the last two Dash calls (``forecast_k``, TaylorSeer's first order) or the parabola through the last
three (``forecast2_k``), the same formulas the UNet fills use (``feature_fills.feature_at``).

The host describes its backbone through :class:`DiTBlocks` (the nodes do it with ComfyUI's block-replace patches,
``transformer_options["patches_replace"]["dit"]``); the engine holds no host code.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch

from .errors import MorseError
from .feature_fills import feature_at
from .fillers import Filler

RESIDUAL = "residual"  # the one feature a DiT block fill keeps of a Dash call
STATE = "state"  # what encoder propagation keeps instead: the hidden state leaving the encoder
#: Faster Diffusion's split of a DiT (its appendix A.3): the first 18 of DiT-XL's 28 blocks are the encoder
ENCODER_SHARE = 18 / 28


class DiTBlocks(Protocol):
    """A DiT's sequence of blocks as a host lets a fill record and skip them, per model call."""

    n_blocks: int

    def recording(self, kwargs: dict, first: int, last: int, state: bool = False) -> AbstractContextManager[dict]:
        """While the model call with ``kwargs`` runs, record the residual across blocks ``first..last``; the dict
        yielded holds it under ``RESIDUAL`` (batch first) once the call returns. ``state``: record the hidden
        state leaving block ``last`` instead, under ``STATE``."""

    def skipping(self, kwargs: dict, first: int, last: int, residual: torch.Tensor,
                 replace: bool = False) -> AbstractContextManager[None]:
        """While the model call with ``kwargs`` runs, blocks ``first..last`` are skipped and ``residual`` is added
        where they end (``replace``: the state leaving them is ``residual`` itself)."""

    def accepts(self, kwargs: dict) -> bool:
        """Whether this call can be served (no ControlNet residuals inside the skipped blocks, no other patch
        replacing one of them)."""


class DiTBlockFiller(Filler):
    free = False  # runs 2k of Dash's blocks: N measured
    runs_backbone = True  # calls the model itself, at this call's own timestep

    def __init__(self, blocks: DiTBlocks, k: int = 1, forecast: int = 0):
        n = blocks.n_blocks
        if not 1 <= k or 2 * k >= n:
            raise MorseError(f"a DiT block fill with k={k} reruns {2 * k} of the backbone's {n} blocks and would skip "
                             "none; pick a smaller k")
        if forecast not in (0, 1, 2):
            raise MorseError(f"feature forecasting order {forecast!r} must be 0 (inherit), 1 (line) or 2 (parabola)")
        self.blocks, self.k = blocks, k
        self.forecast = self.history = int(forecast)
        self.name = {0: f"inherit_k{k}", 1: f"forecast_k{k}", 2: f"forecast2_k{k}"}[self.forecast]
        self.first, self.last = k, n - k - 1

    def capture_modules(self) -> dict:
        return {RESIDUAL: None}  # recorded through the host's patches, not a module hook (see ``capturing``)

    def capturing(self, kwargs: dict):
        return self.blocks.recording(kwargs, self.first, self.last)

    def accepts(self, kwargs: dict) -> bool:
        return self.blocks.accepts(kwargs)

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        residual = feature_at(t, anchor, RESIDUAL, self.forecast)
        with torch.no_grad(), self.blocks.skipping(kwargs, self.first, self.last, residual):
            return backbone_call(x, t, context=context, **kwargs)


class DiTPropagateFiller(Filler):
    """Faster Diffusion's encoder propagation on a DiT: the first blocks are the encoder (18 of DiT-XL's 28; the
    same share of any DiT's), the rest the decoder. A fill step skips the encoder and runs the decoder on the
    hidden state the last Dash call's encoder left, with the current time (the blocks' modulation), as the paper
    defines it for DiTs; the current input does not enter. The paper's parallel decoding of several such steps
    in one call is not offered on DiTs (each fill step is its own call)."""

    name = "propagate"
    free = False
    runs_backbone = True

    def __init__(self, blocks: DiTBlocks, encoder_share: float = ENCODER_SHARE):
        n = blocks.n_blocks
        self.blocks, self.last = blocks, max(0, min(n - 2, round(n * encoder_share) - 1))

    def capture_modules(self) -> dict:
        return {STATE: None}

    def capturing(self, kwargs: dict):
        return self.blocks.recording(kwargs, 0, self.last, state=True)

    def accepts(self, kwargs: dict) -> bool:
        return self.blocks.accepts(kwargs)

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        with torch.no_grad(), self.blocks.skipping(kwargs, 0, self.last, anchor.features[STATE], replace=True):
            return backbone_call(x, t, context=context, **kwargs)


#: the block fills by name, for a DiT (``make_fill`` picks these where the host describes DiT blocks)
DIT_FILLS = {
    "inherit_k1": lambda blocks: DiTBlockFiller(blocks, k=1),
    "inherit_k2": lambda blocks: DiTBlockFiller(blocks, k=2),
    "forecast_k1": lambda blocks: DiTBlockFiller(blocks, k=1, forecast=1),
    "forecast_k2": lambda blocks: DiTBlockFiller(blocks, k=2, forecast=1),
    "forecast2_k2": lambda blocks: DiTBlockFiller(blocks, k=2, forecast=2),
    "propagate": DiTPropagateFiller,
}
