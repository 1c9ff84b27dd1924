"""Faster Diffusion's prior noise injection through the denoiser: the injected Euler trajectory exactly."""
import pytest
import torch

from morse_engine import MorseError
from morse_engine.parameterization import DiscreteSchedule, scale_input
from morse_engine.prior_noise import PriorNoise
from morse_engine.solver_steps import euler_step, to_d
from training.reference.unet import sd_alphas_cumprod


def _setup():
    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    ts = torch.linspace(999, 0, 10)
    sigmas = torch.cat([ms.sigma(ts), torch.zeros(1)])
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    denoise = lambda x, s: target + 0.1 * torch.tanh(x)  # noqa: E731  (a smooth stand-in for a model)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * float(sigmas[0])
    return ms, sigmas, denoise, x_T


def test_the_wrapped_denoiser_gives_the_trajectory_with_the_latent_injected_before_each_late_step():
    ms, sigmas, denoise, x_T = _setup()
    prior = PriorNoise()
    # the paper's loop: z_t += alpha * z_T before each step with t < 500, then the plain step
    z_T = scale_input(x_T, float(sigmas[0]))
    x = x_T.clone()
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        if float(ms.timestep(sigmas[i])) < 500:
            x = x + prior.alpha * (s**2 + 1) ** 0.5 * z_T
        x = euler_step(x, to_d(x, s, denoise(x, s)), s, float(sigmas[i + 1]))
    wrapped = prior.denoiser(denoise, sigmas.tolist(), ms.timestep)
    y = x_T.clone()
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        y = euler_step(y, to_d(y, s, wrapped(y, s)), s, float(sigmas[i + 1]))
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    plain = x_T.clone()
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        plain = euler_step(plain, to_d(plain, s, denoise(plain, s)), s, float(sigmas[i + 1]))
    assert (y - plain).abs().max() > 1e-4  # the injection did something


def test_alpha_zero_is_the_plain_denoiser_and_a_bad_alpha_is_named():
    ms, sigmas, denoise, x_T = _setup()
    wrapped = PriorNoise(alpha=0.0).denoiser(denoise, sigmas.tolist(), ms.timestep)
    assert torch.equal(wrapped(x_T, float(sigmas[0])), denoise(x_T, float(sigmas[0])))
    with pytest.raises(MorseError, match="prior noise alpha"):
        PriorNoise(alpha=2.0)


def test_on_a_flow_model_the_latent_itself_is_injected_in_the_second_half_of_the_time_axis():
    """CONST (Flux, SD3, Wan): z_T is the first x, delta = alpha z_T, injected where sigma < 0.5, whatever the
    family's timestep multiplier (Flux 1: every timestep would be below 500)."""
    from morse_engine.parameterization import FlowSchedule, shifted_time

    ms = FlowSchedule.flux(1.15)
    sigmas = torch.cat([shifted_time(ms.shift, torch.linspace(1, 0.05, 10)), torch.zeros(1)])
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    denoise = lambda x, s: target + 0.1 * torch.tanh(x)  # noqa: E731
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    prior = PriorNoise()
    x, steps_injected = x_T.clone(), 0
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        if s < 0.5:
            x, steps_injected = x + prior.alpha * x_T, steps_injected + 1
        x = euler_step(x, to_d(x, s, denoise(x, s)), s, float(sigmas[i + 1]))
    assert 0 < steps_injected < len(sigmas) - 1
    wrapped = prior.denoiser(denoise, sigmas.tolist(), ms.timestep, flow=True)
    y = x_T.clone()
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        y = euler_step(y, to_d(y, s, wrapped(y, s)), s, float(sigmas[i + 1]))
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
