"""The fill the DiT caches share: skip a DiT's blocks ``first..last`` and add the residual they added on the last
computed step (TeaCache and MagCache skip every block; First Block Cache runs the first and skips the rest;
TaylorSeer moves the residual along its Taylor expansion), optionally reporting a signal from the first block on
every call, Dash calls included (what TeaCache and First Block Cache decide from). Through the host's description
of the blocks (``dit_fills.DiTBlocks``, ComfyUI's block-replace patches): no ComfyUI import, no ``forward`` replaced.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch

from ..dit_fills import RESIDUAL, DiTBlocks
from ..errors import MorseError
from ..fillers import Filler

SIGNAL = "signal"  # what a probing fill reports of the first block, kept with each Dash call's residual


class CachedBlocksFiller(Filler):
    """``signal(args, out)``: what the first block's inputs and outputs say about the step (None: no signal);
    ``predict(anchor, t, step)``: the residual to add (default: the anchor's own)."""

    free = False  # runs the model's embeddings, its head and any block outside the skip: N measured
    runs_backbone = True

    def __init__(self, blocks: DiTBlocks, name: str, first: int = 0, last: Optional[int] = None,
                 signal: Optional[Callable] = None, predict: Optional[Callable] = None, history: int = 0):
        last = blocks.n_blocks - 1 if last is None else last
        if not 0 <= first <= last < blocks.n_blocks:
            raise MorseError(f"{name}: blocks {first}..{last} are not within the backbone's {blocks.n_blocks} blocks")
        self.blocks, self.name, self.first, self.last = blocks, name, first, last
        self.signal, self.predict, self.history = signal, predict, history
        self.step_indexed = predict is not None  # the router passes the step to a fill that predicts by it

    def capture_modules(self) -> dict:
        return {RESIDUAL: None, SIGNAL: None} if self.signal else {RESIDUAL: None}

    @contextmanager
    def capturing(self, kwargs: dict):
        """On a Dash call: the residual across the skipped blocks, and the first block's signal."""
        with self.blocks.recording(kwargs, self.first, self.last) as recorded:
            if self.signal is None:
                yield recorded
                return
            with self.blocks.watching_first(kwargs, self.signal) as seen:
                yield recorded
            recorded[SIGNAL] = seen[SIGNAL]

    def accepts(self, kwargs: dict) -> bool:
        return self.blocks.accepts(kwargs)

    def _residual(self, anchor, t, step):
        return anchor.features[RESIDUAL] if self.predict is None else self.predict(anchor, t, step)

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None, step=None):
        return self.probe(backbone_call, x, t, anchor, context, kwargs, sigma, step)[0] if self.signal else \
            self._skip(backbone_call, x, t, anchor, context, kwargs, step)

    def _skip(self, backbone_call, x, t, anchor, context, kwargs, step):
        with torch.no_grad(), self.blocks.skipping(kwargs, self.first, self.last, self._residual(anchor, t, step)):
            return backbone_call(x, t, context=context, **kwargs)

    def probe(self, backbone_call, x, t, anchor, context, kwargs, sigma=None, step=None):
        """(the fill's output, the first block's signal on this call)."""
        with torch.no_grad(), self.blocks.skipping(kwargs, self.first, self.last, self._residual(anchor, t, step)), \
                self.blocks.watching_first(kwargs, self.signal) as seen:
            out = backbone_call(x, t, context=context, **kwargs)
        return out, seen[SIGNAL]


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a - b| / mean |b| over the whole tensor, as TeaCache and First Block Cache measure a change."""
    return float((a - b).abs().mean() / b.abs().mean())
