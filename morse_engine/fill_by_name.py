"""The one place that turns a fill's name into the fill: what the nodes, the evaluation and the benchmarks call.

* a training-free fill (``reuse``, ``extrapolate``): arithmetic on earlier Dash estimates;
* a block fill (``inherit_k*``, ``forecast*``, ``propagate``): reruns some of Dash's own blocks, through the
  host's description of them (``feature_fills.UNetBlocks`` for a UNet, ``dit_fills.DiTBlocks`` for a DiT);
* ``dot``: a loaded Dot of either layout, served by its layout's fill.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from .dit_fills import DIT_FILLS, DiTBlocks
from .dot_layouts import layout_of
from .errors import MorseError
from .feature_fills import FEATURE_FILLS, UNetBlocks
from .fillers import TRAINING_FREE_FILLS, Filler

DOT = "dot"
#: every fill a user can pick without a Dot, in the order the nodes list them
FILLS_WITHOUT_DOT = (*TRAINING_FREE_FILLS, *FEATURE_FILLS)


def needs_blocks(name: str, dot=None) -> bool:
    """Whether the fill called ``name`` (with ``dot`` for ``dot``) reruns Dash's blocks, so the host must describe
    them; a host builds its block adapter only then."""
    if name == DOT:
        return dot is not None and layout_of(dot).needs_blocks
    return name in FEATURE_FILLS


def make_fill(name: str, *, blocks: Optional[Union[UNetBlocks, DiTBlocks]] = None, dot=None, backbone: Optional[nn.Module] = None) -> Filler:
    """The fill called ``name``; ``blocks`` where it reruns Dash's blocks, ``dot`` and ``backbone`` for ``dot``."""
    if name == DOT:
        if dot is None:
            raise MorseError("the fill 'dot' needs a Dot: load one, or pick a fill without a Dot "
                             f"({', '.join(FILLS_WITHOUT_DOT)})")
        return layout_of(dot).fill(dot, backbone, blocks)
    if name in TRAINING_FREE_FILLS:
        return TRAINING_FREE_FILLS[name]()
    if name in FEATURE_FILLS:
        if blocks is None:
            raise MorseError(f"the fill '{name}' reruns Dash's own blocks and needs the host's description of them")
        if hasattr(blocks, "recording"):  # a DiT's blocks: every block fill has its DiT form
            return DIT_FILLS[name](blocks)
        return FEATURE_FILLS[name](blocks)
    raise MorseError(f"unknown fill {name!r}; choose from {', '.join((*FILLS_WITHOUT_DOT, DOT))}")
