"""The reference DiT (a flow-matching miniature of ComfyUI's Flux), the flow parameterisation, and the DiT block fills
run on it through the block-replace patches; the evaluation tools on a DiT Dash. (Its agreement with ComfyUI's own
Flux class: tests/host/test_reference_dit_in_comfyui.py.)"""
import math

import pytest
import torch

from morse_engine import MorseError, make_fill
from morse_engine.block_replace import PatchedDiTBlocks
from morse_engine.parameterization import DiscreteSchedule, FlowSchedule, denoised_from_eps, scale_input, to_eps
from training.reference.dit import DEFAULT_DIT_PATH, FluxConfig, ReferenceFlux
from training.reference.unet import ClassConditioner, sd_alphas_cumprod

SMALL = FluxConfig(hidden_size=32, num_heads=2, depth=2, depth_single_blocks=4, axes_dim=[4, 6, 6], patch_size=4,
                   context_in_dim=16)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return ReferenceFlux(SMALL).eval().requires_grad_(False)


def inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 32, 32, generator=g), torch.rand(b, generator=g), torch.randn(b, 2, 16, generator=g)


def test_flow_schedule_is_comfyuis_flux_sampling():
    mu = 0.5
    ms = FlowSchedule.flux(mu)
    t = torch.arange(1, 10001, dtype=torch.float32) / 10000
    comfy = math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # comfy.model_sampling.flux_time_shift(mu, 1.0, t)
    assert torch.allclose(ms.sigmas, comfy, atol=1e-6)
    assert ms.sigma_max == pytest.approx(1.0) and 0 < ms.sigma_min < 1e-3
    s = torch.tensor([0.9, 0.3])
    assert torch.equal(ms.timestep(s), s)  # ModelSamplingFlux: the timestep is sigma itself
    sd3 = FlowSchedule(shift=3.0, multiplier=1000)  # ModelSamplingDiscreteFlow as SD3 sets it
    assert torch.allclose(sd3.timestep(s), 1000 * s)
    # as in ComfyUI, sigma() shifts its timestep (it is not timestep()'s inverse): the "normal" scheduler relies on it
    assert torch.allclose(sd3.sigma(torch.tensor([500.0])), torch.tensor([0.75]))


def test_flow_denoised_is_x_minus_sigma_times_velocity():
    ms = FlowSchedule.flux()
    x0, noise, s = torch.randn(3, 4), torch.randn(3, 4), 0.7
    x = (1 - s) * x0 + s * noise
    assert torch.allclose(ms.denoised(x, s, noise - x0), x0, atol=1e-6)
    assert ms.model_input(x, s) is x
    assert torch.equal(ms.initial_latent(noise, 1.0), noise)
    with pytest.raises(ValueError, match="velocity"):
        ms.denoised(x, s, noise, "eps")


def test_x0_prediction_gives_its_own_estimate_back():
    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod(), "x0")
    x, z, s = torch.randn(2, 4), torch.randn(2, 4), 3.0
    assert torch.allclose(ms.denoised(x, s, z), z, atol=1e-5)
    assert torch.allclose(denoised_from_eps(x, s, to_eps(scale_input(x, s), s, z, "x0")), z, atol=1e-5)


def test_reference_dit_has_comfyuis_flux_keys_and_shapes(dit):
    keys = set(dit.state_dict())
    for key in ("img_in.weight", "time_in.in_layer.weight", "txt_in.weight", "double_blocks.0.img_mod.lin.weight",
                "double_blocks.0.img_attn.qkv.bias", "double_blocks.0.txt_attn.norm.query_norm.scale",
                "double_blocks.1.txt_mlp.2.weight", "single_blocks.3.linear1.weight", "single_blocks.0.norm.key_norm.scale",
                "single_blocks.0.modulation.lin.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.bias"):
        assert key in keys
    x, t, ctx = inputs()
    assert dit(x, t, ctx).shape == x.shape
    with pytest.raises(ValueError, match="context"):
        dit(x, t)


def test_reference_dit_is_per_sample(dit):
    x, t, ctx = inputs(3)
    both = dit(x, t, ctx)
    assert torch.allclose(dit(x[1:2], t[1:2], ctx[1:2]), both[1:2], atol=1e-5)


def test_block_replace_patches_are_called_in_place_of_each_block(dit):
    x, t, ctx = inputs()
    seen = []

    def watch(key):
        def block(args, extra):
            seen.append(key)
            return extra["original_block"](args)

        return block

    patches = {key: watch(key) for key in PatchedDiTBlocks(dit).keys}
    out = dit(x, t, ctx, transformer_options={"patches_replace": {"dit": patches}})
    assert seen == PatchedDiTBlocks(dit).keys == [("double_block", 0), ("double_block", 1)] + [("single_block", i) for i in range(4)]
    assert torch.allclose(out, dit(x, t, ctx), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_skipping_the_middle_with_the_calls_own_residual_gives_the_call_back(dit, k):
    x, t, ctx = inputs()
    blocks = PatchedDiTBlocks(dit)
    first, last = k, blocks.n_blocks - k - 1
    kwargs = {"transformer_options": {}}
    with blocks.recording(kwargs, first, last) as rec:
        out = dit(x, t, ctx, **kwargs)
    assert kwargs["transformer_options"] == {}  # the patches are taken out again
    with blocks.skipping(kwargs, first, last, rec["residual"]):
        again = dit(x, t, ctx, **kwargs)
    assert torch.allclose(again, out, atol=1e-5)
    with blocks.skipping(kwargs, first, last, torch.zeros_like(rec["residual"])):
        assert not torch.allclose(dit(x, t, ctx, **kwargs), out, atol=1e-3)


def test_dit_fills_by_name(dit):
    blocks = PatchedDiTBlocks(dit)
    assert make_fill("forecast_k1", blocks=blocks).name == "forecast_k1"
    assert make_fill("propagate", blocks=blocks).last == 3  # Faster Diffusion's 18 of 28 blocks: 4 of these 6
    with pytest.raises(MorseError, match="unknown fill"):
        make_fill("forecast2_k1", blocks=blocks)


def test_encoder_propagation_decodes_the_recorded_encoder_state_whatever_the_current_input(dit):
    """Faster Diffusion on a DiT: the decoder blocks run on the encoder's state from the Dash call, so at that
    call's own time the fill gives the call back, and the current input does not enter."""
    x, t, ctx = inputs()
    blocks = PatchedDiTBlocks(dit)
    kwargs = {"transformer_options": {}}
    with blocks.recording(kwargs, 0, 3, state=True) as rec:
        out = dit(x, t, ctx, **kwargs)
    with blocks.skipping(kwargs, 0, 3, rec["state"], replace=True):
        again = dit(x, t, ctx, **kwargs)
        other_input = dit(torch.randn_like(x), t, ctx, **kwargs)
        later = dit(x, t * 0.5, ctx, **kwargs)
    assert torch.allclose(again, out, atol=1e-5) and torch.allclose(other_input, out, atol=1e-5)
    assert not torch.allclose(later, out, atol=1e-3)  # the time still enters, through the decoder's modulation


def test_compare_fills_runs_on_a_dit_dash(tmp_path):
    from training import compare_fills
    from training.train_reference import atomic_save

    torch.manual_seed(1)
    dit, cond = ReferenceFlux(SMALL), ClassConditioner(context_dim=16, n_tokens=2)
    path = tmp_path / "dit.safetensors"
    tensors = {f"diffusion_model.{k}": v for k, v in dit.state_dict().items()}
    tensors.update({f"conditioner.{k}": v for k, v in cond.state_dict().items()})
    atomic_save(tensors, path, {"kind": "reference_dit", "config": {"dit": SMALL.to_dict(),
                                                                    "conditioner": {"context_dim": 16, "n_tokens": 2}},
                                "schedule": FlowSchedule.flux(0.5).to_dict(), "image_size": [1, 32, 32]})
    out = tmp_path / "rows.json"
    assert compare_fills.main(["--dash", str(path), "--fills", "extrapolate,inherit_k1,forecast_k1", "--samples", "2",
                               "--steps", "4", "--reference-steps", "8", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert set(rows[0]["fills"]) == {"extrapolate", "inherit_k1", "forecast_k1"}
    assert all(math.isfinite(f["rmse"]) and f["fill_calls_per_run"] == 2 for f in rows[0]["fills"].values())
    assert compare_fills.main(["--dash", str(path), "--fills", "forecast2_k1", "--samples", "2", "--steps", "4"]) == 2


def test_the_committed_reference_dit_loads_with_its_quality_check():
    from training.reference.dit import load_reference_dit

    dit, cond, meta = load_reference_dit()
    assert meta["kind"] == "reference_dit" and meta["prediction"] == "flow"
    assert meta["quality_check"]["class_accuracy"] > 0.5
    assert not any(p.requires_grad for p in dit.parameters())


def test_an_untrained_dit_feature_dot_is_the_forecast_fill_bit_for_bit(dit):
    """The DiT feature Dot starts as forecast_k1: its change's output layer is zero, so a routed run with it gives
    the training-free fill's samples exactly; once the change is not zero, they differ."""
    from morse_engine import FeatureDot, FeatureDotConfig, MorseRouter, Pattern
    from morse_engine.dot_layouts.feature import fill_for
    from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample

    blocks = PatchedDiTBlocks(dit)
    dot = FeatureDot.build(dit, FeatureDotConfig().bound_to(dit, "flow")).eval()
    assert dot.config.backbone == "dit" and dot.config.deep_channels == SMALL.hidden_size
    ms = FlowSchedule.flux(0.5)
    x, _, ctx = inputs(2)
    sigmas = normal_sigmas(ms, 6)

    def run(filler):
        router = MorseRouter(Pattern("D."), filler, measure=True)
        with router.run(sigmas) as r:
            den = GuidedDenoiser(dit, ms, ctx, torch.zeros_like(ctx), 2.0, run=r)
            out = sample("euler", den, x, sigmas, ms)
        return out, router.last_summary

    dotted, summary = run(fill_for(dot, dit, blocks))
    forecast, _ = run(make_fill("forecast_k1", blocks=blocks))
    assert summary.dot_calls == 3 and torch.equal(dotted, forecast)
    with torch.no_grad():
        dot.change.out.weight.normal_(std=0.1)
    assert not torch.equal(run(fill_for(dot, dit, blocks))[0], forecast)
    with pytest.raises(Exception, match="trained for a DiT"):
        fill_for(dot, dit, object())
