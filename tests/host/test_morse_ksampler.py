"""Morse KSampler and Morse Model Patch inside a real ComfyUI, on tiny SD1.x-family models."""
import json
from pathlib import Path

import pytest
import torch

from comfy_host import REPO, conditioning, save_test_dot

STEPS = 4


def node(host, name):
    return host.nodes.NODE_CLASS_MAPPINGS[name]


def ksampler(host, model, sampler="euler", steps=STEPS, cfg=3.0, latent=None, denoise=1.0, pos=None, neg=None, seed=7):
    latent = latent or {"samples": torch.zeros(1, 4, 16, 16)}
    return host.nodes.common_ksampler(
        model, seed, steps, cfg, sampler, "normal", pos or conditioning(1), neg or conditioning(2), latent, denoise=denoise
    )[0]["samples"]


def morse(host, model, sampler="euler", steps=STEPS, cfg=3.0, latent=None, denoise=1.0, pos=None, neg=None, seed=7, **extra):
    latent = latent or {"samples": torch.zeros(1, 4, 16, 16)}
    out = node(host, "MorseKSampler").execute(
        model, seed, steps, cfg, sampler, "normal", pos or conditioning(1), neg or conditioning(2), latent, denoise, **extra
    )
    return out.result[0]["samples"]


def schedule(host, pattern):
    return host.engine.Pattern(pattern)


class BackboneSizes:
    """Records the spatial size the UNet's first conv sees: full for Dash, 1/2^m for the Dot."""

    def __init__(self, model):
        self.sizes = []
        conv = model.model.diffusion_model.input_blocks[0][0]
        self.handle = conv.register_forward_pre_hook(lambda mod, args: self.sizes.append(args[0].shape[-1]))

    def close(self):
        self.handle.remove()


def test_comfyui_lists_the_nodes_with_tooltips_in_one_category(host):
    assert {"MorseLoadDotModel", "MorseDashDotSchedule", "MorseKSampler", "MorseModelPatch"} <= set(host.new_nodes)
    categories = set()
    for name in host.new_nodes:
        info = node(host, name).GET_NODE_INFO_V1()
        categories.add(info["category"])
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert categories == {"sampling/morse"}


def test_every_example_workflow_uses_only_existing_node_types(host):
    import asyncio

    asyncio.run(host.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    files = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(files) >= 3
    for path in files:
        workflow = json.loads(path.read_text())
        types = {n["type"] for n in workflow["nodes"]}
        missing = types - set(host.nodes.NODE_CLASS_MAPPINGS) - {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
        assert not missing, f"{path.name} uses missing node types {missing}"
        for n in workflow["nodes"]:
            if n["type"] in host.new_nodes:  # our widget values must line up with our widget inputs
                info = node(host, n["type"]).GET_NODE_INFO_V1()["input"]
                specs = [spec for section in ("required", "optional") for spec in info.get(section, {}).values()]
                widgets = [s for s in specs if s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or isinstance(s[0], list)]
                extra = sum(1 for s in widgets if len(s) > 1 and s[1].get("control_after_generate"))
                assert len(n["widgets_values"]) == len(widgets) + extra, f"{path.name}: {n['type']} widget values"


@pytest.mark.parametrize("sampler", ["__all__"])
def test_dash_only_schedule_is_bit_identical_to_ksampler_for_every_sampler(host, tiny, sampler):
    mismatched = []
    for name in host.comfy.samplers.KSampler.SAMPLERS:
        expected = ksampler(host, tiny, name)
        got = morse(host, tiny, name, schedule=host.engine.EveryK(1))
        if not torch.equal(expected, got):
            mismatched.append(name)
    assert not mismatched, f"not bit-identical for {mismatched}"


def test_mixed_schedule_runs_dash_on_scheduled_steps_and_the_dot_on_the_others(host, tiny, dot_folder):
    name = save_test_dot(host, tiny, dot_folder, m=1)
    dot = node(host, "MorseLoadDotModel").execute(name).result[0]
    probe = BackboneSizes(tiny)
    try:
        out = morse(host, tiny, "euler", steps=6, schedule=schedule(host, "D.."), dot=dot)
    finally:
        probe.close()
    # one batched cond+uncond call per step: Dash at 16x16, Dot at 8x8 (m = 1)
    assert probe.sizes == [16, 8, 8, 16, 8, 8]
    assert not torch.equal(out, ksampler(host, tiny, "euler", steps=6))


def test_second_order_sampler_counts_each_step_once(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    probe = BackboneSizes(tiny)
    try:
        morse(host, tiny, "heun", steps=4, schedule=schedule(host, "D."), dot=dot)
    finally:
        probe.close()
    # heun: 2 calls per step except the last; the corrector of step i is at sigma_{i+1}
    assert probe.sizes.count(16) >= 2 and probe.sizes.count(8) >= 2


def test_batch_two_with_cond_and_uncond_in_separate_calls(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    seen = []
    model = tiny.clone()

    def spy(executor, *args, **kwargs):
        seen.append(len(args[5]["uuids"]))
        return executor(*args, **kwargs)

    WrappersMP = host.comfy.patcher_extension.WrappersMP
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "spy", spy)
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    # 77 vs 78 tokens cannot be concatenated, so ComfyUI calls cond and uncond separately
    pos, neg = conditioning(1, 77), conditioning(2, 78)
    out = morse(host, model, "euler", steps=4, latent=latent, pos=pos, neg=neg, schedule=schedule(host, "D."), dot=dot)
    assert set(seen) == {1} and len(seen) == 8
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    dash_only = morse(host, model, "euler", steps=4, latent=latent, pos=pos, neg=neg, schedule=host.engine.EveryK(1))
    assert torch.equal(dash_only, ksampler(host, tiny, "euler", latent=latent, pos=pos, neg=neg))


def test_cfg_one_runs_without_an_uncond_batch(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    out = morse(host, tiny, "euler", cfg=1.0, schedule=schedule(host, "D."), dot=dot)
    assert torch.isfinite(out).all()
    assert torch.equal(morse(host, tiny, "euler", cfg=1.0, schedule=host.engine.EveryK(1)), ksampler(host, tiny, "euler", cfg=1.0))


def test_denoise_half_img2img(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    start = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))}
    probe = BackboneSizes(tiny)
    try:
        out = morse(host, tiny, "euler", steps=4, latent=start, denoise=0.5, schedule=schedule(host, "D."), dot=dot)
    finally:
        probe.close()
    assert probe.sizes == [16, 8, 16, 8]
    assert torch.isfinite(out).all()
    assert torch.equal(
        morse(host, tiny, "euler", latent=start, denoise=0.5, schedule=host.engine.EveryK(1)),
        ksampler(host, tiny, "euler", latent=start, denoise=0.5),
    )


def test_denoise_zero_is_refused_with_a_clear_error(host, tiny):
    with pytest.raises(ValueError, match="denoise is 0"):
        morse(host, tiny, denoise=0.0)


def test_lora_patched_model_keeps_its_dot_and_its_patch(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    lora = tiny.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weight = tiny.model.diffusion_model.state_dict()[key[len("diffusion_model."):]]
    assert lora.add_patches({key: ("diff", (torch.full_like(weight, 0.05),))}) == [key]
    plain = morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot)
    patched = morse(host, lora, "euler", schedule=schedule(host, "D."), dot=dot)  # no fingerprint refusal
    assert not torch.equal(plain, patched)
    assert torch.equal(morse(host, lora, "euler", schedule=host.engine.EveryK(1)), ksampler(host, lora, "euler"))


def test_an_exception_mid_run_leaves_the_next_run_clean(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    reference = morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot)
    failing = tiny.clone()
    calls = []

    def explode(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return executor(*args, **kwargs)

    failing.add_wrapper_with_key(host.comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "explode", explode)
    with pytest.raises(RuntimeError, match="boom"):
        morse(host, failing, "euler", schedule=schedule(host, "D."), dot=dot)
    assert torch.equal(morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot), reference)


def test_comfyui_interrupt_then_a_clean_run(host, tiny, dot_folder):
    mm = host.comfy.model_management
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    reference = morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot), reference)


def test_resolution_change_between_runs(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    for size in (16, 24, 16):
        out = morse(host, tiny, "euler", latent={"samples": torch.zeros(1, 4, size, size)}, schedule=schedule(host, "D."), dot=dot)
        assert out.shape == (1, 4, size, size) and torch.isfinite(out).all()


def test_incoming_model_is_unchanged_after_a_run(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    options = repr(tiny.model_options)
    wrappers = repr(tiny.wrappers)
    weights = {k: v.clone() for k, v in tiny.model.diffusion_model.state_dict().items()}
    morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot)
    assert repr(tiny.model_options) == options and repr(tiny.wrappers) == wrappers
    now = tiny.model.diffusion_model.state_dict()
    assert list(now) == list(weights) and all(torch.equal(now[k], weights[k]) for k in weights)
    assert all(not m._forward_hooks for m in tiny.model.diffusion_model.modules())


def test_two_morse_ksamplers_in_one_workflow(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    first = morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot)
    second = morse(host, tiny, "dpmpp_2m", latent={"samples": first}, denoise=0.5, schedule=schedule(host, "D.."), dot=dot)
    again = morse(host, tiny, "euler", schedule=schedule(host, "D."), dot=dot)
    assert torch.equal(first, again) and torch.isfinite(second).all()


def test_load_dot_model_names_a_broken_file(host, dot_folder):
    (dot_folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    host.folder_paths.filename_list_cache.pop("dot_models", None)
    with pytest.raises(ValueError, match="broken.safetensors"):
        node(host, "MorseLoadDotModel").execute("broken.safetensors")


def test_dot_for_another_model_is_refused_when_sampling_starts(host, tiny, dot_folder):
    from comfy_host import build_tiny_sd15

    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    other = build_tiny_sd15(host, seed=99)
    with pytest.raises(ValueError, match="^Morse: .*other weights"):
        morse(host, other, "euler", schedule=schedule(host, "D."), dot=dot)
    # the synthetic fine-tune (zero-mean noise of 10% of each tensor's std) and rank-8 merge (5% on the
    # attention weights), baked into the checkpoint's weights: other weights too
    g = torch.Generator().manual_seed(5)
    for change in ("fine-tune", "merge"):
        changed = build_tiny_sd15(host)
        with torch.no_grad():
            for name, p in changed.model.diffusion_model.named_parameters():
                if change == "fine-tune" and p.numel() > 1:
                    p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
                elif change == "merge" and ".attn" in name and p.dim() == 2:
                    delta = torch.randn(p.shape[0], 8, generator=g) @ torch.randn(8, p.shape[1], generator=g)
                    p.add_(0.05 * p.abs().mean() * delta / delta.abs().mean())
        with pytest.raises(ValueError, match="^Morse: .*other weights"):
            morse(host, changed, "euler", schedule=schedule(host, "D."), dot=dot)
        assert torch.isfinite(morse(host, changed, "euler", schedule=schedule(host, "D."), dot=dot,
                                    allow_other_weights=True)).all()


def test_schedule_node_shows_pattern_and_cost(host):
    out = node(host, "MorseDashDotSchedule").execute("pattern", 2, 0.5, "D..", 1, 10.0, 5.0, 9)
    spec, text = out.result
    assert text.startswith("pattern D.., last 1 Dash: at 9 steps D..D..D.D")
    assert "LSD at N=5" in text
    budget, text = node(host, "MorseDashDotSchedule").execute("lsd_budget", 2, 0.5, "D.", 0, 10.0, 5.0, 20).result
    assert "16 steps" in text and "9.60 LSD" in text
    with pytest.raises(ValueError, match="start it with 'D'"):
        node(host, "MorseDashDotSchedule").execute("pattern", 2, 0.5, ".D", 0, 10.0, 0.0, 9)


def test_lsd_budget_schedule_sets_the_step_count(host, tiny, dot_folder):
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    budget = host.engine.BudgetSchedule(host.engine.EveryK(2), 3.0)  # N = 4 from the file: 4 steps cost 2.5
    probe = BackboneSizes(tiny)
    try:
        morse(host, tiny, "euler", steps=50, schedule=budget, dot=dot)
    finally:
        probe.close()
    assert probe.sizes == [16, 8, 16, 8]


def test_an_lsd_budget_without_a_dot_prices_free_fills_free_and_asks_n_of_a_fill_that_runs_blocks(host, tiny, caplog):
    import logging

    budget = host.engine.BudgetSchedule(host.engine.Pattern("D."), 4.0)
    with caplog.at_level(logging.INFO, logger="morse"):
        morse(host, tiny, "euler", steps=50, schedule=budget, fill_without_dot="reuse")
    line = next(r.getMessage() for r in caplog.records if "LSD budget" in r.getMessage())
    assert "plans 8 steps (D.D.D.D.)" in line  # 4 Dash steps for 4 LSD, the fills free: none lost to rounding
    with pytest.raises(ValueError, match="needs N"):
        morse(host, tiny, "euler", steps=50, schedule=budget, fill_without_dot="inherit_k2")
    priced = host.engine.BudgetSchedule(host.engine.Pattern("D."), 4.0, n_speed=4.0)  # 3 Dash + 3 fills = 3.75
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="morse"):
        morse(host, tiny, "euler", steps=50, schedule=priced, fill_without_dot="inherit_k2")
    line = next(r.getMessage() for r in caplog.records if "LSD budget" in r.getMessage())
    assert "plans 6 steps (D.D.D.)" in line


def test_schedule_node_lsd_budget_auto_says_which_pattern_and_why(host):
    engine = host.engine
    spec, text = node(host, "MorseDashDotSchedule").execute("lsd_budget", 2, 0.5, " Auto ", 0, 6.0, 9.7, 20).result
    choice = engine.choose_pattern(6.0, 9.7)  # the one home of the choice; the node has no sampler yet
    assert isinstance(spec.spec, engine.AutoPattern)
    assert f"pattern {choice.pattern} (rule: " in text and "auto pattern" in text
    _, explicit = node(host, "MorseDashDotSchedule").execute("lsd_budget", 2, 0.5, "D.", 0, 10.0, 5.0, 20).result
    assert "rule" not in explicit and "measured" not in explicit
    _, waiting = node(host, "MorseDashDotSchedule").execute("lsd_budget", 2, 0.5, "auto", 0, 6.0, 0.0, 20).result
    assert "when the Dot's N is known" in waiting
    with pytest.raises(ValueError, match="lsd_budget"):
        node(host, "MorseDashDotSchedule").execute("pattern", 2, 0.5, "auto", 0, 10.0, 0.0, 9)


def test_lsd_budget_auto_plans_with_the_dots_measured_table_for_the_sampler_else_the_rule(host, tiny, dot_folder, caplog):
    engine = host.engine
    name = save_test_dot(host, tiny, dot_folder)  # N = 4
    engine.write_pattern_table(dot_folder / name, {"euler": [[3, "D.."]]})
    dot = node(host, "MorseLoadDotModel").execute(name).result[0]
    budget = node(host, "MorseDashDotSchedule").execute("lsd_budget", 2, 0.5, "auto", 0, 3.0, 0.0, 20).result[0]
    runs = {}
    for sampler in ("euler", "dpmpp_2m"):  # the table has euler only: dpmpp_2m gets the rule
        probe = BackboneSizes(tiny)
        try:
            with caplog.at_level("INFO", logger="morse"):
                morse(host, tiny, sampler, steps=50, schedule=budget, dot=dot)
        finally:
            probe.close()
        runs[sampler] = "".join("D" if size == 16 else "." for size in probe.sizes)
    for sampler, pattern in runs.items():  # what ran is what the engine's planner gives for that sampler
        assert pattern == budget.plan(4.0, sampler, dot.pattern_table).schedule.pattern()
    assert runs["euler"].startswith("D..D") and engine.choose_pattern(3.0, 4.0, "dpmpp_2m", dot.pattern_table).source == "rule"
    assert runs["dpmpp_2m"] != runs["euler"]
    assert "pattern D.. (measured: best for euler at 3 LSD)" in caplog.text and "(rule: " in caplog.text


def test_custom_sampling_with_morse_model_patch(host, tiny, dot_folder):
    """SamplerCustomAdvanced path: CFGGuider over the patched model, custom sigmas."""
    comfy = host.comfy
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]
    patched = node(host, "MorseModelPatch").execute(tiny, dot=dot, schedule=schedule(host, "D.")).result[0]
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.3, 0.0])  # e.g. from Align Your Steps
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    probe = BackboneSizes(tiny)
    try:
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(conditioning(1), conditioning(2))
        guider.set_cfg(3.0)
        out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=1)
    finally:
        probe.close()
    assert probe.sizes == [16, 8, 16, 8, 16]
    assert torch.isfinite(out).all()


def test_morse_model_patch_with_an_auto_budget_uses_the_rules_pattern_over_the_sigmas(host, tiny, dot_folder):
    engine, comfy = host.engine, host.comfy
    dot = node(host, "MorseLoadDotModel").execute(save_test_dot(host, tiny, dot_folder)).result[0]  # N = 4
    budget = node(host, "MorseDashDotSchedule").execute("lsd_budget", 2, 0.5, "auto", 0, 3.0, 0.0, 20).result[0]
    patched = node(host, "MorseModelPatch").execute(tiny, dot=dot, schedule=budget).result[0]
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.3, 0.0])
    probe = BackboneSizes(tiny)
    try:
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(conditioning(1), conditioning(2))
        guider.set_cfg(3.0)
        guider.sample(torch.randn(1, 4, 16, 16), torch.zeros(1, 4, 16, 16), comfy.samplers.sampler_object("euler"), sigmas, seed=1)
    finally:
        probe.close()
    chosen = engine.Pattern(engine.choose_pattern(3.0, 4.0).pattern).resolve(5).pattern()
    assert "".join("D" if size == 16 else "." for size in probe.sizes) == chosen
