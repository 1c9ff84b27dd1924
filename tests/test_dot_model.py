import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from morse_engine import PaperDotConfig, DotInputError, PaperDot, DotMismatchError
from morse_engine.lora import LoRAWeights, find_targets


def make_dot(backbone, **kw):
    torch.manual_seed(1)
    return PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=2, **kw))


def inputs(batch=2, size=16, channels=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    xs = torch.randn(batch, channels, size, size, generator=g)
    zs = torch.randn(batch, channels, size, size, generator=g)
    ctx = torch.randn(batch, 3, 8, generator=g)
    return x, xs, zs, ctx


def randomize_outputs(dot):
    """Give the zero-initialised output and LoRA 'up' weights values, as training would."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in dot.named_parameters():
            if name.startswith("out.") or name.startswith("to_backbone.") or ".up." in name or name.startswith("lora.up"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_untrained_dot_returns_the_anchor_estimate_exactly(backbone):
    dot = make_dot(backbone)
    x, xs, zs, ctx = inputs()
    t, ts = torch.full((2,), 400.0), torch.full((2,), 500.0)
    with torch.no_grad():
        out = dot(backbone, x, t, xs, zs, ts, context=ctx)
    assert torch.equal(out, zs)


def test_widths_derive_from_the_backbone(backbone):
    cfg = PaperDotConfig.for_backbone(backbone, m=2)
    # model_channels 16: 0.3 * 16 and 0.5 * 16 rounded to multiples of 8
    assert cfg.widths == (8, 8)
    assert cfg.latent_channels == 4


def test_dot_call_leaves_backbone_keys_and_dash_calls_untouched(backbone):
    keys_before = list(backbone.state_dict().keys())
    x, xs, zs, ctx = inputs()
    t = torch.full((2,), 400.0)
    with torch.no_grad():
        dash_before = backbone(x, t, context=ctx)
    dot = make_dot(backbone)
    randomize_outputs(dot)
    with torch.no_grad():
        dot_out = dot(backbone, x, t, xs, zs, t + 100, context=ctx)
        dash_after = backbone(x, t, context=ctx)
    assert not torch.equal(dot_out, zs)  # the Dot did something
    assert torch.equal(dash_before, dash_after)
    assert list(backbone.state_dict().keys()) == keys_before
    assert all(not m._forward_hooks for m in backbone.modules())


def test_lora_is_active_only_inside_the_block_and_changes_the_output(backbone):
    dot = make_dot(backbone)
    randomize_outputs(dot)
    x = torch.randn(1, 4, 8, 8)
    t = torch.full((1,), 10.0)
    with torch.no_grad():
        plain = backbone(x, t)
        with dot.lora.applied_to(backbone):
            adapted = backbone(x, t)
        again = backbone(x, t)
    assert not torch.allclose(plain, adapted)
    assert torch.equal(plain, again)


@pytest.mark.parametrize("targets", [("to_q", "to_k", "to_v", "to_out.0"), ("proj_in", "to_q")])
def test_hook_lora_matches_peft_forward(backbone, targets):
    """Same A/B weights: our hooks on the untouched backbone vs peft's wrapped modules.

    Tolerance: atol 1e-5 / rtol 1e-5 in float32 (the two differ only in summation order).
    """
    rank, alpha = 4, 8.0
    peft_model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0), copy.deepcopy(backbone)
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = LoRAWeights(find_targets(backbone, targets), rank, alpha)
    lora.load_from_peft(peft_model)
    assert {t.kind for t in lora.targets.values()} == ({"linear", "conv2d"} if "proj_in" in targets else {"linear"})
    x, _, _, ctx = inputs(batch=2, size=8)
    t = torch.full((2,), 250.0)
    with torch.no_grad():
        expected = peft_model(x, t, context=ctx)
        with lora.applied_to(backbone):
            got = backbone(x, t, context=ctx)
        plain = backbone(x, t, context=ctx)
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # and back: weights copied into peft give the same peft forward
    other = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0), copy.deepcopy(backbone)
    )
    lora.copy_to_peft(other)
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, context=ctx), expected, atol=1e-6, rtol=1e-6)


def test_size_not_divisible_by_two_to_the_m_is_padded_not_crashed(backbone):
    dot = make_dot(backbone)
    randomize_outputs(dot)
    x, xs, zs, ctx = inputs(size=15)
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        out = dot(backbone, x, t, xs, zs, t + 50, context=ctx)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_wrong_channels_are_refused_with_a_clear_error(backbone):
    dot = make_dot(backbone)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(DotInputError, match=r"expects \[batch, 4"):
        dot(backbone, x, torch.ones(1), x, x, torch.ones(1))


def test_mismatched_anchor_shape_is_refused(backbone):
    dot = make_dot(backbone)
    x, xs, zs, _ = inputs(size=16)
    with pytest.raises(DotInputError, match="batch or resolution changed"):
        dot(backbone, x, torch.ones(2), xs[:1], zs[:1], torch.ones(1))


def test_unknown_lora_targets_are_refused(backbone):
    with pytest.raises(DotMismatchError, match="match no Linear"):
        make_dot(backbone, lora_targets=("no_such_module",))


def test_ablation_without_trajectory_inputs_runs_and_ignores_the_anchor_input(backbone):
    dot = make_dot(backbone, trajectory=False)
    randomize_outputs(dot)
    x, xs, zs, _ = inputs()
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        a = dot(backbone, x, t, xs, zs, t + 10)
        b = dot(backbone, x, t, xs * 2, zs, t + 99)
    # eta does not see x_s or t_s; the output is still z_s + eta
    torch.testing.assert_close(a, b)


def test_only_the_dot_trains_and_gradients_reach_light_blocks_and_lora(backbone):
    dot = make_dot(backbone)
    randomize_outputs(dot)
    x, xs, zs, ctx = inputs()
    t = torch.full((2,), 300.0)
    out = dot(backbone, x, t, xs, zs, t + 10, context=ctx)
    out.pow(2).mean().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert dot.out.weight.grad is not None and dot.out.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in dot.named_parameters() if n.startswith("lora.down"))


def _scaled(raw, sigma):
    return raw / (sigma**2 + 1) ** 0.5


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_step_deviation_is_the_other_branch_pull_under_cfg(prediction):
    """An Euler step taken with the guided estimate departs from the cond branch's own estimate by (w - 1)(c - u)."""
    from morse_engine import step_deviation

    g = torch.Generator().manual_seed(0)
    sig_s, sig_i, w = torch.tensor([6.0, 1.5]), torch.tensor([4.0, 0.9]), 3.0
    view = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    x_s = torch.randn(2, 4, 8, 8, generator=g) * view(sig_s)
    eps_c, eps_u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_i = x_s + (eps_u + w * (eps_c - eps_u)) * view(sig_i - sig_s)
    xin_s = _scaled(x_s, view(sig_s))
    if prediction == "eps":
        z_c = eps_c
    else:  # ComfyUI V_PREDICTION: v = (eps - sigma * x_scaled) * ... solved from its calculate_denoised
        z_c = eps_c * (view(sig_s) ** 2 + 1) ** 0.5 - view(sig_s) * xin_s
    dev = step_deviation(_scaled(x_i, view(sig_i)), sig_i, xin_s, sig_s, z_c, prediction)
    torch.testing.assert_close(dev, (w - 1) * (eps_c - eps_u), atol=1e-4, rtol=1e-4)


def test_deviation_dot_needs_the_sigmas_and_is_untrained_equal_to_the_anchor(backbone):
    dot = make_dot(backbone, step_input="deviation")
    x, xs, zs, ctx = inputs()
    t, ts = torch.full((2,), 400.0), torch.full((2,), 500.0)
    with torch.no_grad():
        with pytest.raises(DotInputError, match="sigma"):
            dot(backbone, x, t, xs, zs, ts, context=ctx)
        assert torch.equal(dot(backbone, x, t, xs, zs, ts, context=ctx, sigma=2.0, anchor_sigma=3.0), zs)


@pytest.mark.parametrize("m", [1, 2])
def test_pixel_shuffle_stem_runs_no_block_at_full_resolution(backbone, m):
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=m, stem="pixel_shuffle"))
    x, xs, zs, ctx = inputs(size=16)
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        assert torch.equal(dot(backbone, x, t, xs, zs, t + 50, context=ctx), zs)  # untrained: the anchor, exactly
    randomize_outputs(dot)
    seen = []
    hooks = [blk.register_forward_hook(lambda mod, args, out: seen.append(out.shape[-1])) for blk in (*dot.down, *dot.up)]
    with torch.no_grad():
        out = dot(backbone, x, t, xs, zs, t + 50, context=ctx)
    for h in hooks:
        h.remove()
    assert out.shape == x.shape and not torch.equal(out, zs)
    assert max(seen) == 8  # every light block at 1/2 resolution or below
    full = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=m))
    assert PaperDotConfig.from_dict(full.config.to_dict()).stem == "full_res"  # the paper's layout stays the default for old files


def test_pixel_shuffle_stem_pads_odd_sizes(backbone):
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=2, stem="pixel_shuffle"))
    randomize_outputs(dot)
    x, xs, zs, ctx = inputs(size=15)
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        out = dot(backbone, x, t, xs, zs, t + 50, context=ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sigma_step_eta_scale_vanishes_with_the_jump(backbone):
    dot = make_dot(backbone, eta_scale="sigma_step")
    randomize_outputs(dot)
    x, xs, zs, ctx = inputs()
    t, ts = torch.full((2,), 400.0), torch.full((2,), 500.0)
    with torch.no_grad():
        with pytest.raises(DotInputError, match="sigma"):
            dot(backbone, x, t, xs, zs, ts, context=ctx)
        same = dot(backbone, x, t, xs, zs, ts, context=ctx, sigma=3.0, anchor_sigma=3.0)
        small = dot(backbone, x, t, xs, zs, ts, context=ctx, sigma=2.9, anchor_sigma=3.0) - zs
        large = dot(backbone, x, t, xs, zs, ts, context=ctx, sigma=1.5, anchor_sigma=3.0) - zs
        unscaled = make_dot(backbone)
        randomize_outputs(unscaled)
        raw = unscaled(backbone, x, t, xs, zs, ts, context=ctx) - zs
    assert torch.equal(same, zs)  # no jump, no correction
    assert torch.allclose(small, raw * (1 - 2.9 / 3.0), atol=1e-6)
    assert torch.allclose(large, raw * 0.5, atol=1e-6)


def test_extrapolating_base_untrained_is_the_extrapolating_filler_and_reads_the_line(backbone):
    from morse_engine import ExtrapolateFiller
    from morse_engine.fillers import Anchor, DashCall

    dot = make_dot(backbone, base="extrapolate")
    x, xs, zs, ctx = inputs()
    zp = torch.randn_like(zs)
    t, ts, tp = torch.full((2,), 400.0), torch.full((2,), 500.0), torch.tensor([700.0, 500.0])  # entry 1: no earlier step
    with torch.no_grad():
        out = dot(backbone, x, t, xs, zs, ts, context=ctx, prev_z=zp, prev_t=tp)
        anchor = Anchor(x=xs, z=zs, t=ts, step=2, earlier=(DashCall(zp, tp),))
        torch.testing.assert_close(out, ExtrapolateFiller()(None, x, t, anchor, ctx, {}))
        torch.testing.assert_close(out[0], zs[0] + 0.5 * (zs[0] - zp[0]))
        assert torch.equal(out[1], zs[1])
        assert torch.equal(dot(backbone, x, t, xs, zs, ts, context=ctx), zs)  # no earlier estimate at all
        randomize_outputs(dot)
        moved = dot(backbone, x, t, xs, zs, ts, context=ctx, prev_z=zp, prev_t=tp)
        other_line = dot(backbone, x, t, xs, zs, ts, context=ctx, prev_z=zp * 2, prev_t=tp)
    assert not torch.equal(moved - out, other_line - (zs + 0.5 * (zs - 2 * zp)))  # eta reads the change too
    with pytest.raises(DotInputError, match="prev_z"):
        dot(backbone, x, t, xs, zs, ts, context=ctx, prev_z=zp[:1], prev_t=tp)
    with pytest.raises(ValueError, match="trajectory"):
        PaperDotConfig.for_backbone(backbone, m=2, base="extrapolate", trajectory=False)
    with pytest.raises(ValueError, match="base"):
        PaperDotConfig.for_backbone(backbone, m=2, base="reuse")


def test_configs_written_before_the_base_option_load_as_the_anchor_base(backbone):
    d = PaperDotConfig.for_backbone(backbone, m=2).to_dict()
    del d["base"]
    assert PaperDotConfig.from_dict(d).base == "anchor"
