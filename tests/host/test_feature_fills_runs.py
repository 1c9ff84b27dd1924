"""Each feature fill through Morse KSampler in a real ComfyUI, in the situations a user meets: every step Dash,
cond and uncond in separate calls, a resolution change, img2img, second-order and SDE samplers, an interrupt,
a LoRA-patched model, a ControlNet input; and encoder propagation's parallel decoding against decoding each
step on its own."""
import logging
import re

import pytest
import torch

from comfy_host import conditioning, null_control
from test_morse_ksampler import ksampler, morse

FILLS = ["inherit_k1", "inherit_k2", "forecast_k2", "forecast2_k2", "propagate"]


def logged(caplog, fn):
    """The result of ``fn`` and the counts of its Morse log line."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="morse"):
        out = fn()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse:"))
    calls = re.search(r"\((\d+) Dash calls, (\d+) \w+ calls.*?, (\d+) fell back to Dash\)", line)
    return out, dict(zip(("dash", "fill", "fallback"), map(int, calls.groups()))), line


def pattern(host, p="D."):
    return host.engine.Pattern(p)


@pytest.mark.parametrize("fill", FILLS)
def test_every_step_dash_is_bit_identical_to_ksampler(host, tiny, fill):
    for sampler in ("euler", "heun", "dpmpp_sde"):
        out = morse(host, tiny, sampler, steps=5, schedule=host.engine.EveryK(1), fill_without_dot=fill)
        assert torch.equal(out, ksampler(host, tiny, sampler, steps=5)), sampler


@pytest.mark.parametrize("fill", FILLS)
def test_batch_two_with_cond_and_uncond_in_separate_calls(host, tiny, fill, caplog):
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    pos, neg = conditioning(1, 77, batch=2), conditioning(2, 78, batch=2)  # 77 vs 78 tokens: never one call
    out, calls, _ = logged(caplog, lambda: morse(host, tiny, steps=6, latent=latent, pos=pos, neg=neg,
                                                 schedule=pattern(host), fill_without_dot=fill))
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert calls == {"dash": 6, "fill": 6, "fallback": 0}  # 3 Dash + 3 fill steps, cond and uncond apart


@pytest.mark.parametrize("fill", FILLS)
def test_a_resolution_change_between_runs_starts_clean(host, tiny, fill, caplog):
    runs = []
    for size in (16, 24, 16):
        out, calls, _ = logged(caplog, lambda: morse(host, tiny, steps=6, latent={"samples": torch.zeros(1, 4, size, size)},
                                                     schedule=pattern(host), fill_without_dot=fill))
        assert out.shape == (1, 4, size, size) and torch.isfinite(out).all() and calls["fallback"] == 0
        runs.append(out)
    assert torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("fill", FILLS)
def test_img2img_at_denoise_0_6(host, tiny, fill, caplog):
    start = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))}
    out, calls, line = logged(caplog, lambda: morse(host, tiny, steps=10, latent=start, denoise=0.6,
                                                    schedule=pattern(host), fill_without_dot=fill))
    assert torch.isfinite(out).all() and calls["fill"] > 0 and calls["fallback"] == 0 and "of 10" in line
    plain = ksampler(host, tiny, steps=10, latent=start, denoise=0.6)
    assert not torch.equal(out, plain)
    assert torch.equal(morse(host, tiny, steps=10, latent=start, denoise=0.6, schedule=host.engine.EveryK(1),
                             fill_without_dot=fill), plain)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("sampler", ["heun", "dpmpp_sde"])
def test_second_order_and_sde_samplers(host, tiny, fill, sampler, caplog):
    out, calls, line = logged(caplog, lambda: morse(host, tiny, sampler, steps=6, schedule=pattern(host),
                                                    fill_without_dot=fill))
    assert torch.isfinite(out).all() and calls["fill"] >= 3 and calls["fallback"] == 0
    assert f"3 Dash steps, 3 {fill} steps of 6" in line


@pytest.mark.parametrize("fill", FILLS)
def test_an_interrupt_then_a_clean_run(host, tiny, fill):
    mm = host.comfy.model_management
    reference = morse(host, tiny, steps=6, schedule=pattern(host), fill_without_dot=fill)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            morse(host, tiny, steps=6, schedule=pattern(host), fill_without_dot=fill)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(morse(host, tiny, steps=6, schedule=pattern(host), fill_without_dot=fill), reference)


@pytest.mark.parametrize("fill", FILLS)
def test_a_lora_patched_model_fills_with_the_patched_weights(host, tiny, fill):
    lora = tiny.clone()
    # the last output block: every fill reruns it
    key = "diffusion_model.output_blocks.3.0.out_layers.3.weight"
    weight = tiny.model.diffusion_model.state_dict()[key[len("diffusion_model."):]]
    assert lora.add_patches({key: ("diff", (torch.full_like(weight, 0.05),))}) == [key]
    plain = morse(host, tiny, steps=6, schedule=pattern(host), fill_without_dot=fill)
    patched = morse(host, lora, steps=6, schedule=pattern(host), fill_without_dot=fill)
    assert not torch.equal(plain, patched)
    assert torch.equal(morse(host, lora, steps=6, schedule=host.engine.EveryK(1), fill_without_dot=fill),
                       ksampler(host, lora, steps=6))


@pytest.mark.parametrize("fill", FILLS)
def test_a_control_input_runs_dash_on_every_step(host, tiny, fill, caplog):
    """ControlNet residuals are not cached with the features, so a call with a control input falls back to
    Dash: the run is KSampler's exactly."""
    control = null_control(host)
    pos = [[conditioning(1)[0][0], {"control": control}]]
    neg = [[conditioning(2)[0][0], {"control": control}]]
    out, calls, _ = logged(caplog, lambda: morse(host, tiny, steps=6, pos=pos, neg=neg, schedule=pattern(host),
                                                 fill_without_dot=fill))
    assert calls["fill"] == 0 and calls["fallback"] == 3
    assert torch.equal(out, ksampler(host, tiny, steps=6, pos=pos, neg=neg))


def test_parallel_decoding_matches_decoding_each_step_and_batches_the_span(host, tiny, caplog, monkeypatch):
    """Faster Diffusion's key steps with encoder propagation: the steps up to each key step decoded in one call
    (as on a GPU) give the samples of decoding them one by one (the CPU's default)."""
    hooks = __import__(host.pack.__name__ + ".nodes.sampling_hooks", fromlist=["x"])
    schedule = host.engine.KeySteps()
    seq, calls, seq_line = logged(caplog, lambda: morse(host, tiny, steps=25, schedule=schedule, fill_without_dot="propagate"))
    assert "decoded ahead" not in seq_line and calls["fallback"] == 0  # this is a CPU
    monkeypatch.setattr(hooks, "decodes_spans_at_once", lambda device: True)
    par, _, line = logged(caplog, lambda: morse(host, tiny, steps=25, schedule=schedule, fill_without_dot="propagate"))
    assert "decoded ahead in batched calls" in line
    torch.testing.assert_close(par, seq, rtol=1e-4, atol=1e-4)
    assert not torch.equal(par, ksampler(host, tiny, steps=25))


def test_prior_noise_injection_changes_only_the_late_steps_and_leaves_no_wrapper(host, tiny, caplog):
    """Faster Diffusion's prior noise injection on Morse KSampler: a small change of the sample, none with 0."""
    plain = ksampler(host, tiny, steps=10)
    dash_only = host.engine.EveryK(1)
    assert torch.equal(morse(host, tiny, steps=10, schedule=dash_only, prior_noise=0.0), plain)
    injected = morse(host, tiny, steps=10, schedule=dash_only, prior_noise=0.003)
    assert torch.isfinite(injected).all() and not torch.equal(injected, plain)
    assert (injected - plain).abs().mean() < 0.1 * plain.abs().mean()  # a texture-sized change, not a new image
    # with Faster Diffusion's whole recipe: key steps, encoder propagation, the injection
    out = morse(host, tiny, steps=20, schedule=host.engine.KeySteps(), fill_without_dot="propagate", prior_noise=0.003)
    assert torch.isfinite(out).all()
    assert not tiny.get_wrappers(host.comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "morse")
    with pytest.raises(ValueError, match="prior_noise"):
        morse(host, tiny, steps=4, prior_noise=5.0)
