"""Morse with another pack's DIFFUSION_MODEL wrapper in one workflow (ComfyUI's own EasyCache): the Dot's inner
low-resolution call never reaches the other wrappers, so they see only full-size sampling steps."""
import logging

import pytest
import torch

from comfy_host import save_test_dot
from test_morse_ksampler import node


def _shape_spy(host, model, seen):
    def spy(executor, *args, **kwargs):
        seen.append(tuple(args[0].shape[-2:]))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(host.comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "spy", spy)


def _easycache(host, model):
    easycache = pytest.importorskip("comfy_extras.nodes_easycache", reason="this ComfyUI has no EasyCache node")
    return easycache.EasyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0]


@pytest.mark.parametrize("order", ["easycache_then_morse", "morse_then_easycache"])
def test_morse_and_easycache_in_one_workflow(host, tiny, dot_folder, order, caplog):
    from comfy_host import conditioning

    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]

    def with_morse(model):
        return node(host, "MorseModelPatch").execute(model, dot=dot, schedule=host.engine.Pattern("D.")).result[0]

    model = with_morse(_easycache(host, tiny)) if order == "easycache_then_morse" else _easycache(host, with_morse(tiny))
    seen = []
    _shape_spy(host, model, seen)  # another pack's wrapper, inside Morse's in the chain
    with caplog.at_level(logging.INFO):
        out = host.nodes.common_ksampler(model, 7, 8, 3.0, "euler", "normal", conditioning(1), conditioning(2),
                                         {"samples": torch.zeros(1, 4, 16, 16)})[0]["samples"]
    assert torch.isfinite(out).all()
    assert seen and set(seen) == {(16, 16)}, "another pack's wrapper saw the Dot's low-resolution call"
    assert not [r for r in caplog.records if "resetting state" in r.getMessage()]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse:"))
    assert "dot calls" in line
