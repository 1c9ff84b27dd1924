"""What runs on a non-Dash step: the trained Dot, or a training-free stand-in.

A filler gets the current call and the batched anchor (the latest Dash step of each batch
entry) and returns the model's estimate in its native prediction space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .dot_model import DotModel, extrapolated_change


@dataclass
class Anchor:
    """The latest Dash step of one batch entry (or of a whole batch, when stacked)."""

    x: torch.Tensor
    z: torch.Tensor
    t: torch.Tensor
    step: int
    prev_z: Optional[torch.Tensor] = None  # the Dash estimate before it, for extrapolation
    prev_t: Optional[torch.Tensor] = None
    sigma: Optional[torch.Tensor] = None  # per entry; a Dot that reads the step since the anchor needs it
    features: Optional[dict] = None  # block outputs of the anchor's Dash call, for fills that rerun Dash's blocks
    prev_features: Optional[dict] = None  # the same of the Dash call of prev_z, where the fill asks for them
    prev2_t: Optional[torch.Tensor] = None  # the Dash call before that one, where the fill asks for two
    prev2_features: Optional[dict] = None


class Filler:
    """A fill's cost is explicit: ``free`` (training-free arithmetic, ~0 LSD) or, where it calls a network,
    a measured speed ratio N against Dash (never assumed)."""

    name = "filler"
    free = True
    # of how many Dash calls before the anchor's the router keeps the captured features too (0-2; one more set
    # alive per call)
    earlier_feature_calls = 0

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

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        if anchor.prev_z is None:
            return anchor.z.clone()
        return anchor.z + extrapolated_change(anchor.z, anchor.t, anchor.prev_z, anchor.prev_t, t)


class DotFiller(Filler):
    """The trained Dot: anchor estimate plus its learned residual."""

    name = "dot"
    free = False  # costs 1/N LSD a call, N measured

    def __init__(self, dot: DotModel, backbone: nn.Module):
        self.dot = dot
        self.backbone = backbone

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        with torch.no_grad():
            return self.dot(
                self.backbone, x, t, anchor.x, anchor.z, anchor.t, context=context, backbone_call=backbone_call,
                sigma=sigma, anchor_sigma=anchor.sigma, prev_z=anchor.prev_z, prev_t=anchor.prev_t, **kwargs
            )


#: The training-free fills by the name a user picks them with (nodes, evaluation).
TRAINING_FREE_FILLS = {"reuse": ReuseFiller, "extrapolate": ExtrapolateFiller}
