"""The peers as the table prices them (``morse_engine.peers``): each decides and fills as its source says, on the
reference models, through the same router as Morse."""
import math

import numpy as np
import pytest
import torch

from morse_engine import MorseRouter, ScheduleError
from morse_engine.block_replace import PatchedDiTBlocks
from morse_engine.peers import deepcache, faster_diffusion, fbcache, lazycache, magcache, taylorseer, teacache
from morse_engine.peers.cached_blocks import SIGNAL, relative_l1
from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample
from training.evaluation.workload import load_models, reference_workload, run_plain, sample_denoiser_cached, sample_routed
from training.reference.blocks import ReferenceBlocks
from training.reference.dit import DEFAULT_DIT_PATH

STEPS = 12


@pytest.fixture(scope="module")
def dit_work():
    models = load_models(DEFAULT_DIT_PATH, None)
    return reference_workload(models, 4, 4, 2.5, 0, "cpu"), PatchedDiTBlocks(models.unet)


@pytest.fixture(scope="module")
def unet_work():
    models = load_models(None, None)
    return reference_workload(models, 4, 4, 2.5, 0, "cpu"), ReferenceBlocks(models.unet)


def test_teacache_polynomial_and_fit_are_numpys():
    coeffs = teacache.FLUX_COEFFICIENTS
    for x in (0.0, 0.03, 0.2, 1.5):
        assert teacache.polynomial(coeffs, x) == pytest.approx(float(np.poly1d(coeffs)(x)), rel=1e-12)
    xs = np.linspace(0, 0.5, 40)
    ys = np.poly1d(coeffs)(xs) + 0.01 * np.sin(30 * xs)
    assert np.allclose(teacache.fit_coefficients(xs, ys), np.polyfit(xs, ys, 4), rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="more than 4 points"):
        teacache.fit_coefficients([0.1, 0.2], [1.0, 2.0])


def test_teacache_accumulates_the_rescaled_change_and_restarts_after_a_computed_step():
    spec = teacache.TeaCache(rel_l1_thresh=0.5, coefficients=(1.0, 0.0))  # rescaled change = the change itself
    sched = spec.resolve(6)
    base = torch.ones(8)
    assert sched.decide(0, 1.0, base) is True and sched.reasons[0] == "first step"
    sched.observe(base, base, features={SIGNAL: base})
    decisions = []
    for step, scale in zip(range(1, 6), (1.2, 1.44, 1.728, 2.0, 2.2)):
        assert sched.decide(step, 0.5, base) is False  # the fill runs first: the decision is the signal's
        decisions.append(sched.confirm(step, 0.5, base * scale))
    # changes 0.2, 0.2, 0.2 (sum 0.6 >= 0.5: Dash, restart), then 0.157, 0.1
    assert decisions == [False, False, True, False, False]
    assert "change 0.600 >= 0.5" in sched.explain()


def test_teacache_at_threshold_zero_is_plain_sampling_and_its_fill_at_the_anchor_is_dash(dit_work):
    work, blocks = dit_work
    plain, _ = run_plain("euler", work, STEPS)
    ours, totals = sample_routed("euler", work, STEPS, *teacache.teacache(blocks, 0.0))
    assert totals["dot_calls"] == 0 and totals["probe_calls"] == STEPS - 1
    assert torch.equal(ours, plain)  # the probes the gate ran cost nothing and changed nothing
    cached, totals = sample_routed("euler", work, STEPS, *teacache.teacache(blocks, 0.4))
    assert totals["dot_calls"] > 0 and not torch.equal(cached, plain)


@pytest.mark.parametrize("make", [teacache.teacache_fill, fbcache.dit_fill, magcache.magcache_fill],
                         ids=["teacache", "fbcache", "magcache"])
def test_each_cached_blocks_fill_at_the_anchors_own_input_returns_dash(dit_work, make):
    work, blocks = dit_work
    fill = make(blocks)
    x, t, ctx = work.noise, torch.full((4,), 0.6), work.cond
    kwargs = {"transformer_options": {}}
    with torch.no_grad(), fill.capturing(kwargs) as features:
        dash = work.unet(x, t, context=ctx, **kwargs)
    from morse_engine.fillers import Anchor

    anchor = Anchor(x=x, z=dash, t=t, step=0, features=dict(features))
    out = fill(work.unet, x, t, anchor, ctx, {"transformer_options": {}})
    torch.testing.assert_close(out, dash, rtol=1e-4, atol=1e-5)


def test_first_block_cache_compares_with_the_last_computed_step_and_fills_on_both_models(dit_work, unet_work):
    spec = fbcache.FirstBlockCache(residual_diff_threshold=0.1)
    sched = spec.resolve(5)
    a = torch.ones(4)
    sched.decide(0, 1.0, a)
    sched.observe(a, a, features={SIGNAL: a})
    sched.decide(1, 0.8, a)
    assert sched.confirm(1, 0.8, a * 1.06) is False  # 0.06 from the computed step
    sched.decide(2, 0.6, a)
    assert sched.confirm(2, 0.6, a * 1.12) is True  # 0.12 from the computed step, though 0.06 from the last
    for work, blocks in (dit_work, unet_work):
        plain, _ = run_plain("euler", work, STEPS)
        x, totals = sample_routed("euler", work, STEPS, *fbcache.fbcache(blocks, 0.5))
        assert totals["dot_calls"] > 0 and totals["dash_calls"] + totals["dot_calls"] == STEPS
        assert float((x - plain).pow(2).mean().sqrt()) < 0.5 * float(plain.pow(2).mean().sqrt())


def test_magcache_ratios_interpolation_and_decisions():
    r = [torch.full((2, 3, 4), v) for v in (1.0, 2.0, 1.0)]
    assert magcache.magnitude_ratios(r) == pytest.approx((1.0, 2.0, 0.5))
    # numpy's round, halves to even, as the authors' np.round: indices 0, 0, 1, 2, 2, 2, 3
    assert magcache.nearest_interp([1.0, 0.9, 0.8, 0.7], 7) == [1.0, 1.0, 0.9, 0.8, 0.8, 0.8, 0.7]
    assert magcache.nearest_interp([1.0, 0.9, 0.8, 0.7], 7) == [[1.0, 0.9, 0.8, 0.7][i] for i in np.round(np.arange(7) * 3 / 6).astype(int)]
    spec = magcache.MagCache(ratios=(1.0,) + (0.9,) * 9, magcache_thresh=0.5, retention_ratio=0.2, magcache_K=5)
    sched = spec.resolve(10)
    pattern = "".join("D" if sched.decide(i, 1.0, None) else "." for i in range(10))
    # retention keeps steps 0-1; errors then 0.1, 0.29 (skip), 0.561 (> 0.5: compute, restart), 0.1, 0.29, ...
    assert pattern == "DD..D..D.."
    with pytest.raises(ScheduleError, match="calibrated magnitude ratios"):
        magcache.MagCache(ratios=())


def test_taylorseer_schedule_and_expansion_are_the_authors():
    flags = taylorseer.TaylorSeerSchedule().resolve(20).dash
    assert [i for i, d in enumerate(flags) if d] == [0, 1, 2, 8, 14]
    calls = [(8, torch.tensor(64.0)), (2, torch.tensor(4.0)), (1, torch.tensor(1.0))]  # f(s) = s^2
    f0, f1, f2 = taylorseer.taylor_factors(calls, 2)
    assert float(f1) == pytest.approx((64 - 4) / 6) and float(f2) == pytest.approx(((64 - 4) / 6 - 3) / 6)
    assert len(taylorseer.taylor_factors(calls, 1)) == 2


def test_taylorseer_order_one_is_exact_on_a_residual_linear_in_the_step(dit_work):
    from morse_engine.dit_fills import RESIDUAL
    from morse_engine.fillers import Anchor, DashCall

    predict = taylorseer.taylor_residual(1)
    anchor = Anchor(x=None, z=None, t=None, step=8, features={RESIDUAL: torch.tensor(17.0)},
                    earlier=(DashCall(None, None, {RESIDUAL: torch.tensor(5.0)}, step=2),))
    assert float(predict(anchor, None, 11)) == pytest.approx(17.0 + 3 * 2.0)
    work, blocks = dit_work
    for order in (1, 2):
        x, totals = sample_routed("euler", work, STEPS, *taylorseer.taylorseer(blocks, order, fresh_threshold=3))
        assert totals["dash_calls"] == 6 and torch.isfinite(x).all()


def test_lazycache_gates_the_guided_prediction_and_starts_one_step_before_easycache(dit_work):
    work, _ = dit_work
    plain, _ = run_plain("euler", work, STEPS)
    x, totals = sample_denoiser_cached("euler", work, STEPS, lazycache.lazycache(0.0))
    assert torch.equal(x, plain) and totals["dot_calls"] == 0
    x, totals = sample_denoiser_cached("euler", work, 24, lazycache.lazycache(1.0))
    assert totals["dot_calls"] > 0 and totals["dash_calls"] + totals["dot_calls"] == 24
    # LazyCache keeps the steps before start, so its first step in the window may already be skipped
    sigmas = normal_sigmas(work.ms, 24)
    first = {}
    for name, spec in (("lazy", lazycache.lazycache(10.0)), ("easy", lazycache.lazycache(10.0).__class__(
            threshold=10.0, start=0.15, end=0.95, subsample=8))):
        run = lazycache.LazyCacheRun(spec, sigmas, work.ms.percent_to_sigma)
        den = GuidedDenoiser(work.unet, work.ms, work.cond, work.uncond, work.cfg)
        sample("euler", lambda x, s: run(den, x, s), work.noise, sigmas, work.ms)
        first[name] = run.schedule.pattern().index(".")
    assert first["lazy"] == first["easy"] - 1


def test_deepcache_and_faster_diffusion_are_the_packs_fills_on_their_schedules(unet_work):
    _, blocks = unet_work
    spec, fill = deepcache.deepcache(blocks)
    assert fill.name == "inherit_k1" and spec.resolve(7).pattern() == "D..D..D"
    spec, fill = faster_diffusion.faster_diffusion(blocks)
    assert fill.name == "propagate" and [i for i, d in enumerate(spec.resolve(50).dash) if d] == \
        [0, 1, 2, 3, 5, 10, 15, 25, 35]


def test_a_probing_schedule_charges_the_probe_only_where_its_output_serves_the_step(dit_work):
    work, blocks = dit_work
    router = MorseRouter(*teacache.teacache(blocks, 0.25))
    sigmas = normal_sigmas(work.ms, STEPS)
    with router.run(sigmas) as run:
        sample("euler", GuidedDenoiser(work.unet, work.ms, work.cond, work.uncond, work.cfg, run=run), work.noise,
               sigmas, work.ms)
    s = router.last_summary
    assert s.dash_calls + s.dot_calls == STEPS and s.probe_calls == s.dash_calls - 1
    assert s.lsd(10.0) == pytest.approx(s.dash_calls + s.dot_calls / 10.0)
    assert "first step" in s.why and "change" in s.why
    assert math.isfinite(relative_l1(torch.ones(2), torch.ones(2) * 2))
