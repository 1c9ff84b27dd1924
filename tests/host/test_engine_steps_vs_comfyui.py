"""The engine's parameterisation and one-step updates against ComfyUI's own code on the same inputs."""
from types import SimpleNamespace

import pytest
import torch

from morse_engine.parameterization import cfg_combine, denoised_from_eps, scale_input, to_eps
from morse_engine.solver_steps import ancestral_sigmas, ancestral_step, dpmpp_2m_step, euler_step, to_d
from training.evaluation.samplers import sample_dpmpp_2m, sample_euler


class ToyDenoiser:
    """A deterministic (x, sigma) -> denoised that depends on both, shaped like ComfyUI's sampler model."""

    def __init__(self):
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=object()))

    def __call__(self, x, sigma, **_):
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(x) * 0.8 / (1 + 0.1 * s) + 0.05 * s.sin()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 10
    sigmas = torch.tensor([10.0, 6.5, 3.2, 1.1, 0.4, 0.0], dtype=torch.float64)
    return x, sigmas


def test_euler_matches_comfyuis_sample_euler(host):
    import comfy.k_diffusion.sampling as kds

    x, sigmas = _inputs()
    model = ToyDenoiser()
    mine = euler_step(x, to_d(x, sigmas[0], model(x, sigmas[0])), sigmas[0], sigmas[1])
    torch.testing.assert_close(mine, kds.sample_euler(model, x, sigmas[:2], disable=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(sample_euler(model, x, sigmas), kds.sample_euler(model, x, sigmas, disable=True),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ancestral_step_matches_comfyuis_sample_euler_ancestral(host, eta):
    import comfy.k_diffusion.sampling as kds

    x, sigmas = _inputs()
    model = ToyDenoiser()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    theirs = kds.sample_euler_ancestral(model, x, sigmas[:2], disable=True, eta=eta, noise_sampler=lambda s, sn: noise)
    mine = ancestral_step(x, to_d(x, sigmas[0], model(x, sigmas[0])), sigmas[0], sigmas[1], noise, eta)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    down, up = ancestral_sigmas(sigmas[0], sigmas[1], eta)
    k_down, k_up = kds.get_ancestral_step(sigmas[0], sigmas[1], eta)
    assert float(down) == pytest.approx(float(k_down), abs=1e-12) and float(up) == pytest.approx(float(k_up), abs=1e-12)


def test_dpmpp_2m_matches_comfyuis_sample_dpmpp_2m(host):
    import comfy.k_diffusion.sampling as kds

    x, sigmas = _inputs()
    model = ToyDenoiser()
    d0 = model(x, sigmas[0])
    first = dpmpp_2m_step(x, d0, None, None, sigmas[0], sigmas[1])
    torch.testing.assert_close(first, kds.sample_dpmpp_2m(model, x, sigmas[:2], disable=True), rtol=0, atol=1e-12)
    second = dpmpp_2m_step(first, model(first, sigmas[1]), d0, sigmas[0], sigmas[1], sigmas[2])
    torch.testing.assert_close(second, kds.sample_dpmpp_2m(model, x, sigmas[:3], disable=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(sample_dpmpp_2m(model, x, sigmas), kds.sample_dpmpp_2m(model, x, sigmas, disable=True),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["EPS", "V_PREDICTION"])
def test_parameterisation_matches_comfyuis_model_sampling(host, kind):
    import comfy.model_sampling as cms

    sampling = type("MS", (getattr(cms, kind), cms.ModelSamplingDiscrete), {})()
    x, _ = _inputs()
    sigma = torch.tensor([3.2, 0.7], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(scale_input(x, s), sampling.calculate_input(sigma, x), rtol=1e-12, atol=1e-12)
    out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    eps = to_eps(scale_input(x, s), s, out, "eps" if kind == "EPS" else "v")
    torch.testing.assert_close(denoised_from_eps(x, s, eps), sampling.calculate_denoised(sigma, out, x),
                               rtol=1e-10, atol=1e-10)


def test_cfg_combination_is_comfyuis_cfg_function(host):
    import comfy.samplers

    cond, uncond = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    theirs = comfy.samplers.cfg_function(None, cond, uncond, 3.5, None, None, {}, None, None)
    torch.testing.assert_close(cfg_combine(torch.cat([cond, uncond]), 3.5), theirs, rtol=1e-6, atol=1e-6)
