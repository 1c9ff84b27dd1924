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
    # Morse's window: the gate works over the whole run (no "before start" / "after end" steps), its first two steps
    # Dash (the first, and one to measure the change rate)
    assert fills > 0 and "0 first step" in line and "1 no change rate yet" in line and "before start" not in line, line


def _reference_dit_in_comfyui(host):
    from test_reference_dit_in_comfyui import comfy_flux, committed_or_random

    from training.train_reference import REFERENCE_DIT_MU

    dit, cond = committed_or_random()
    return dit, cond, comfy_flux(host, dit.config, dit.state_dict(), REFERENCE_DIT_MU)


def test_lazycache_the_table_prices_is_comfyuis_lazycache_node_on_the_reference_dit(host, caplog):
    """The evaluation's LazyCache (``peers.lazycache`` around its own guided denoiser and sampler) and ComfyUI's
    LazyCache node on the same weights in ComfyUI's Flux class skip the same steps and sample the same latents."""
    from comfy_extras.nodes_easycache import LazyCacheNode

    from morse_engine.parameterization import FlowSchedule
    from morse_engine.peers.lazycache import LazyCacheRun, lazycache
    from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample
    from training.reference.unet import NULL_CLASS
    from training.train_reference import REFERENCE_DIT_MU

    dit, cond, patcher = _reference_dit_in_comfyui(host)
    labels, cfg = torch.tensor([3, 8]), 2.5
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    pos, neg = cond(labels), cond(torch.full((2,), NULL_CLASS))
    ms = FlowSchedule.flux(REFERENCE_DIT_MU)
    sigmas = normal_sigmas(ms, STEPS)
    skipped_any = False
    for threshold in (0.05, 0.2, 1.0):
        caplog.clear()
        with torch.no_grad(), caplog.at_level(logging.INFO):
            model = LazyCacheNode.execute(patcher, threshold, 0.15, 0.95, False).result[0]
            theirs = host.comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal",
                                              [[pos, {"pooled_output": None}]], [[neg, {"pooled_output": None}]],
                                              torch.zeros_like(noise), seed=5, disable_pbar=True)
            theirs = patcher.model.latent_format.process_in(theirs)
            run, den = LazyCacheRun(lazycache(threshold), sigmas, ms.percent_to_sigma), GuidedDenoiser(dit, ms, pos, neg, cfg)
            ours = sample("euler", lambda x, s: run(den, x, s), noise, sigmas, ms)
        said = " ".join(r.getMessage() for r in caplog.records)
        their_skips = int(re.search(r"LazyCache - skipped (\d+)/", said).group(1))
        assert run.skipped == their_skips, (threshold, said)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        skipped_any |= their_skips > 0
    assert skipped_any, "no threshold made LazyCache skip a step: the comparison would not test the skips"


def test_easycache_in_the_pack_is_comfyuis_easycache_node_on_the_reference_dit(host, caplog):
    """The same weights in ComfyUI's Flux class (bfloat16: see the module's note on float32 flow models)."""
    _, cond, patcher = _reference_dit_in_comfyui(host)
    from training.reference.unet import NULL_CLASS

    pos = [[cond(torch.tensor([3])), {"pooled_output": None}]]
    neg = [[cond(torch.tensor([NULL_CLASS])), {"pooled_output": None}]]
    _compare(host, _in_bfloat16(patcher), torch.zeros(1, 1, 32, 32), pos, neg, caplog, dict(rtol=2e-2, atol=2e-2))
