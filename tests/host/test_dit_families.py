"""Morse on ComfyUI's DiT / flow families (issue 27): tiny instances of ComfyUI 0.8.0's own model classes
(``tiny_dits``), sampled through ``comfy.sample.sample`` with the pack's ``apply_morse``, as Morse Model Patch and
Morse KSampler do.

Every family: all-Dash equal to plain sampling bit for bit (first- and second-order samplers), the output-space
fills sample and serve the steps they are given (the log line counts them, so a family whose calls bypass the
pack would fail here, not pass silently), cond and uncond in separate calls, and a fill that needs UNet blocks
refused in one sentence before the first model call.
"""
import logging

import pytest
import torch

import tiny_dits as td

FAMILIES = sorted(td.FAMILIES)
STEPS = 4


@pytest.fixture(scope="module")
def models(host):
    return {name: td.build(host, td.FAMILIES[name]) for name in FAMILIES}


def sample(host, model, family, sampler="euler", cfg=2.0, seed=1, batch=1, pos=None, neg=None):
    latent = td.latent(family, batch)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return host.comfy.sample.sample(model, noise, STEPS, cfg, sampler, "simple",
                                    pos or td.conditioning(family, 1, batch), neg or td.conditioning(family, 2, batch),
                                    latent, seed=seed, disable_pbar=True)


def morse(host, model, schedule=None, fill="reuse"):
    hooks, engine = host.hooks, host.engine
    return hooks.apply_morse(model, hooks.MorseSettings(schedule=schedule or engine.EveryK(2), fill=fill))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_all_dash_is_plain_sampling_bit_for_bit(host, models, name, sampler):
    family, model = td.FAMILIES[name], models[name]
    plain = sample(host, model, family, sampler)
    assert torch.equal(sample(host, morse(host, model, host.engine.EveryK(1)), family, sampler), plain)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fill", ["reuse", "extrapolate"])
def test_output_space_fills_serve_their_steps(host, models, name, fill, caplog):
    family, model = td.FAMILIES[name], models[name]
    plain = sample(host, model, family)
    with caplog.at_level(logging.INFO, logger="morse"):
        out = sample(host, morse(host, model, fill=fill), family)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert not torch.equal(out, plain)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ")]
    assert any(f"2 Dash steps, 2 {fill} steps of {STEPS}" in line for line in lines), lines


@pytest.mark.parametrize("name", ["flux", "wan21", "sd3", "qwen_image"])
def test_cond_and_uncond_in_separate_calls(host, models, name):
    family, model = td.FAMILIES[name], models[name]
    # text of other lengths cannot share a batch: ComfyUI calls cond and uncond one at a time
    pos = td.conditioning(family, 1, 2)
    neg = [[torch.randn(2, td.TOKENS + 1, td.TEXT, generator=torch.Generator().manual_seed(2)), dict(pos[0][1])]]
    plain = sample(host, model, family, batch=2, pos=pos, neg=neg)
    dash = sample(host, morse(host, model, host.engine.EveryK(1)), family, batch=2, pos=pos, neg=neg)
    assert torch.equal(dash, plain)
    filled = sample(host, morse(host, model), family, batch=2, pos=pos, neg=neg)
    assert filled.shape == plain.shape and torch.isfinite(filled).all() and not torch.equal(filled, plain)


@pytest.mark.parametrize("name", ["flux", "flux_schnell"])
def test_cfg_one_sends_one_cond_a_step_and_is_served(host, models, name):
    """Guidance-distilled Flux runs at CFG 1: one positive chunk a call."""
    family, model = td.FAMILIES[name], models[name]
    plain = sample(host, model, family, cfg=1.0)
    assert torch.equal(sample(host, morse(host, model, host.engine.EveryK(1)), family, cfg=1.0), plain)
    out = sample(host, morse(host, model), family, cfg=1.0)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


@pytest.mark.parametrize("name,fill,says", [
    ("lumina2", "inherit_k1", "needs an SD1.x, SD2.x or SDXL UNet or a DiT whose blocks"),
    ("hidream", "forecast_k1", "needs an SD1.x, SD2.x or SDXL UNet or a DiT whose blocks"),
    ("kandinsky5_image", "propagate", "needs an SD1.x, SD2.x or SDXL UNet or a DiT whose blocks"),
])
def test_a_block_fill_the_model_cannot_take_is_refused_before_the_first_model_call(host, models, name, fill, says):
    family, model = td.FAMILIES[name], models[name].clone()
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(host.comfy.patcher_extension.WrappersMP.APPLY_MODEL, "count", count)
    with pytest.raises(ValueError, match=rf"^Morse: the fill '{fill}' .*{says}.*Pick reuse or extrapolate"):
        sample(host, morse(host, model, fill=fill), family)
    assert calls == []


@pytest.mark.parametrize("name", ["flux", "wan21", "sd3"])
def test_interrupt_then_a_clean_run(host, models, name):
    family, model = td.FAMILIES[name], models[name]
    mm = host.comfy.model_management
    reference = sample(host, morse(host, model), family)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(host, morse(host, model), family)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(sample(host, morse(host, model), family), reference)


BLOCK_FAMILIES = sorted(n for n, f in td.FAMILIES.items() if f.blocks)


@pytest.mark.parametrize("name", BLOCK_FAMILIES)
@pytest.mark.parametrize("fill", ["inherit_k1", "forecast_k1", "forecast2_k2", "propagate"])
def test_block_fills_serve_their_steps_through_comfyuis_block_patches(host, models, name, fill, caplog):
    family, model = td.FAMILIES[name], models[name]
    plain = sample(host, model, family)
    if name == "sd3":  # the first SD3 run in a process learns at its first call that MMDiT is routed at apply_model;
        sample(host, morse(host, model, fill=fill), family)  # that call records no blocks (docs/models.md)
    with caplog.at_level(logging.INFO, logger="morse"):
        out = sample(host, morse(host, model, fill=fill), family)
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ")]
    assert any(f"2 Dash steps, 2 {fill} steps of {STEPS}" in line for line in lines), lines
    assert "patches_replace" not in model.model_options.get("transformer_options", {})  # nothing left patched


@pytest.mark.parametrize("name", BLOCK_FAMILIES)
@pytest.mark.parametrize("k", [1, 2])
def test_skipping_the_middle_blocks_with_their_recorded_residual_gives_the_dash_call_back(host, models, name, k):
    """On one call's own inputs, the blocks k..n-k-1 skipped and their residual from that same call added where
    they end must give the call's output (up to rounding): the record and the skip carry the streams alike."""
    from importlib import import_module

    block_replace = import_module(host.pack.__name__ + ".morse_engine.block_replace")
    family, model = td.FAMILIES[name], models[name].clone()
    blocks = block_replace.PatchedDiTBlocks(model.model.diffusion_model)
    first, last = k, blocks.n_blocks - k - 1
    pairs = []

    def probe(executor, *args, **kwargs):  # apply_model's own signature: (x, t, c_concat, c_crossattn, control, options)
        call = {"transformer_options": args[5], "control": args[4]}
        with blocks.recording(call, first, last) as recorded:
            out = executor(*args, **kwargs)
        assert "patches_replace" not in args[5] or "dit" not in args[5]["patches_replace"]
        with blocks.skipping(call, first, last, recorded["residual"]):
            pairs.append((out, executor(*args, **kwargs)))
        return out

    model.add_wrapper_with_key(host.comfy.patcher_extension.WrappersMP.APPLY_MODEL, "probe", probe)
    sample(host, model, family)
    assert len(pairs) == STEPS
    for out, again in pairs:
        assert torch.allclose(again, out, rtol=1e-4, atol=1e-4 * float(out.abs().max()))


def test_the_dit_block_benchmark_composes_n_from_timed_blocks(host, tmp_path):
    import json
    import os

    from training import bench_dit

    out = tmp_path / "dit.json"
    assert bench_dit.main(["--model", "tiny", "--resolution", "64", "--blocks", "1", "--repeats", "1",
                           "--comfyui", os.environ["COMFYUI_PATH"], "--json", str(out)]) == 0
    report = json.loads(out.read_text())["models"]["tiny"]
    parts, result = report["parts"], report["composed"]
    assert parts["samples"] == {"double_block": 1, "single_block": 1, "calls": 1}
    assert parts["counts"] == {"double_block": 19, "single_block": 38}  # Flux-dev's, from the full config
    t = parts["block_s"]
    assert result["dash_s"] == pytest.approx(parts["rest_s"] + 19 * t["double_block"] + 38 * t["single_block"])
    assert result["k1"]["N"] > result["k2"]["N"] > 1


@pytest.mark.parametrize("fill", ["inherit_k1", "forecast_k1"])
def test_a_lora_patched_dit_fills_with_the_patched_weights(host, models, fill):
    family, model = td.FAMILIES["flux"], models["flux"]
    lora = model.clone()
    key = "diffusion_model.single_blocks.2.linear2.weight"  # the last block: every block fill reruns it
    weight = model.model.diffusion_model.state_dict()[key[len("diffusion_model."):]]
    assert lora.add_patches({key: ("diff", (torch.full_like(weight, 0.05),))}) == [key]
    assert not torch.equal(sample(host, morse(host, lora, fill=fill), family), sample(host, morse(host, model, fill=fill), family))
    assert torch.equal(sample(host, morse(host, lora, host.engine.EveryK(1), fill), family), sample(host, lora, family))


def test_a_controlnet_input_on_a_dit_runs_dash_on_every_step(host, models, caplog):
    """ControlNet residuals are added after blocks a fill skips: such a call runs Dash, and the run is plain
    sampling's exactly."""
    from comfy_host import null_control

    family, model = td.FAMILIES["flux"], models["flux"]
    control = null_control(host)
    pos, neg = td.conditioning(family, 1), td.conditioning(family, 2)
    pos[0][1]["control"], neg[0][1]["control"] = control, control
    with caplog.at_level(logging.INFO, logger="morse"):
        out = sample(host, morse(host, model, fill="forecast_k1"), family, pos=pos, neg=neg)
    assert torch.equal(out, sample(host, model, family, pos=pos, neg=neg))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ")]
    assert lines and "0 forecast_k1 calls, 2 fell back to Dash" in lines[-1], lines


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_prior_noise_on_a_flow_model_injects_the_first_latent_in_the_second_half(host, models, name):
    """Faster Diffusion's prior noise on CONST models: every step on Dash, the injection alone changes the run, by
    alpha times the first latent on the steps below sigma 0.5 (Flux's timestep is sigma, SD3's 1000 sigma)."""
    family, model = td.FAMILIES[name], models[name]
    hooks, engine = host.hooks, host.engine

    def run(m):  # 8 steps: the shifted flow schedules keep 4 steps above sigma 0.5
        latent = td.latent(family)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        return host.comfy.sample.sample(m, noise, 8, 2.0, "euler", "simple", td.conditioning(family, 1),
                                        td.conditioning(family, 2), latent, seed=1, disable_pbar=True)

    def recorded(m):  # the model's input x and sigma at each call
        calls, m = [], m.clone()

        def record(executor, x, t, *args, **kwargs):
            calls.append((x.clone(), float(t.reshape(-1)[0])))
            return executor(x, t, *args, **kwargs)

        m.add_wrapper_with_key(host.comfy.patcher_extension.WrappersMP.APPLY_MODEL, "record", record)
        return run(m), calls

    plain, plain_calls = recorded(model)
    injected, calls = recorded(hooks.apply_morse(model, hooks.MorseSettings(schedule=engine.EveryK(1), prior_noise=0.003)))
    assert torch.isfinite(injected).all() and not torch.equal(injected, plain)
    first = next(i for i, ((x, _), (y, _)) in enumerate(zip(plain_calls, calls)) if not torch.equal(x, y))
    assert calls[first][1] < 0.5 <= calls[first - 1][1]  # the first shifted input is the first step below 0.5


DOT_FAMILIES = ["flux", "wan21", "sd3", "qwen_image"]


@pytest.mark.parametrize("name", DOT_FAMILIES)
def test_a_dit_feature_dot_loads_from_its_file_and_serves_the_fill_steps(host, models, name, tmp_path, caplog):
    """The feature Dot on a ComfyUI DiT, from a Dot file as Load Dot Model reads it: untrained it samples exactly as
    the training-free forecast_k1 fill (its change starts at zero); with a change it samples otherwise, each fill
    step served by the Dot."""
    engine, hooks = host.engine, host.hooks
    family, model = td.FAMILIES[name], models[name]
    backbone = model.model.diffusion_model
    if name == "sd3":  # the first SD3 run in a process learns where to route it (see the block-fill test)
        sample(host, morse(host, model, fill="forecast_k1"), family)
    torch.manual_seed(0)
    dot = engine.FeatureDot.build(backbone, engine.FeatureDotConfig().bound_to(backbone, "flow"))
    assert dot.config.backbone == "dit"

    def dot_run(path):
        settings = hooks.MorseSettings(schedule=engine.EveryK(2), dot=engine.DotFile(path))
        return sample(host, hooks.apply_morse(model, settings), family)

    untrained = engine.save_dot(tmp_path / "untrained.safetensors", dot, base_family=f"tiny-{name}",
                                fingerprint=engine.fingerprint_module(backbone), measured_n=10.0)
    assert torch.equal(dot_run(untrained), sample(host, morse(host, model, fill="forecast_k1"), family))
    with torch.no_grad():
        dot.change.out.weight.normal_(0, 0.02)
    changed = engine.save_dot(tmp_path / "changed.safetensors", dot, base_family=f"tiny-{name}",
                              fingerprint=engine.fingerprint_module(backbone), measured_n=10.0)
    with caplog.at_level(logging.INFO, logger="morse"):
        out = dot_run(changed)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(host, morse(host, model, fill="forecast_k1"), family))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ")]
    assert any(f"2 Dash steps, 2 dot steps of {STEPS}" in line for line in lines), lines
