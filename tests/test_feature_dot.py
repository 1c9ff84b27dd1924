"""The feature Dot on the reference UNet: untrained it is the training-free forecast fill exactly, its file round
trip keeps what it computes, it is refused where it cannot serve, and rollout training lowers the end error of the
runs it trains on (and resumes to the same weights)."""
import json

import pytest
import torch
from safetensors import safe_open

from morse_engine import (DotInputError, FeatureDot, FeatureDotConfig, FeatureDotFiller, MorseRouter, Pattern, build_dot,
                          make_fill, read_dot_file, read_dot_info, save_dot)
from morse_engine.backbone_shape import output_channels
from morse_engine.feature_fills import FeatureInheritFiller, captured
from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample
from training.reference.blocks import ReferenceBlocks
from training.reference.unet import NULL_CLASS, load_reference_dash, sd_alphas_cumprod
from morse_engine.parameterization import DiscreteSchedule


@pytest.fixture(scope="module")
def dash():
    unet, conditioner, _ = load_reference_dash()
    return unet.eval().requires_grad_(False), conditioner


def _run(unet, conditioner, filler, steps=8, sampler="euler", seed=0):
    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    cond, uncond = conditioner(torch.tensor([3, 7])), conditioner(torch.full((2,), NULL_CLASS))
    sigmas = normal_sigmas(ms, steps)
    router = MorseRouter(Pattern("D."), filler, measure=False)
    with torch.no_grad(), router.run(sigmas) as run:
        return sample(sampler, GuidedDenoiser(unet, ms, cond, uncond, 3.0, run=run), noise, sigmas, ms)


def _trained_like(dot: FeatureDot, seed=1) -> FeatureDot:
    """The Dot with every weight random (as training would leave them), so its change is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dot.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return dot


def test_bound_channels_are_those_of_the_features_the_dash_call_makes(dash):
    unet, conditioner = dash
    for k in (1, 2):
        cfg = FeatureDotConfig(k=k).bound_to(unet)
        fill = FeatureDotFiller(ReferenceBlocks(unet), FeatureDot(cfg))
        with torch.no_grad(), captured(fill.capture_modules()) as f:
            unet(torch.zeros(1, 1, 32, 32), torch.tensor([500.0]), context=conditioner(torch.tensor([0])))
        assert (cfg.deep_channels, cfg.shallow_channels) == (f["deep"].shape[1], f["shallow"].shape[1])
        assert output_channels(unet.input_blocks[0]) == unet.model_channels


def test_an_untrained_feature_dot_is_the_forecast_fill_exactly(dash):
    unet, conditioner = dash
    blocks = ReferenceBlocks(unet)
    dot = FeatureDot.build(unet, FeatureDotConfig())
    for sampler in ("euler", "dpmpp_2m"):
        free = _run(unet, conditioner, FeatureInheritFiller(blocks, k=1, forecast=1), sampler=sampler)
        learned = _run(unet, conditioner, FeatureDotFiller(blocks, dot), sampler=sampler)
        assert torch.equal(free, learned), sampler
    # a trained one moves the run's end (the change is read)
    moved = _run(unet, conditioner, FeatureDotFiller(blocks, _trained_like(FeatureDot.build(unet, FeatureDotConfig()))))
    assert not torch.allclose(moved, free)


def test_the_gate_leaves_no_change_where_the_fill_is_at_the_anchor_sigma(dash):
    unet, conditioner = dash
    blocks = ReferenceBlocks(unet)
    dot = _trained_like(FeatureDot.build(unet, FeatureDotConfig()))
    fill, free = FeatureDotFiller(blocks, dot), FeatureInheritFiller(blocks, k=1, forecast=1)
    from morse_engine.fillers import Anchor

    x, t, ctx = torch.randn(2, 1, 32, 32), torch.full((2,), 600.0), conditioner(torch.tensor([1, 2]))
    with torch.no_grad(), captured(fill.capture_modules()) as f:
        z = unet(x, t, context=ctx)
    anchor = Anchor(x=x, z=z, t=t, step=0, sigma=torch.full((2,), 3.0), features=dict(f))
    assert torch.equal(fill(None, x, t, anchor, ctx, {}, sigma=3.0), free(None, x, t, anchor, ctx, {}))
    assert not torch.equal(fill(None, x * 0.9, t - 50, anchor, ctx, {}, sigma=2.0),
                           free(None, x * 0.9, t - 50, anchor, ctx, {}))


def test_a_feature_dot_file_round_trips_and_says_what_it_is(dash, tmp_path):
    unet, conditioner = dash
    from morse_engine import fingerprint_module

    dot = _trained_like(FeatureDot.build(unet, FeatureDotConfig(width=8, trajectory=False)))
    path = save_dot(tmp_path / "f.safetensors", dot, base_family="reference-digits-unet", fingerprint=fingerprint_module(unet),
                    measured_n=6.0, training={"layout": "feature"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "3" and json.loads(meta["config"])["layout"] == "feature"
    info = read_dot_info(path)
    assert isinstance(info.config, FeatureDotConfig) and info.config == dot.config
    assert "feature Dot" in info.describe() and "trajectory inputs off" in info.describe()
    loaded = build_dot(*read_dot_file(path), unet)
    assert isinstance(loaded, FeatureDot) and not any(p.requires_grad for p in loaded.parameters())
    blocks = ReferenceBlocks(unet)
    assert torch.equal(_run(unet, conditioner, make_fill("dot", dot=loaded, backbone=unet, blocks=blocks)),
                       _run(unet, conditioner, FeatureDotFiller(blocks, dot)))


def test_a_feature_dot_is_refused_where_it_cannot_serve(dash):
    unet, _ = dash
    with pytest.raises(DotInputError, match="input_blocks as output_blocks"):
        FeatureDotConfig().bound_to(torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(DotInputError, match="UNetBlocks adapter"):
        make_fill("dot", dot=FeatureDot.build(unet, FeatureDotConfig()), backbone=unet)
    with pytest.raises(ValueError, match="multiple of 8"):
        FeatureDotConfig(width=12)
    with pytest.raises(ValueError, match="forecast order"):
        FeatureDotConfig(forecast=3)
