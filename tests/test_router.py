import pytest
import torch

from tiny_models import euler_sample, karras_sigmas
from morse_engine import (
    PaperDotConfig,
    PaperDotFiller,
    PaperDot,
    EveryK,
    ExtrapolateFiller,
    MorseRouter,
    Pattern,
    ReuseFiller,
)
from morse_engine.fillers import Anchor, DashCall


def routed(run, backbone, keys=None):
    def call(x, t, sigma, context):
        return run(backbone, x, t, sigma, keys=keys, context=context)

    return call


def direct(backbone):
    return lambda x, t, sigma, context: backbone(x, t, context=context)


def trained_like_dot(backbone):
    torch.manual_seed(5)
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=1)).eval()
    with torch.no_grad():
        dot.out.weight.normal_(0, 0.05)
        for p in dot.lora.up.parameters():
            p.normal_(0, 0.05)
    return dot


@pytest.mark.parametrize("heun", [False, True])
def test_dash_only_schedule_is_bit_identical_to_the_backbone(backbone, heun):
    sigmas = karras_sigmas(6)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 3, 8)
    router = MorseRouter(EveryK(1), PaperDotFiller(trained_like_dot(backbone), backbone))
    with torch.no_grad():
        expected = euler_sample(direct(backbone), noise, sigmas, ctx, heun=heun)
        with router.run(sigmas) as run:
            got = euler_sample(routed(run, backbone), noise, sigmas, ctx, heun=heun)
    assert torch.equal(got, expected)
    assert router.last_summary.dot_calls == 0
    assert len(router.last_summary.dash_steps) == 6


def test_mixed_schedule_runs_dash_exactly_on_its_steps(backbone):
    sigmas = karras_sigmas(8)
    calls = []

    def counting_backbone(x, t, context=None, **kw):
        calls.append(x.shape[-1])
        return backbone(x, t, context=context, **kw)

    dot = trained_like_dot(backbone)
    router = MorseRouter(Pattern("D.."), PaperDotFiller(dot, backbone))
    with torch.no_grad(), router.run(sigmas) as run:
        euler_sample(lambda x, t, s, c: run(counting_backbone, x, t, s, context=c), torch.randn(1, 4, 8, 8), sigmas)
    s = router.last_summary
    assert sorted(s.dash_steps) == [0, 3, 6]
    assert sorted(s.dot_steps) == [1, 2, 4, 5, 7]
    assert (s.dash_calls, s.dot_calls, s.fallback_calls) == (3, 5, 0)
    # Dash calls see the full 8x8 input; Dot calls reach the backbone at 1/2 per side (m = 1)
    assert calls == [8, 4, 4, 8, 4, 4, 8, 4]
    assert "3 Dash steps, 5 dot steps of 8" in s.log_line()


def test_second_order_calls_belong_to_the_step_at_or_above(backbone):
    router = MorseRouter(EveryK(2), ReuseFiller())
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    with router.run(sigmas) as run:
        assert run.step_of(10.0) == 0
        assert run.step_of(7.0) == 0  # between steps 0 and 1: step 0
        assert run.step_of(5.0) == 1
        assert run.step_of(4.9999999) == 1
        assert run.step_of(1.5) == 2
        assert run.step_of(0.5) == 3
        assert run.step_of(20.0) == 0


def test_cond_and_uncond_pair_with_their_own_anchor_in_one_or_separate_calls(backbone):
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    router = MorseRouter(Pattern("D."), ReuseFiller())
    cond, uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.ones(2)
    with torch.no_grad(), router.run(sigmas) as run:
        # Dash step: cond and uncond in one batched call
        both = run(backbone, torch.cat([cond, uncond]), t, 10.0, keys=["c", "u"])
        z_cond, z_uncond = both.chunk(2)
        # Dot step: the same entries arrive in separate calls, uncond first
        got_u = run(backbone, uncond, t[:1], 5.0, keys=["u"])
        got_c = run(backbone, cond, t[:1], 5.0, keys=["c"])
    assert torch.equal(got_u, z_uncond)
    assert torch.equal(got_c, z_cond)

    router2 = MorseRouter(Pattern("D."), ReuseFiller())
    with torch.no_grad(), router2.run(sigmas) as run:
        # Dash step in separate calls, Dot step batched in swapped order
        zc = run(backbone, cond, t[:1], 10.0, keys=["c"])
        zu = run(backbone, uncond, t[:1], 10.0, keys=["u"])
        swapped = run(backbone, torch.cat([uncond, cond]), t, 5.0, keys=["u", "c"])
    assert torch.equal(swapped, torch.cat([zu, zc]))
    assert router2.last_summary.dot_calls == 1


def test_an_entry_without_an_anchor_falls_back_to_dash(backbone):
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    router = MorseRouter(Pattern("D."), ReuseFiller())
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), router.run(sigmas) as run:
        run(backbone, x, torch.ones(1), 10.0, keys=["c"])
        out = run(backbone, x, torch.ones(1), 5.0, keys=["new-cond"])
    assert torch.equal(out, backbone(x, torch.ones(1)))
    assert router.last_summary.fallback_calls == 1


def test_interrupted_run_leaves_nothing_for_the_next_run(backbone):
    sigmas = karras_sigmas(6)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    dot = trained_like_dot(backbone)
    router = MorseRouter(EveryK(2), PaperDotFiller(dot, backbone))

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted):
        with torch.no_grad(), router.run(sigmas) as run:
            for i, s in enumerate(sigmas[:-1]):
                run(backbone, noise * 3, torch.ones(1) * i, float(s))
                if i == 2:
                    raise Interrupted()
    assert run.anchors == {}
    # the next run gives what a fresh router gives
    fresh = MorseRouter(EveryK(2), PaperDotFiller(dot, backbone))
    with torch.no_grad():
        with router.run(sigmas) as r1:
            a = euler_sample(routed(r1, backbone), noise, sigmas)
        with fresh.run(sigmas) as r2:
            b = euler_sample(routed(r2, backbone), noise, sigmas)
    assert torch.equal(a, b)
    assert router.last_summary.dash_calls == 3


def test_resolution_change_between_runs_works(backbone):
    router = MorseRouter(EveryK(2), PaperDotFiller(trained_like_dot(backbone), backbone))
    sigmas = karras_sigmas(4)
    with torch.no_grad():
        for size in (8, 12, 8):
            with router.run(sigmas) as run:
                out = euler_sample(routed(run, backbone), torch.randn(2, 4, size, size), sigmas)
            assert out.shape == (2, 4, size, size)
            assert router.last_summary.fallback_calls == 0


def test_resolution_change_mid_run_re_anchors_with_dash(backbone):
    router = MorseRouter(Pattern("D."), PaperDotFiller(trained_like_dot(backbone), backbone))
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    with torch.no_grad(), router.run(sigmas) as run:
        run(backbone, torch.randn(1, 4, 8, 8), torch.ones(1), 10.0)
        out = run(backbone, torch.randn(1, 4, 12, 12), torch.ones(1), 5.0)
    assert out.shape == (1, 4, 12, 12)
    assert router.last_summary.fallback_calls == 1


def test_anchors_are_copies_the_sampler_cannot_change(backbone):
    router = MorseRouter(Pattern("D."), ReuseFiller())
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    with torch.no_grad(), router.run(sigmas) as run:
        z = run(backbone, torch.randn(1, 4, 8, 8), torch.ones(1), 10.0)
        kept = z.clone()
        z.zero_()  # a sampler reusing the output's memory
        out = run(backbone, torch.randn(1, 4, 8, 8), torch.ones(1), 5.0)
    assert torch.equal(out, kept)


def test_extrapolate_filler_is_linear_in_t():
    z_prev, z_s = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    anchor = Anchor(x=z_s, z=z_s, t=torch.tensor([600.0]), step=2, earlier=(DashCall(z_prev, torch.tensor([800.0])),))
    out = ExtrapolateFiller()(None, z_s, torch.tensor([500.0]), anchor, None, {})
    # slope 1 per 200 t; 100 t further: 1.5
    torch.testing.assert_close(out, torch.full_like(z_s, 1.5))
    first = Anchor(x=z_s, z=z_s, t=torch.tensor([600.0]), step=0)
    assert torch.equal(ExtrapolateFiller()(None, z_s, torch.tensor([500.0]), first, None, {}), z_s)


def test_extrapolate_tracks_previous_dash_estimate_per_entry(backbone):
    router = MorseRouter(Pattern("D.D."), ExtrapolateFiller())
    sigmas = torch.tensor([10.0, 8.0, 6.0, 4.0, 0.0])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), router.run(sigmas) as run:
        z0 = run(backbone, x, torch.tensor([900.0]), 10.0)
        run(backbone, x, torch.tensor([800.0]), 8.0)
        z2 = run(backbone, x * 0.5, torch.tensor([700.0]), 6.0)
        z3 = run(backbone, x, torch.tensor([600.0]), 4.0)
    torch.testing.assert_close(z3, z2 + (z2 - z0) * 0.5)


def test_measured_n_and_lsd_in_the_summary(backbone):
    router = MorseRouter(EveryK(2), PaperDotFiller(trained_like_dot(backbone), backbone))
    sigmas = karras_sigmas(6)
    with torch.no_grad(), router.run(sigmas) as run:
        euler_sample(routed(run, backbone), torch.randn(1, 4, 8, 8), sigmas)
    s = router.last_summary
    assert s.measured_n is not None and s.measured_n > 0
    assert s.lsd(2.0) == pytest.approx(3 + 3 / 2)


def test_filler_gets_the_call_sigma_and_each_entry_its_anchor_sigma(backbone):
    """A Dot that reads the sampler's step needs both sigmas; entries anchored at different steps keep their own."""
    seen = []

    class Recorder(ReuseFiller):
        def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
            seen.append((sigma, anchor.sigma.clone()))
            return super().__call__(backbone_call, x, t, anchor, context, kwargs, sigma=sigma)

    router = MorseRouter(Pattern("D.."), Recorder())
    sigmas = torch.tensor([10.0, 6.0, 3.0, 0.0])
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), router.run(sigmas) as run:
        run(backbone, x, torch.ones(2), 10.0, keys=["c", "u"])
        run(backbone, x, torch.ones(2), 6.0, keys=["c", "u"])
        run(backbone, x, torch.ones(2), 3.0, keys=["c", "u"])
    assert [s for s, _ in seen] == [6.0, 3.0]
    for _, anchor_sigma in seen:
        assert torch.equal(anchor_sigma, torch.full((2,), 10.0))


def test_dot_filler_hands_the_dot_the_estimate_before_the_anchor(backbone):
    """An untrained Dot with the extrapolating base routes exactly like the training-free extrapolation."""
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=1, base="extrapolate")).eval()
    sigmas = karras_sigmas(7)
    x = torch.randn(1, 4, 8, 8)
    outs = []
    for filler in (PaperDotFiller(dot, backbone), ExtrapolateFiller()):
        router = MorseRouter(Pattern("D."), filler)
        with torch.no_grad(), router.run(sigmas) as run:
            outs.append(euler_sample(routed(run, backbone), x.clone(), sigmas))
    torch.testing.assert_close(outs[0], outs[1])
    reuse = MorseRouter(Pattern("D."), ReuseFiller())
    with torch.no_grad(), reuse.run(sigmas) as run:
        assert not torch.allclose(euler_sample(routed(run, backbone), x.clone(), sigmas), outs[0])


def test_a_free_fill_logs_no_n_and_its_lsd_is_the_dash_steps(backbone):
    router = MorseRouter(EveryK(2), ExtrapolateFiller())
    sigmas = karras_sigmas(6)
    with torch.no_grad(), router.run(sigmas) as run:
        euler_sample(routed(run, backbone), torch.randn(1, 4, 8, 8), sigmas)
    s = router.last_summary
    line = s.log_line(n_speed=7.0)
    assert s.measured_n is None and "extrapolate fill free" in line and " N " not in line
    assert "3.00 LSD spent vs 6 for the plain sampler" in line


def test_an_interrupted_run_logs_the_steps_it_ran(backbone):
    router = MorseRouter(EveryK(2), ReuseFiller())
    sigmas = karras_sigmas(8)
    with pytest.raises(KeyboardInterrupt):
        with torch.no_grad(), router.run(sigmas) as run:
            for i, s in enumerate(sigmas[:3]):
                run(backbone, torch.randn(1, 4, 8, 8), torch.ones(1) * i, float(s))
            raise KeyboardInterrupt
    line = router.last_summary.log_line()
    assert "of the 3 run before it stopped (8 planned)" in line and "vs 3 for the plain sampler" in line
