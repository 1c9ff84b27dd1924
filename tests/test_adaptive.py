"""Adaptive Dash (``morse_engine.adaptive``): the router decides step by step, from EasyCache's change-rate signal,
whether a step runs Dash or the fill; on the reference UNet through the evaluation's samplers."""
import logging

import pytest
import torch

from morse_engine import AdaptiveDash, MorseRouter, ScheduleError, make_fill
from morse_engine.peers.easycache import easycache
from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample
from training.trainer.dash_setup import reference_setup

STEPS = 12


@pytest.fixture(scope="module")
def setup():
    return reference_setup()


def _run(setup, sampler, spec, fill="extrapolate", steps=STEPS, cfg=2.5):
    labels = torch.arange(4) % 10
    ctx = setup.encode(torch.cat([labels, setup.null_condition(4)]))
    noise = torch.randn((4, *setup.latent_shape), generator=torch.Generator().manual_seed(0))
    sigmas = normal_sigmas(setup.sampling, steps)
    filler = make_fill(fill) if isinstance(fill, str) else fill
    router = MorseRouter(spec, filler, measure=False, timestep_of=setup.sampling.timestep,
                         percent_to_sigma=setup.sampling.percent_to_sigma)
    with router.run(sigmas) as r:
        out = sample(sampler, GuidedDenoiser(setup.unet, setup.sampling, ctx[:4], ctx[4:], cfg, run=r), noise, sigmas,
                     setup.sampling)
    plain = sample(sampler, GuidedDenoiser(setup.unet, setup.sampling, ctx[:4], ctx[4:], cfg), noise, sigmas,
                   setup.sampling)
    return out, plain, router.last_summary


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_a_zero_threshold_runs_dash_on_every_step_and_is_plain_sampling(setup, sampler):
    out, plain, summary = _run(setup, sampler, AdaptiveDash(threshold=0.0, start=0.0, end=1.0))
    assert torch.equal(out, plain)
    assert summary.dash_steps == set(range(STEPS)) and not summary.dot_steps


def test_an_unreachable_threshold_fills_every_step_once_the_change_rate_is_known(setup):
    out, plain, summary = _run(setup, "euler", AdaptiveDash(threshold=1e9, start=0.0, end=1.0))
    # step 0 measures the output, step 1 its change rate; every later step is predicted below the threshold
    assert summary.schedule == "DD" + "." * (STEPS - 2)
    assert not torch.equal(out, plain) and torch.isfinite(out).all()


def test_between_the_two_a_threshold_calls_dash_when_the_predicted_change_adds_up(setup):
    _, _, loose = _run(setup, "euler", AdaptiveDash(threshold=0.5, start=0.0, end=1.0))
    _, _, tight = _run(setup, "euler", AdaptiveDash(threshold=0.05, start=0.0, end=1.0))
    assert 2 < len(loose.dash_steps) < len(tight.dash_steps) < STEPS


def test_the_window_keeps_its_ends_on_dash_and_the_log_line_says_why(setup):
    _, _, summary = _run(setup, "euler", AdaptiveDash(threshold=1e9, start=0.3, end=0.8))
    line = summary.log_line()
    assert "before start" in line and "after end" in line and "no change rate yet" in line, line
    assert summary.schedule.startswith("DD") and summary.schedule.endswith("D") and "." in summary.schedule


def test_max_fills_caps_the_fills_in_a_row(setup):
    _, _, summary = _run(setup, "euler", AdaptiveDash(threshold=1e9, start=0.0, end=1.0, max_fills=2))
    assert ".." in summary.schedule and "..." not in summary.schedule
    assert "2 fills in a row" in summary.log_line()


def test_a_step_is_decided_once_whatever_the_calls_between_steps(setup):
    # heun: two calls a step; every step is either Dash for both calls or a fill for both
    _, _, summary = _run(setup, "heun", AdaptiveDash(threshold=0.3, start=0.0, end=1.0))
    assert not (summary.dash_steps & summary.dot_steps)
    assert len(summary.dash_steps) + len(summary.dot_steps) == STEPS


def test_easycache_serves_a_skipped_step_with_the_cached_residual(setup):
    spec, fill = easycache()
    assert (spec.threshold, spec.start, spec.end, spec.subsample) == (0.2, 0.15, 0.95, 8)
    out, plain, summary = _run(setup, "euler", spec, fill=fill, steps=20)
    assert summary.filler == "residual" and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [dict(threshold=-1), dict(start=0.9, end=0.1), dict(subsample=0), dict(max_fills=0),
                                    dict(start=1.5)])
def test_bad_settings_are_refused_by_name(kwargs):
    with pytest.raises(ScheduleError, match=next(iter(kwargs)).replace("_", ".")):
        AdaptiveDash(**kwargs)
