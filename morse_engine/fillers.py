"""What runs on a non-Dash step: the fill's contract, the anchor it builds on, and the training-free fills that
need nothing but earlier estimates.

A filler gets the current call and the batched anchor (the latest Dash call of each batch entry, with the few
Dash calls before it that the fill asks for) and returns the model's estimate in its native prediction space.
The fills that rerun Dash's blocks are in ``feature_fills``; each Dot layout's fill is in ``dot_layouts``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .trajectory import extrapolated_change


@dataclass
class DashCall:
    """What one Dash call left for later fills: its estimate, timestep and the block outputs the fill captures."""

    z: torch.Tensor
    t: torch.Tensor
    features: Optional[dict] = None
    step: Optional[int] = None  # the run's step index of the call (TaylorSeer differences in it)


@dataclass
class Anchor:
    """The latest Dash call of one batch entry (or of a whole batch, when stacked), with its input and sigma, and
    the Dash calls before it, newest first: as many as the fill reads (:attr:`Filler.history`)."""

    x: torch.Tensor
    z: torch.Tensor
    t: torch.Tensor
    step: int
    sigma: Optional[torch.Tensor] = None  # per entry; a fill that reads the step since the anchor needs it
    features: Optional[dict] = None  # block outputs of the anchor's Dash call, for fills that rerun Dash's blocks
    earlier: tuple = ()  # DashCall of the calls before the anchor's, newest first

    def before(self, depth: int) -> Optional[DashCall]:
        """The Dash call ``depth`` calls before the anchor's (1: the one just before), or None where the run has
        made fewer."""
        return self.earlier[depth - 1] if 1 <= depth <= len(self.earlier) else None

    def as_call(self) -> DashCall:
        return DashCall(self.z, self.t, self.features, self.step)


class Filler:
    """A fill's cost is explicit: ``free`` (training-free arithmetic, ~0 LSD) or, where it calls a network,
    a measured speed ratio N against Dash (never assumed)."""

    name = "filler"
    free = True
    # how many Dash calls before the anchor's the fill reads (0-2); the router keeps that many per batch entry,
    # each with the block outputs :meth:`capture_modules` names
    history = 0
    runs_backbone = False  # True: the fill calls the model itself, at the call's own timestep

    def capture_modules(self) -> dict:
        """Modules whose outputs the fill needs from each Dash call (captured by the router); none by default."""
        return {}

    def accepts(self, kwargs: dict) -> bool:
        """False where this call's inputs are outside what the fill can serve (the router then runs Dash)."""
        return True

    def __call__(self, backbone_call: Callable, x, t, anchor: Anchor, context, kwargs, sigma=None) -> torch.Tensor:
        raise NotImplementedError


class ReuseFiller(Filler):
    """Training-free: a non-Dash step reuses the anchor's estimate (costs nothing)."""

    name = "reuse"

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        return anchor.z.clone()


class ExtrapolateFiller(Filler):
    """Training-free: linear extrapolation in t from the last two Dash estimates.

    With only one Dash estimate so far it reuses it.
    """

    name = "extrapolate"
    history = 1

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        prev = anchor.before(1)
        if prev is None:
            return anchor.z.clone()
        return anchor.z + extrapolated_change(anchor.z, anchor.t, prev.z, prev.t, t)


class ResidualFiller(Filler):
    """Training-free: the anchor's output-minus-input residual on the current input, out = x + (z_a - x_a): what
    EasyCache (ComfyUI's ``nodes_easycache.py``) serves a skipped step with, at the model's own input and output."""

    name = "residual"

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        return x + (anchor.z - anchor.x)


#: The training-free fills by the name a user picks them with (nodes, evaluation).
TRAINING_FREE_FILLS = {"reuse": ReuseFiller, "extrapolate": ExtrapolateFiller, "residual": ResidualFiller}
