"""Feature inheritance and encoder propagation on the reference UNet: exact at the anchor, captured by hooks
that leave Dash unchanged, per batch entry, and refused or bypassed where they cannot serve."""
import pytest
import torch

from morse_engine import EveryK, MorseError, MorseRouter, Pattern
from morse_engine.feature_fills import EncoderPropagationFiller, FeatureInheritFiller, captured
from training.reference.blocks import ReferenceBlocks
from training.reference.unet import NULL_CLASS, load_reference_dash


@pytest.fixture(scope="module")
def dash():
    torch.manual_seed(0)
    unet, conditioner, _ = load_reference_dash()
    return unet, conditioner


def _inputs(conditioner, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 32, 32, generator=g)
    t = torch.full((b,), 600.0)
    return x, t, conditioner(torch.arange(b) % 10)


def _fills(unet):
    blocks = ReferenceBlocks(unet)
    n = len(unet.input_blocks)
    return ([FeatureInheritFiller(blocks, k) for k in range(1, n + 1)] + [EncoderPropagationFiller(blocks)]
            + [FeatureInheritFiller(blocks, k, forecast=order) for k in (1, 2) for order in (1, 2)])


def _anchor_of(fill, unet, x, t, context):
    from morse_engine.fillers import Anchor

    with torch.no_grad(), captured(fill.capture_modules()) as feats:
        z = unet(x, t, context=context)
    return z, Anchor(x=x, z=z, t=t, step=0, features=dict(feats))


def test_at_the_anchor_every_fill_reproduces_dash_exactly(dash):
    unet, conditioner = dash
    x, t, context = _inputs(conditioner)
    for fill in _fills(unet):
        z, anchor = _anchor_of(fill, unet, x, t, context)
        assert torch.equal(fill(unet, x, t, anchor, context, {}), z), fill.name


def test_capturing_hooks_leave_the_dash_call_bit_identical_and_are_removed(dash):
    unet, conditioner = dash
    x, t, context = _inputs(conditioner)
    fill = EncoderPropagationFiller(ReferenceBlocks(unet))
    with torch.no_grad():
        plain = unet(x, t, context=context)
        with captured(fill.capture_modules()) as feats:
            hooked = unet(x, t, context=context)
    assert torch.equal(plain, hooked) and set(feats) == set(fill.capture_modules())
    assert all(not m._forward_hooks for m in unet.modules())


def test_away_from_the_anchor_a_fill_differs_from_reuse_and_from_dash(dash):
    unet, conditioner = dash
    x, t, context = _inputs(conditioner)
    fill = FeatureInheritFiller(ReferenceBlocks(unet), k=2)
    z, anchor = _anchor_of(fill, unet, x, t, context)
    x2, t2 = x * 0.9, t - 40
    with torch.no_grad():
        filled, exact = fill(unet, x2, t2, anchor, context, {}), unet(x2, t2, context=context)
    assert not torch.equal(filled, z) and not torch.equal(filled, exact)
    assert (filled - exact).pow(2).mean() < (z - exact).pow(2).mean()  # closer to Dash than reusing the anchor


def _euler(run, unet, cond, uncond, sigmas, keys_apart: bool):
    """Euler with CFG through a Morse run; cond and uncond in one call or in two."""
    from morse_engine.parameterization import cfg_combine, scale_input
    from morse_engine.solver_steps import euler_step

    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * float(sigmas[0])
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        x_in, t = scale_input(x, s), torch.full((2,), 999.0 * float(i) / len(sigmas))
        if keys_apart:
            c = run(unet, x_in, t, float(s), keys=["c"], context=cond)
            u = run(unet, x_in, t, float(s), keys=["u"], context=uncond)
            eps = cfg_combine(torch.cat([c, u]), 2.5)
        else:
            out = run(unet, torch.cat([x_in, x_in]), torch.cat([t, t]), float(s), keys=["c", "u"],
                      context=torch.cat([cond, uncond]))
            eps = cfg_combine(out, 2.5)
        x = euler_step(x, eps, s, sigmas[i + 1])
    return x


def test_forecasting_moves_the_deep_feature_along_the_line_through_the_last_two_dash_calls(dash):
    from morse_engine.fillers import Anchor

    unet, conditioner = dash
    x, t, context = _inputs(conditioner)
    blocks = ReferenceBlocks(unet)
    inherit, forecast = FeatureInheritFiller(blocks, 2), FeatureInheritFiller(blocks, 2, forecast=1)
    _, earlier = _anchor_of(inherit, unet, x * 1.2, t + 80, context)
    z, latest = _anchor_of(inherit, unet, x, t, context)
    x2, t2 = x * 0.9, t - 40
    with torch.no_grad():
        # no earlier Dash call (a run's first fill): the same as inheriting
        assert torch.equal(forecast(unet, x2, t2, latest, context, {}), inherit(unet, x2, t2, latest, context, {}))
        both = Anchor(x=x, z=z, t=t, step=2, features=latest.features, earlier=(earlier.as_call(),))
        # at the anchor's time the line passes through the anchor's feature: Dash exactly
        assert torch.equal(forecast(unet, x, t, both, context, {}), z)
        # half a span further on: the deep feature moved by half the last change, entering the same blocks
        moved = dict(latest.features, deep=latest.features["deep"] * 1.5 - earlier.features["deep"] * 0.5)
        expected = inherit(unet, x2, t2, Anchor(x=x, z=z, t=t, step=2, features=moved), context, {})
        torch.testing.assert_close(forecast(unet, x2, t2, both, context, {}), expected, rtol=1e-5, atol=1e-5)


def test_the_parabola_through_three_calls_is_exact_for_a_quadratic_in_t_and_zero_at_the_anchor():
    from morse_engine.trajectory import parabola_change

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    f = lambda t: a + b * (t / 100) + c * (t / 100) ** 2  # noqa: E731
    t_q, t_p, t_s = torch.tensor([900.0, 700.0]), torch.tensor([800.0, 600.0]), torch.tensor([700.0, 450.0])
    for t in (torch.tensor([650.0, 400.0]), torch.tensor([500.0, 100.0])):
        change = parabola_change(f(t_s.view(-1, 1, 1, 1)), t_s, f(t_p.view(-1, 1, 1, 1)), t_p, f(t_q.view(-1, 1, 1, 1)), t_q, t)
        torch.testing.assert_close(change, f(t.view(-1, 1, 1, 1)) - f(t_s.view(-1, 1, 1, 1)), rtol=1e-4, atol=1e-4)
    at_anchor = parabola_change(a, t_s, b, t_p, c, t_q, t_s)
    assert torch.equal(at_anchor, torch.zeros_like(a))
    assert parabola_change(a, t_s, b, t_p, c, t_p, t_s - 10) is None  # two calls at one time: no parabola


def test_second_order_forecasting_moves_the_deep_feature_along_the_parabola_through_three_dash_calls(dash):
    from morse_engine.fillers import Anchor
    from morse_engine.trajectory import parabola_change

    unet, conditioner = dash
    x, t, context = _inputs(conditioner)
    blocks = ReferenceBlocks(unet)
    inherit, line, parabola = (FeatureInheritFiller(blocks, 2, forecast=o) for o in (0, 1, 2))
    _, oldest = _anchor_of(inherit, unet, x * 1.4, t + 200, context)
    _, earlier = _anchor_of(inherit, unet, x * 1.2, t + 80, context)
    z, latest = _anchor_of(inherit, unet, x, t, context)
    x2, t2 = x * 0.9, t - 40
    two = Anchor(x=x, z=z, t=t, step=2, features=latest.features, earlier=(earlier.as_call(),))
    three = Anchor(x=x, z=z, t=t, step=4, features=latest.features, earlier=(earlier.as_call(), oldest.as_call()))
    with torch.no_grad():
        # two Dash calls so far: the line, as first order
        assert torch.equal(parabola(unet, x2, t2, two, context, {}), line(unet, x2, t2, two, context, {}))
        assert torch.equal(parabola(unet, x, t, three, context, {}), z)  # at the anchor's time: Dash exactly
        deep = latest.features["deep"]
        moved = dict(latest.features, deep=deep + parabola_change(deep, t, earlier.features["deep"], t + 80,
                                                                  oldest.features["deep"], t + 200, t2))
        expected = inherit(unet, x2, t2, Anchor(x=x, z=z, t=t, step=4, features=moved), context, {})
        got = parabola(unet, x2, t2, three, context, {})
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, line(unet, x2, t2, three, context, {}))


def test_the_router_keeps_the_previous_dash_calls_features_only_for_a_fill_that_reads_them(dash):
    unet, conditioner = dash
    cond, uncond = conditioner(torch.tensor([3, 7])), conditioner(torch.full((2,), NULL_CLASS))
    sigmas = torch.linspace(10.0, 0.0, 7)
    seen = []

    class Spy(FeatureInheritFiller):  # records the anchor each fill call gets
        def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
            seen.append(anchor)
            return super().__call__(backbone_call, x, t, anchor, context, kwargs, sigma=sigma)

    for order in (0, 1, 2):
        seen.clear()
        fill = Spy(ReferenceBlocks(unet), 2, forecast=order)
        router = MorseRouter(Pattern("D."), fill)
        with torch.no_grad(), router.run(sigmas) as run:
            _euler(run, unet, cond, uncond, sigmas, keys_apart=True)
        assert len(seen) == 6  # 3 fill steps x cond and uncond apart
        assert seen[0].before(1) is None and seen[2].before(2) is None  # one, then two Dash calls so far
        later = [a.before(1) for a in seen[2:]]
        assert all(c is not None and c.features is not None for c in later) if order else all(c is None for c in later)
        if order:  # the Dash call before the anchor, not the anchor's own
            assert not torch.equal(seen[2].before(1).features["deep"], seen[2].features["deep"])
        if order == 2:  # the third fill step (after three Dash calls): the call before that one too, per key
            for a, b in ((seen[4], seen[2]), (seen[5], seen[3])):
                assert a.before(2).features["deep"] is b.before(1).features["deep"] and torch.equal(a.before(2).t, b.before(1).t)
        else:
            assert all(a.before(2) is None for a in seen)


@pytest.mark.parametrize("make", [lambda b: FeatureInheritFiller(b, 2), EncoderPropagationFiller,
                                  lambda b: FeatureInheritFiller(b, 2, forecast=1),
                                  lambda b: FeatureInheritFiller(b, 2, forecast=2)])
def test_cond_and_uncond_in_one_call_or_apart_give_the_same_samples(dash, make):
    unet, conditioner = dash
    fill = make(ReferenceBlocks(unet))
    cond, uncond = conditioner(torch.tensor([3, 7])), conditioner(torch.full((2,), NULL_CLASS))
    sigmas = torch.linspace(10.0, 0.0, 7)
    out = []
    for apart in (False, True):
        router = MorseRouter(Pattern("D."), fill)
        with torch.no_grad(), router.run(sigmas) as run:
            out.append(_euler(run, unet, cond, uncond, sigmas, apart))
        s = router.last_summary
        assert s.dot_calls > 0 and s.fallback_calls == 0
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_a_control_input_falls_back_to_dash(dash):
    unet, conditioner = dash
    fill = FeatureInheritFiller(ReferenceBlocks(unet), 1)
    router = MorseRouter(EveryK(2), fill)
    x, t, context = _inputs(conditioner, b=1)
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    with torch.no_grad(), router.run(sigmas) as run:
        run(unet, x, t, 10.0, context=context)
        run(unet, x, t - 50, 5.0, context=context, control={"middle": [None]})
    assert (router.last_summary.dash_calls, router.last_summary.dot_calls) == (2, 0)


def test_a_backbone_without_the_block_layout_is_refused_naming_the_fill():
    class Flat(torch.nn.Module):
        pass

    with pytest.raises(MorseError, match="the inherit fill needs a UNet with input_blocks"):
        FeatureInheritFiller(Flat(), 1)
    with pytest.raises(MorseError, match="k=9"):
        FeatureInheritFiller(ReferenceBlocks(load_reference_dash()[0]), 9)
    with pytest.raises(MorseError, match="order 3 must be 0"):
        FeatureInheritFiller(ReferenceBlocks(load_reference_dash()[0]), 2, forecast=3)


def test_under_heun_second_order_forecasting_reads_three_different_dash_steps(dash):
    """Heun calls Dash twice per step; the parabola must run through three steps' calls, not two of one step."""
    from morse_engine import KeySteps

    unet, conditioner = dash
    seen = []

    class Spy(FeatureInheritFiller):
        def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
            seen.append((anchor.t, *(None if c is None else c.t for c in (anchor.before(1), anchor.before(2)))))
            return super().__call__(backbone_call, x, t, anchor, context, kwargs, sigma=sigma)

    _guided_run(unet, conditioner, Spy(ReferenceBlocks(unet), 2, forecast=2), "heun", KeySteps((0, 1, 2, 4, 6), reference_steps=8), steps=8)
    with_three = [s for s in seen if s[2] is not None]
    assert with_three
    for t, t_p, t_q in with_three:  # strictly earlier (noisier) calls each: three distinct times
        assert bool((t_q > t_p).all() and (t_p > t).all()), (t, t_p, t_q)


def test_a_feature_fill_is_priced_by_a_measured_n():
    assert not FeatureInheritFiller.free and not EncoderPropagationFiller.free


def _guided_run(unet, conditioner, fill, sampler, schedule, steps=12, timestep_of=True):
    from morse_engine.parameterization import DiscreteSchedule
    from training.reference.unet import sd_alphas_cumprod
    from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample

    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    sigmas = normal_sigmas(ms, steps)
    cond, uncond = conditioner(torch.tensor([3, 7])), conditioner(torch.full((2,), NULL_CLASS))
    router = MorseRouter(schedule, fill, timestep_of=ms.timestep if timestep_of else None)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), router.run(sigmas) as run:
        x = sample(sampler, GuidedDenoiser(unet, ms, cond, uncond, 3.0, run=run), noise, sigmas, ms)
    return x, router.last_summary


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_parallel_decoding_gives_the_sequential_samples_with_fewer_calls(dash, sampler):
    """Faster Diffusion's parallel decoding: the steps up to the next key step decoded in one batched call give
    the samples of decoding them one at a time (up to the batch's rounding); a second-order sampler's calls
    between steps are decoded on their own."""
    from morse_engine import KeySteps

    unet, conditioner = dash
    blocks = ReferenceBlocks(unet)
    schedule = KeySteps((0, 2, 6), reference_steps=12)
    seq, s_seq = _guided_run(unet, conditioner, EncoderPropagationFiller(blocks, parallel=False), sampler, schedule)
    par, s_par = _guided_run(unet, conditioner, EncoderPropagationFiller(blocks), sampler, schedule)
    torch.testing.assert_close(par, seq, rtol=1e-4, atol=1e-4)
    assert s_seq.decoded_ahead == 0 and s_par.dot_calls == s_seq.dot_calls and s_par.fallback_calls == 0
    # D.D...D.....: the spans are [1], [3, 4, 5] and [7 .. 11]; all but each span's first step are served ahead
    assert s_par.decoded_ahead == 0 + 2 + 4
    assert "decoded ahead in batched calls" in s_par.log_line()
    # without the host's sigma -> timestep map the router cannot know the span's times: one call per step
    _, s_none = _guided_run(unet, conditioner, EncoderPropagationFiller(blocks), sampler, schedule, timestep_of=False)
    assert s_none.decoded_ahead == 0


def test_the_decoded_span_is_dropped_when_the_run_raises(dash):
    from morse_engine import KeySteps
    from morse_engine.parameterization import DiscreteSchedule

    unet, conditioner = dash
    ms = DiscreteSchedule.from_alphas_cumprod(torch.linspace(0.99, 0.01, 1000))
    router = MorseRouter(KeySteps((0,), reference_steps=4), EncoderPropagationFiller(ReferenceBlocks(unet)),
                         timestep_of=ms.timestep)
    x, t, context = _inputs(conditioner, b=1)
    sigmas = [3.0, 2.0, 1.0, 0.5, 0.0]
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), router.run(sigmas) as run:
        run(unet, x, ms.timestep(torch.tensor(3.0)).expand(1), 3.0, context=context)
        run(unet, x, ms.timestep(torch.tensor(2.0)).expand(1), 2.0, context=context)
        kept = dict(run.decoded)
        raise KeyboardInterrupt
    assert len(kept) == 2 and not run.decoded and not run.anchors
