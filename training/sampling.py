"""Sampling for the training and evaluation tools, mirroring ComfyUI's k-diffusion path.

ComfyUI samples in sigma space: the sampler holds x = x0 + sigma * noise, the model sees the
scaled input ``x / sqrt(sigma^2 + 1)`` and the nearest discrete timestep, and returns eps,
from which ``denoised = x - sigma * eps``. The Morse router sits exactly at that model call,
so what is measured here is what the nodes do inside ComfyUI.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from morse_engine import MorseRun


class DiscreteEpsSampling:
    """ComfyUI's ``ModelSamplingDiscrete`` with eps prediction, for a given alphas_cumprod."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep of ``sigma`` (as ComfyUI does)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(-1)[None] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).float().reshape(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    @staticmethod
    def scale_input(sigma, x):
        return x / (sigma**2 + 1) ** 0.5

    @staticmethod
    def denoised(sigma, eps, x):
        return x - sigma * eps

    def initial_latent(self, noise, sigma_max):
        # ComfyUI scales pure noise by sqrt(1 + sigma^2) when sampling from the top of the schedule
        return noise * (1 + sigma_max**2) ** 0.5


def normal_sigmas(ms: DiscreteEpsSampling, steps: int) -> torch.Tensor:
    """ComfyUI's "normal" scheduler: timesteps evenly spaced from the top to the bottom."""
    start = float(ms.timestep(torch.tensor(ms.sigma_max)))
    end = float(ms.timestep(torch.tensor(ms.sigma_min)))
    ts = torch.linspace(start, end, steps)
    return torch.cat([ms.sigma(ts), torch.zeros(1)])


def karras_sigmas(ms: DiscreteEpsSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


SCHEDULERS = {"normal": normal_sigmas, "karras": karras_sigmas}


class GuidedDenoiser:
    """x, sigma -> denoised, with classifier-free guidance, through an optional Morse run.

    Cond and uncond go through the model in one batch, keyed so the router keeps an anchor
    for each; with cfg == 1 only the cond is evaluated, as ComfyUI does.
    """

    def __init__(self, unet, ms: DiscreteEpsSampling, cond_ctx, uncond_ctx, cfg: float, run: Optional[MorseRun] = None):
        self.unet, self.ms, self.cond, self.uncond, self.cfg, self.run = unet, ms, cond_ctx, uncond_ctx, cfg, run

    def _model(self, x, t, sigma, keys, ctx):
        if self.run is None:
            return self.unet(x, t, context=ctx)
        return self.run(self.unet, x, t, sigma, keys=keys, context=ctx)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x_in = self.ms.scale_input(sigma, x)
        t = self.ms.timestep(sigma).reshape(1).expand(b)
        if self.cfg == 1.0:
            eps = self._model(x_in, t, float(sigma), ["cond"], self.cond)
        else:
            out = self._model(
                torch.cat([x_in, x_in]), torch.cat([t, t]), float(sigma), ["cond", "uncond"],
                torch.cat([self.cond, self.uncond]),
            )
            c, u = out.chunk(2)
            eps = u + self.cfg * (c - u)
        return self.ms.denoised(sigma, eps, x)


def sample_euler(model: Callable, x, sigmas, generator=None):
    """Euler; with eps prediction this is DDIM."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(model: Callable, x, sigmas, generator=None):
    """Heun's second-order method (two model calls per step)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        x_2 = x + d * dt
        if sigmas[i + 1] == 0:
            x = x_2
        else:
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def sample_euler_ancestral(model: Callable, x, sigmas, generator=None):
    """Euler ancestral (eta = 1): stochastic, seeded through ``generator``."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = torch.minimum(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        sigma_down = (s_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / s
        x = x + d * (sigma_down - s)
        if s_next > 0:
            x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * sigma_up
    return x


def sample_dpmpp_2m(model: Callable, x, sigmas, generator=None):
    """DPM-Solver++(2M), as in k-diffusion and ComfyUI."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log() if sigmas[i + 1] > 0 else None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = t_next - t
            ratio = sigmas[i + 1] / sigmas[i]
            if old_denoised is None:
                x = ratio * x - torch.expm1(-h) * denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = ratio * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
}
DETERMINISTIC = {"euler", "heun", "dpmpp_2m"}


def sample(sampler: str, model: Callable, noise, sigmas, ms: DiscreteEpsSampling, generator=None):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {sorted(SAMPLERS)}; pick one of those")
    x = ms.initial_latent(noise, float(sigmas[0]))
    return SAMPLERS[sampler](model, x, sigmas, generator)
