"""Sampling loops for the evaluation, mirroring ComfyUI's k-diffusion path.

Each sampler is a short loop over the engine's one-step updates (``morse_engine.solver_steps``),
and the model call goes through the engine's parameterisation: the sampler holds
x = x0 + sigma * noise, the model sees the scaled input and the nearest discrete timestep and
returns eps or v (a flow model: x = (1 - sigma) x0 + sigma * noise, seen as is, the velocity back;
``morse_engine.parameterization.FlowSchedule``). The Morse router sits exactly at that model call, so what is measured here is
what the nodes do inside ComfyUI.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from morse_engine import MorseRun
from morse_engine.block_replace import takes_block_patches
from morse_engine.parameterization import DiscreteSchedule, cfg_combine
from morse_engine.solver_steps import ancestral_step, dpmpp_2m_step, euler_step, to_d


def normal_sigmas(ms: DiscreteSchedule, steps: int) -> torch.Tensor:
    """ComfyUI's "normal" scheduler: timesteps evenly spaced from the top to the bottom."""
    start = float(ms.timestep(torch.tensor(ms.sigma_max)))
    end = float(ms.timestep(torch.tensor(ms.sigma_min)))
    ts = torch.linspace(start, end, steps)
    return torch.cat([ms.sigma(ts), torch.zeros(1)])


def karras_sigmas(ms: DiscreteSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


SCHEDULERS = {"normal": normal_sigmas, "karras": karras_sigmas}


class GuidedDenoiser:
    """x, sigma -> denoised, with classifier-free guidance, through an optional Morse run.

    Cond and uncond go through the model in one batch, keyed so the router keeps an anchor
    for each; with cfg == 1 only the cond is evaluated, as ComfyUI does. ``prediction``: the model's native
    output ("eps", "v" or "x0"; default: the schedule's own); ``kwargs``: what else it takes for the [cond, uncond]
    batch (SDXL's ``y``). A DiT (its block fills patch one call's options)
    gets a fresh ``transformer_options`` each call, as ComfyUI gives one.
    """

    def __init__(self, unet, ms: DiscreteSchedule, cond_ctx, uncond_ctx, cfg: float, run: Optional[MorseRun] = None,
                 prediction: Optional[str] = None, kwargs: Optional[dict] = None):
        self.unet, self.ms, self.cond, self.uncond, self.cfg, self.run = unet, ms, cond_ctx, uncond_ctx, cfg, run
        self.prediction, self.kwargs = prediction, kwargs or {}
        self.fresh_options = takes_block_patches(unet)

    def _model(self, x, t, sigma, keys, ctx, kwargs):
        if self.fresh_options:
            kwargs = {**kwargs, "transformer_options": {}}
        if self.run is None:
            return self.unet(x, t, context=ctx, **kwargs)
        return self.run(self.unet, x, t, sigma, keys=keys, context=ctx, **kwargs)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x_in = self.ms.model_input(x, sigma)
        t = self.ms.timestep(sigma).reshape(1).expand(b).to(x.device)
        if self.cfg == 1.0:
            kwargs = {k: v[:b] for k, v in self.kwargs.items()}
            z = self._model(x_in, t, float(sigma), ["cond"], self.cond, kwargs)
        else:
            out = self._model(
                torch.cat([x_in, x_in]), torch.cat([t, t]), float(sigma), ["cond", "uncond"],
                torch.cat([self.cond, self.uncond]), self.kwargs,
            )
            # guidance is an affine combination, so combining the native outputs and then converting is the same
            z = cfg_combine(out, self.cfg)
        return self.ms.denoised(x, sigma, z, self.prediction)


def sample_euler(model: Callable, x, sigmas, generator=None):
    """Euler; with eps prediction this is DDIM."""
    for i in range(len(sigmas) - 1):
        x = euler_step(x, to_d(x, sigmas[i], model(x, sigmas[i])), sigmas[i], sigmas[i + 1])
    return x


def sample_heun(model: Callable, x, sigmas, generator=None):
    """Heun's second-order method (two model calls per step)."""
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        x_2 = euler_step(x, d, sigmas[i], sigmas[i + 1])
        if sigmas[i + 1] == 0:
            x = x_2
        else:
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = euler_step(x, (d + d_2) / 2, sigmas[i], sigmas[i + 1])
    return x


def sample_euler_ancestral(model: Callable, x, sigmas, generator=None):
    """Euler ancestral (eta = 1): stochastic, seeded through ``generator``."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, s, model(x, s))
        if s_next > 0:
            x = ancestral_step(x, d, s, s_next, torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))
        else:
            x = euler_step(x, d, s, s_next)
    return x


def sample_dpmpp_2m(model: Callable, x, sigmas, generator=None):
    """DPM-Solver++(2M), as in k-diffusion and ComfyUI."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = dpmpp_2m_step(x, denoised, old_denoised, sigmas[i - 1] if i else None, sigmas[i], sigmas[i + 1])
        old_denoised = denoised
    return x


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
}
DETERMINISTIC = {"euler", "heun", "dpmpp_2m"}


def sample(sampler: str, model: Callable, noise, sigmas, ms: DiscreteSchedule, generator=None):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {sorted(SAMPLERS)}; pick one of those")
    x = ms.initial_latent(noise, float(sigmas[0]))
    return SAMPLERS[sampler](model, x, sigmas, generator)
