"""The peers as the pack prices them are the peers as ComfyUI runs them: ComfyUI 0.8.0's own EasyCache node and the
pack's EasyCache (``morse_engine.peers.easycache``: the adaptive schedule at the node's settings and the residual
fill, through Morse Model Patch's path) skip the same steps and sample the same latents, on tiny instances of
ComfyUI's own classes.

The DiTs run in bfloat16, as users run them: in float32 a flow model's input reaches the diffusion model as the very
tensor ComfyUI's ``calculate_denoised`` reads afterwards (CONST's ``calculate_input`` and ``.to(float32)`` both
return it), and EasyCache's in-place ``x += cached residual`` then shifts that step's denoised estimate as well; in
bfloat16 the cast makes a copy and EasyCache does what its code says.
"""
import logging
import re
from importlib import import_module

import pytest
import torch

import tiny_dits as td
from comfy_host import build_tiny_sd15, conditioning

STEPS = 20


def _sample(host, model, latent, pos, neg, cfg=2.0, seed=3):
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return host.comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", pos, neg, latent, seed=seed,
                                    disable_pbar=True)


def _in_bfloat16(model):
    dm = model.model.diffusion_model
    dm.to(torch.bfloat16)
    dm.dtype = torch.bfloat16  # what get_dtype reads: ComfyUI casts each call's input to it
    return model


def _compare(host, model, latent, pos, neg, caplog, tolerance):
    from comfy_extras.nodes_easycache import EasyCacheNode

    easycache = import_module(f"{host.engine.__name__}.peers.easycache").easycache  # the pack's engine, as loaded
    skipped_any = False
    for threshold in (0.05, 0.2, 1.0):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            theirs = _sample(host, EasyCacheNode.execute(model, threshold, 0.15, 0.95, False).result[0], latent, pos, neg)
            spec, _ = easycache(threshold)
            ours = _sample(host, host.hooks.apply_morse(model, host.hooks.MorseSettings(schedule=spec, fill="residual")),
                           latent, pos, neg)
        said = " ".join(r.getMessage() for r in caplog.records)
        their_skips = int(re.search(r"EasyCache - skipped (\d+)/", said).group(1))
        our_fills = int(re.search(r"Morse: \d+ Dash steps, (\d+) residual steps", said).group(1))
        assert our_fills == their_skips, (threshold, said)
        torch.testing.assert_close(ours, theirs, **tolerance)
        skipped_any |= their_skips > 0
    assert skipped_any, "no threshold made EasyCache skip a step: the comparison would not test the skips"


def test_easycache_in_the_pack_is_comfyuis_easycache_node_on_an_sd_unet(host, caplog):
    _compare(host, build_tiny_sd15(host), torch.zeros(1, 4, 16, 16), conditioning(1), conditioning(2), caplog,
             dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("name", ["flux", "qwen_image"])
def test_easycache_in_the_pack_is_comfyuis_easycache_node_on_dits(host, name, caplog):
    family = td.FAMILIES[name]
    _compare(host, _in_bfloat16(td.build(host, family)), td.latent(family, 1), td.conditioning(family, 1, 1),
             td.conditioning(family, 2, 1), caplog, dict(rtol=2e-2, atol=2e-2))


def test_the_schedule_nodes_adaptive_kind_runs_in_morse_ksampler_and_says_why_each_dash_step_ran(host, caplog):
    schedule_node, sampler_node = (host.nodes.NODE_CLASS_MAPPINGS[n] for n in ("MorseDashDotSchedule", "MorseKSampler"))
    schedule, text = schedule_node.execute("adaptive", 2, 0.5, "D.", 1, 10.0, 0.0, 20, 0.5).result
    assert isinstance(schedule, host.engine.AdaptiveDash) and schedule.threshold == 0.5 and "decided during" in text
    with caplog.at_level(logging.INFO, logger="morse"):
        out = sampler_node.execute(build_tiny_sd15(host), 7, STEPS, 5.0, "dpmpp_2m", "karras", conditioning(1),
                                   conditioning(2), {"samples": torch.zeros(1, 4, 16, 16)}, 1.0,
                                   schedule=schedule, fill_without_dot="extrapolate").result[0]["samples"]
    assert torch.isfinite(out).all()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: "))
    fills = int(re.search(r"Dash steps, (\d+) extrapolate steps", line).group(1))
    assert fills > 0 and "before start" in line and "after end" in line, line
