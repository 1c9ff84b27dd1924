"""Fills that rerun part of Dash's own UNet and take the rest from the anchor's Dash call (training-free).

* **Feature inheritance** (A-SDM's inheritance of block outputs across steps; DeepCache's shallow branch):
  a non-Dash step runs the first k input blocks and the last k output blocks on the current input and
  time, and inherits the deep feature map that enters those output blocks from the anchor's Dash call.
* **Feature forecasting** (``forecast_k``; TaylorSeer's first order, on the SD UNet's deep feature): feature
  inheritance with the inherited feature extrapolated in t from the Dash call before the anchor and the
  anchor's, to the current time; ``forecast2_k`` along the parabola through the last three Dash calls
  (second order). The router keeps those earlier calls' features only for a fill that asks.
* **Encoder propagation** (Faster Diffusion): a non-key step skips the encoder (the input blocks and the
  middle block) and runs the decoder on the anchor's encoder features with the current time.

What a fill needs from a Dash call is captured while that call runs, by forward hooks that keep a
reference to a block's output (no copy, no arithmetic: the Dash call computes what it always did), and
the router keeps it per batch entry with the anchor. A host describes its UNet's blocks through a
:class:`UNetBlocks` adapter (the nodes adapt ComfyUI's ``UNetModel``; the reference UNet has its own),
so the fills themselves hold no host code. At the anchor's own input and time both fills return
Dash's estimate exactly, which is how the adapters are tested.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol, Sequence

import torch
from torch import nn

from .errors import MorseError
from .fillers import Filler
from .trajectory import extrapolated_change, parabola_change


class UNetBlocks(Protocol):
    """An SD-style UNet's blocks, as a fill runs them one at a time (input, middle and output blocks with
    skips from input block i to output block L - 1 - i, then the head)."""

    input_blocks: Sequence[nn.Module]
    middle_block: nn.Module
    output_blocks: Sequence[nn.Module]

    def prepare(self, x: torch.Tensor, t: torch.Tensor, context, kwargs: dict):
        """What every block call needs at (x, t): the time embedding, the context, the host's options."""

    def input(self, i: int, h: torch.Tensor, state) -> torch.Tensor: ...

    def middle(self, h: torch.Tensor, state) -> torch.Tensor: ...

    def output(self, i: int, h: torch.Tensor, skip: torch.Tensor, state, output_shape) -> torch.Tensor: ...

    def head(self, h: torch.Tensor, state, x: torch.Tensor) -> torch.Tensor: ...


def check_layout(blocks: UNetBlocks, fill: str) -> int:
    """The number of blocks per side; a one-sentence refusal for a backbone without that layout."""
    try:
        n_in, n_out = len(blocks.input_blocks), len(blocks.output_blocks)
        blocks.middle_block  # noqa: B018
    except (AttributeError, TypeError):
        raise MorseError(f"the {fill} fill needs a UNet with input_blocks, middle_block and output_blocks "
                         "(SD1.x, SD2.x, SDXL or the reference UNet); this backbone has another layout") from None
    if n_in != n_out or n_in < 1:
        raise MorseError(f"the {fill} fill needs as many input as output blocks (skip connections pair them); "
                         f"this backbone has {n_in} and {n_out}")
    return n_in


def _output_module(block: nn.Module) -> nn.Module:
    """The module whose output is the block's: its last layer where the block is a sequence (ComfyUI runs a
    block's layers one by one through ``forward_timestep_embed``, so a hook on the block itself never fires)."""
    return block[-1] if isinstance(block, nn.Sequential) and len(block) else block


@contextmanager
def captured(modules: dict[str, nn.Module]):
    """Collect the outputs of the blocks ``modules`` by name while they run (a reference, never a copy)."""
    out: dict[str, torch.Tensor] = {}
    handles = [_output_module(m).register_forward_hook(lambda _m, _a, o, name=name: out.__setitem__(name, o))
               for name, m in modules.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


class _FeatureFill(Filler):
    free = False  # reruns Dash's own blocks: N measured

    def __init__(self, blocks: UNetBlocks):
        self.blocks = blocks
        self.n_blocks = check_layout(blocks, self.name)

    def accepts(self, kwargs: dict) -> bool:
        # ControlNet residuals are added to the skips and the middle block's output; they are not cached
        # with the features, so a call with a control input falls back to Dash (as does one the host's blocks
        # cannot serve, e.g. ComfyUI patches that change the skips)
        host_ok = getattr(self.blocks, "accepts", None)
        return kwargs.get("control") is None and (host_ok is None or host_ok(kwargs))

    def _up_to_head(self, h, skips: list, state, x):
        """The last ``len(skips)`` output blocks from the feature ``h`` entering them, each taking its skip
        (the deepest last in ``skips``), then the head."""
        b = self.blocks
        for j in range(self.n_blocks - len(skips), self.n_blocks):
            skip = skips.pop()
            h = b.output(j, h, skip, state, skips[-1].shape if skips else None)
        return b.head(h, state, x)


class FeatureInheritFiller(_FeatureFill):
    """Reruns the outer k blocks per side at full resolution; inherits the deep feature from the anchor.

    ``forecast`` (the order, 0-2): the inherited deep feature is first moved to the current time along the line
    in t through the Dash call before the anchor and the anchor's own (1: first-order feature forecasting, as
    TaylorSeer does for DiT features; the same line extrapolation takes through the estimates), or along the
    parabola through the last three Dash calls (2). With fewer earlier Dash calls than the order asks for (the
    first fills of a run) it forecasts to the order they allow.
    """

    name = "inherit"

    def __init__(self, blocks: UNetBlocks, k: int = 1, forecast: int = 0):
        super().__init__(blocks)
        if not 1 <= k <= self.n_blocks:
            raise MorseError(f"feature inheritance k={k} must be between 1 and the {self.n_blocks} blocks per side")
        if forecast not in (0, 1, 2):
            raise MorseError(f"feature forecasting order {forecast!r} must be 0 (inherit), 1 (line) or 2 (parabola)")
        self.k = k
        self.forecast = self.history = int(forecast)  # order 1 reads one earlier Dash call, order 2 two
        self.name = {0: f"inherit_k{k}", 1: f"forecast_k{k}", 2: f"forecast2_k{k}"}[self.forecast]
        self.deep = self.n_blocks - k - 1  # the output block whose output enters the last k; -1: the middle block

    def capture_modules(self) -> dict[str, nn.Module]:
        b = self.blocks
        return {"deep": b.output_blocks[self.deep] if self.deep >= 0 else b.middle_block}

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        with torch.no_grad():
            state = self.blocks.prepare(x, t, context, kwargs)
            hs = self._first_blocks(x, state)
            return self._up_to_head(self._deep_at(t, anchor), hs, state, x)

    def _first_blocks(self, x, state) -> list:
        """The outputs of the first k input blocks at the current input (the skips of the last k output blocks)."""
        hs, h = [], x
        for i in range(self.k):
            h = self.blocks.input(i, h, state)
            hs.append(h)
        return hs

    def _deep_at(self, t, anchor) -> torch.Tensor:
        return feature_at(t, anchor, "deep", self.forecast)


def feature_at(t, anchor, name: str, order: int) -> torch.Tensor:
    """The anchor's captured feature ``name`` moved to time ``t``: as it is (order 0), along the line through the
    Dash call before the anchor and the anchor's (1), or the parabola through the last three Dash calls (2); with
    fewer earlier calls than the order asks for (a run's first fills) to the order they allow."""
    feature = anchor.features[name]
    prev, older = anchor.before(1), anchor.before(2)
    if not order or prev is None or prev.features is None:
        return feature
    if order == 2 and older is not None and older.features is not None:
        change = parabola_change(feature, anchor.t, prev.features[name], prev.t, older.features[name], older.t, t)
        if change is not None:
            return feature + change
    return feature + extrapolated_change(feature, anchor.t, prev.features[name], prev.t, t)


class EncoderPropagationFiller(_FeatureFill):
    """Skips the encoder: the decoder runs on the anchor's encoder features with the current time.

    The current input never enters the decoder (it reaches the UNet only through the encoder), so the outputs
    of the steps up to the next Dash step depend on their times alone and can be computed in one batched call
    (Faster Diffusion's parallel decoding, :meth:`decode_span`; the router decides when the steps are known).
    """

    name = "propagate"

    def __init__(self, blocks: UNetBlocks, parallel: bool = True, max_parallel: int = 8):
        super().__init__(blocks)
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise MorseError(f"max_parallel={max_parallel!r} must be a whole number >= 1 (steps decoded in one call)")
        self.parallel, self.max_parallel = parallel, max_parallel

    def capture_modules(self) -> dict[str, nn.Module]:
        b = self.blocks
        return {**{f"in{i}": m for i, m in enumerate(b.input_blocks)}, "middle": b.middle_block}

    def can_batch(self, kwargs: dict) -> bool:
        """Whether the steps of a span may share one call: the host says no where its patches split the batch."""
        host_ok = getattr(self.blocks, "can_batch", None)
        return self.parallel and (host_ok is None or host_ok(kwargs))

    def _decode(self, x, t, features: dict, context, kwargs):
        state = self.blocks.prepare(x, t, context, kwargs)
        return self._up_to_head(features["middle"], [features[f"in{i}"] for i in range(self.n_blocks)], state, x)

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        with torch.no_grad():
            return self._decode(x, t, anchor.features, context, kwargs)

    def decode_span(self, x, times: Sequence[torch.Tensor], anchor, context, kwargs) -> list[torch.Tensor]:
        """The fill's outputs at each of ``times`` (each shaped like this call's timestep), in one batched call:
        the batch is the call's batch once per time, the anchor's features and the context repeated."""
        m = len(times)
        if m == 1:
            return [self(None, x, times[0], anchor, context, kwargs)]
        n = x.shape[0]

        def rep(v):
            return v.repeat(m, *[1] * (v.ndim - 1)) if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v

        t = torch.cat([tt.reshape(-1).expand(n) for tt in times])
        with torch.no_grad():
            out = self._decode(rep(x), t, {k: rep(v) for k, v in anchor.features.items()}, rep(context),
                               {k: rep(v) for k, v in kwargs.items()})
        return list(out.chunk(m))


#: Fills that rerun Dash's blocks, by the name a user picks them with; each takes the host's UNetBlocks.
FEATURE_FILLS = {
    "inherit_k1": lambda blocks: FeatureInheritFiller(blocks, k=1),
    "inherit_k2": lambda blocks: FeatureInheritFiller(blocks, k=2),
    "forecast_k1": lambda blocks: FeatureInheritFiller(blocks, k=1, forecast=1),
    "forecast_k2": lambda blocks: FeatureInheritFiller(blocks, k=2, forecast=1),
    # second order at k = 1 was measured and not offered: it collapses at 12 dpmpp_2m steps (reports/2026-12-01-dot-limits.md)
    "forecast2_k2": lambda blocks: FeatureInheritFiller(blocks, k=2, forecast=2),
    "propagate": EncoderPropagationFiller,
}
