"""The DiT block fill's own part (host-free): which blocks it skips, which residual it hands the host, and its
refusals; the host's record and skip through ComfyUI's patches are tested in tests/host/test_dit_families.py."""
from contextlib import contextmanager

import pytest
import torch

from morse_engine import Anchor, DashCall, MorseError, make_fill
from morse_engine.dit_fills import RESIDUAL, DiTBlockFiller


class FakeBlocks:
    """Hands back what the fill asked the host to do."""

    def __init__(self, n):
        self.n_blocks, self.skipped = n, []

    def recording(self, kwargs, first, last):
        raise AssertionError("not used here")

    @contextmanager
    def skipping(self, kwargs, first, last, residual):
        self.skipped.append((first, last, residual))
        yield

    def accepts(self, kwargs):
        return kwargs.get("control") is None


def anchor_with(residuals_and_times):
    """An anchor whose Dash calls (newest first) left these residuals at these times."""
    calls = [DashCall(torch.zeros(1, 2), torch.tensor([t]), {RESIDUAL: torch.full((1, 3), r)}) for r, t in residuals_and_times]
    newest = calls[0]
    return Anchor(x=torch.zeros(1, 2), z=newest.z, t=newest.t, step=len(calls), sigma=torch.ones(1),
                  features=newest.features, earlier=tuple(calls[1:]))


def run(filler, anchor, t):
    return filler(lambda x, t_, context=None, **kw: torch.ones(1), torch.zeros(1, 2), torch.tensor([t]), anchor, None, {})


def test_inherit_skips_the_middle_and_hands_over_the_anchors_residual():
    blocks = FakeBlocks(6)
    filler = make_fill("inherit_k2", blocks=blocks)
    assert isinstance(filler, DiTBlockFiller) and filler.name == "inherit_k2" and not filler.free
    run(filler, anchor_with([(2.0, 500.0), (1.0, 600.0)]), 450.0)
    first, last, residual = blocks.skipped[-1]
    assert (first, last) == (2, 3) and torch.equal(residual, torch.full((1, 3), 2.0))


def test_forecasts_move_the_residual_along_the_line_and_the_parabola():
    blocks = FakeBlocks(5)
    run(make_fill("forecast_k1", blocks=blocks), anchor_with([(2.0, 500.0), (1.0, 600.0)]), 400.0)
    assert torch.allclose(blocks.skipped[-1][2], torch.full((1, 3), 3.0))  # the line through (600, 1), (500, 2)
    # r(t) = (t / 100 - 7) ** 2 through t = 700, 600, 500 gives 0, 1, 4; at 400: 9
    run(make_fill("forecast2_k2", blocks=blocks), anchor_with([(4.0, 500.0), (1.0, 600.0), (0.0, 700.0)]), 400.0)
    assert torch.allclose(blocks.skipped[-1][2], torch.full((1, 3), 9.0))


def test_a_k_that_skips_nothing_is_refused_and_propagate_splits_at_faster_diffusions_share():
    with pytest.raises(MorseError, match="would skip none"):
        DiTBlockFiller(FakeBlocks(4), k=2)
    assert make_fill("propagate", blocks=FakeBlocks(28)).last == 17  # DiT-XL: the first 18 of 28 blocks encode
    assert not make_fill("inherit_k1", blocks=FakeBlocks(4)).accepts({"control": {"input": []}})
