"""The committed reference Dash model, its data split and the feature classifier (host-free, CPU, fast)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from host_required import host_missing

from training.reference.classifier import (accuracy, feature_stats, frechet_distance, frechet_distance_from_stats,
                                 load_feature_classifier)
from training.reference.digits import SPLITS, load_digits_split, split_indices
from morse_engine.parameterization import DiscreteSchedule
from training.reference.unet import NULL_CLASS, ReferenceUNet, UNetConfig, load_reference_dash, sd_alphas_cumprod, timestep_embedding


@pytest.fixture(scope="module")
def dash():
    return load_reference_dash()


@pytest.fixture(scope="module")
def classifier():
    return load_feature_classifier()


# --------------------------------------------------------------------------- reference Dash
def test_reference_dash_loads_frozen_with_config(dash):
    unet, cond, meta = dash
    assert not unet.training and not cond.training
    assert not any(p.requires_grad for p in list(unet.parameters()) + list(cond.parameters()))
    assert UNetConfig.from_dict(meta["config"]["unet"]) == unet.config
    assert (unet.in_channels, unet.out_channels) == (1, 1)
    assert unet.context_dim == cond.context_dim == meta["config"]["conditioner"]["context_dim"]
    assert meta["prediction"] == "eps" and meta["null_class"] == NULL_CLASS
    assert meta["quality_check"]["class_accuracy"] >= 0.9


@pytest.mark.parametrize("size", [32, 8, 12])
def test_reference_dash_forward_shapes(dash, size):
    unet, cond, _ = dash
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        out = unet(x, torch.tensor([999.0, 3.5]), cond(torch.tensor([3, NULL_CLASS])))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_reference_dash_is_per_sample(dash):
    """Batch entries do not interact (no batch statistics), so CFG batching is exact."""
    unet, cond, _ = dash
    x, t, labels = torch.randn(3, 1, 32, 32), torch.tensor([10.0, 500.0, 900.0]), torch.tensor([1, 7, NULL_CLASS])
    with torch.no_grad():
        full = unet(x, t, cond(labels))
        single = unet(x[1:2], t[1:2], cond(labels[1:2]))
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-4)


def test_reference_dash_has_comfyui_sd_module_names(dash):
    unet, _, _ = dash
    keys = set(unet.state_dict())
    expected = [
        "time_embed.0.weight", "time_embed.2.weight", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight", "input_blocks.2.0.op.weight",
        "input_blocks.3.1.norm.weight", "input_blocks.3.1.proj_in.weight", "input_blocks.3.1.proj_out.weight",
        "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight",
        "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.5.1.transformer_blocks.0.attn2.to_v.weight",
        "input_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.5.1.transformer_blocks.0.ff.net.2.weight",
        "input_blocks.5.1.transformer_blocks.0.norm3.weight",
        "middle_block.0.in_layers.0.weight", "middle_block.1.transformer_blocks.0.attn1.to_k.weight",
        "middle_block.2.out_layers.3.weight",
        "output_blocks.0.0.skip_connection.weight", "output_blocks.1.2.conv.weight",
        "output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.bias", "output_blocks.3.2.conv.weight",
        "out.0.weight", "out.2.weight",
    ]
    missing = [k for k in expected if k not in keys]
    assert not missing, f"missing keys: {missing}"
    # attention projections are bias-free, as in SD
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in keys)
    # self-attention at the 16x16 and 8x8 levels of a 32x32 input, none at 32x32
    names = dict(unet.named_modules())
    assert "input_blocks.1.1" not in names
    assert type(names["input_blocks.3.1"]).__name__ == "SpatialTransformer"
    assert type(names["input_blocks.5.1"]).__name__ == "SpatialTransformer"


def test_reference_dash_rejects_y_and_missing_context(dash):
    unet, cond, _ = dash
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([10.0])
    with pytest.raises(ValueError, match="context"):
        unet(x, t)
    with pytest.raises(ValueError, match="`y`"):
        unet(x, t, cond(torch.tensor([1])), y=torch.tensor([1]))
    with pytest.raises(ValueError, match="labels"):
        cond(torch.tensor([11]))


def test_control_residuals_are_added():
    torch.manual_seed(0)
    unet = ReferenceUNet(UNetConfig(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,),
                                    num_head_channels=16, norm_groups=8)).eval()
    for p in unet.parameters():  # undo the zero init so that residuals reach the output
        torch.nn.init.normal_(p, std=0.05)
    x, t, ctx = torch.randn(1, 1, 8, 8), torch.tensor([100.0]), torch.randn(1, 2, 64)
    with torch.no_grad():
        base = unet(x, t, ctx)
        same = unet(x, t, ctx, control={"middle": [None]})
        moved = unet(x, t, ctx, control={"middle": [torch.ones(1, 32, 4, 4)]})
    torch.testing.assert_close(base, same)
    assert not torch.allclose(base, moved)


def test_schedule_matches_comfyui_sd1_sigmas():
    sigmas = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod()).sigmas
    assert sigmas.shape == (1000,) and sigmas.dtype == torch.float32
    assert torch.all(sigmas[1:] > sigmas[:-1])
    # ComfyUI's ModelSamplingDiscrete for SD1.x: sigma_min 0.0292, sigma_max 14.6146
    assert sigmas[0].item() == pytest.approx(0.029168, abs=1e-5)
    assert sigmas[-1].item() == pytest.approx(14.614642, abs=1e-4)


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(10.0)))


# --------------------------------------------------------------------------- data
def test_digits_split_is_deterministic_disjoint_and_stratified():
    train_idx, test_idx = split_indices("train"), split_indices("test")
    assert len(train_idx) == 1437 and len(test_idx) == 360
    assert not set(train_idx) & set(test_idx)
    assert sorted(set(train_idx) | set(test_idx)) == list(range(1797))
    x_tr, y_tr = load_digits_split("train")
    x_te, y_te = load_digits_split("test")
    x_te2, y_te2 = load_digits_split("test")
    assert torch.equal(x_te, x_te2) and torch.equal(y_te, y_te2)
    assert x_tr.shape == (1437, 1, 32, 32) and x_te.shape == (360, 1, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    assert x_tr.min() >= -1 and x_tr.max() <= 1
    counts_tr, counts_te = torch.bincount(y_tr, minlength=10), torch.bincount(y_te, minlength=10)
    frac = counts_te.double() / (counts_tr + counts_te).double()
    assert torch.all((frac - 0.2).abs() < 0.01), frac


@pytest.mark.parametrize("bad", ["val", "Train", "", None])
def test_digits_bad_split_name_raises(bad):
    with pytest.raises(ValueError, match="split"):
        load_digits_split(bad)
    assert set(SPLITS) == {"train", "test"}


# --------------------------------------------------------------------------- classifier and FD
def test_classifier_accuracy_is_recorded_and_reproduced(classifier):
    model, meta = classifier
    assert meta["test_accuracy"] >= 0.97
    x, y = load_digits_split("test")
    assert accuracy(model, x, y) == pytest.approx(meta["test_accuracy"], abs=1e-4)
    with torch.no_grad():
        assert model.features(x[:4]).shape == (4, meta["config"]["feature_dim"])
        assert model.logits(x[:4]).shape == (4, 10)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(16, 16)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    shift = rng.normal(size=8)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_from_stats_matches_closed_form_for_diagonal_covariances():
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, -2.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
    # rank-deficient covariances (round-off negatives) still give a finite, non-negative value
    mu, cov = feature_stats(np.repeat(np.random.default_rng(1).normal(size=(50, 1)), 4, axis=1))
    assert frechet_distance_from_stats(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


# --------------------------------------------------------------------------- against ComfyUI itself
_COMFY_EQUIVALENCE = r"""
import sys
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, COMFYUI_PATH)
import torch
import comfy.options
comfy.options.enable_args_parsing()
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from training.reference.unet import ReferenceUNet, UNetConfig

torch.manual_seed(0)
ours = ReferenceUNet(UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                attention_resolutions=(2, 4), num_head_channels=16, context_dim=64)).eval()
with torch.no_grad():
    for p in ours.parameters():
        p.normal_(0, 0.2)
theirs = UNetModel(image_size=32, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                   channel_mult=(1, 2, 2), num_head_channels=16, use_spatial_transformer=True,
                   transformer_depth=[0, 1, 1], transformer_depth_middle=1,
                   transformer_depth_output=[0, 0, 1, 1, 1, 1], context_dim=64, legacy=False,
                   use_linear_in_transformer=False).eval()
theirs.load_state_dict(ours.state_dict(), strict=True)
for size in (32, 8):
    x, t, ctx = torch.randn(2, 1, size, size), torch.tensor([999.0, 20.0]), torch.randn(2, 2, 64)
    with torch.no_grad():
        a, b = ours(x, t, ctx), theirs(x, t, ctx, transformer_options={})
    err = (a - b).abs().max().item()
    assert err < 1e-4 * max(1.0, a.abs().max().item()), (size, err)
print("EQUIVALENT")
"""


def test_reference_unet_matches_comfyui_unetmodel():
    """Same keys, shapes and outputs as ComfyUI's own UNetModel (needs COMFYUI_PATH; subprocess)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy or not (Path(comfy) / "comfy" / "ldm").is_dir():
        host_missing("COMFYUI_PATH does not point at a ComfyUI checkout")
    repo = Path(__file__).resolve().parent.parent
    code = f"COMFYUI_PATH = {str(Path(comfy).resolve())!r}\n" + _COMFY_EQUIVALENCE
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    if res.returncode and "ModuleNotFoundError" in res.stderr and "comfy" not in res.stderr.split("ModuleNotFoundError")[-1][:80]:
        host_missing(f"ComfyUI's dependencies are missing here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0 and "EQUIVALENT" in res.stdout, res.stderr[-2000:]
