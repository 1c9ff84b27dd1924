"""Faster Diffusion's prior noise injection, as a change of the denoiser a k-diffusion sampler calls.

The paper adds ``alpha * z_T`` (the run's initial latent, alpha = 0.003) to the DDIM latent z_t before every
step in the second half of the run (timestep t < tau = 500 of 1000), cumulatively; it restores texture that
encoder propagation loses. ComfyUI samples x = z_t * sqrt(1 + sigma^2) in sigma space, so the same injection
is x += delta with delta = alpha * sqrt(1 + sigma^2) * z_T. The sampler's state cannot be touched from outside,
but for a first-order step from sigma to sigma_next (Euler, DDIM),

    x_next = (s'/s) (x + delta) + (1 - s'/s) D(x + delta)    equals    (s'/s) x + (1 - s'/s) D'(x)
    with    D'(x) = D(x + delta) + delta * s' / (s - s'),

so a denoiser that sees the shifted input and adds that term gives the injected trajectory exactly. With other
samplers each call on the step grid is shifted the same way (the first-order reading of the step) and calls
between steps see the shifted input only.

On a flow model (ComfyUI's CONST: x = (1 - sigma) x0 + sigma noise) the latent is x itself: z_T is the first x,
delta = alpha z_T, and "the second half of the run" is sigma below tau / 1000 (the same share of the time axis),
since a flow model's timestep is sigma times a multiplier that differs by family (1 for Flux, 1000 for SD3).
The step identity above holds unchanged: ComfyUI's samplers step flow models in sigma with the same update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import MorseError
from .parameterization import on_step, scale_input, step_at


@dataclass(frozen=True)
class PriorNoise:
    alpha: float = 0.003
    below_timestep: float = 500.0  # the paper's tau: injected where the model's timestep is below this

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha < 1:
            raise MorseError(f"prior noise alpha must be in [0, 1) (got {self.alpha!r}); Faster Diffusion uses 0.003")

    def denoiser(self, denoise: Callable, sigmas: Sequence[float], timestep_of: Callable, flow: bool = False) -> Callable:
        """``denoise(x, sigma, **kw)`` with the injection, for one run over ``sigmas``; the run's first call
        (at ``sigmas[0]``) gives z_T. ``flow``: the model is a flow model (CONST)."""
        grid = [float(s) for s in sigmas]
        if flow:
            active = [s < self.below_timestep / 1000.0 for s in grid[:-1]]
        else:
            active = [float(timestep_of(torch.tensor(s))) < self.below_timestep for s in grid[:-1]]
        state: dict = {}

        def injected(x, sigma, **kw):
            s = float(torch.as_tensor(sigma).reshape(-1)[0])
            if "z_T" not in state:
                state["z_T"] = (x if flow else scale_input(x, grid[0])).detach().clone()
            step = step_at(grid, s)
            if not self.alpha or not active[step]:
                return denoise(x, sigma, **kw)
            delta = self.alpha * (1.0 if flow else (s**2 + 1) ** 0.5) * state["z_T"]
            out = denoise(x + delta, sigma, **kw)
            s_next = grid[step + 1]
            # a call between steps (second-order samplers) sees the shifted input only
            return out + delta * (s_next / (s - s_next)) if on_step(grid, step, s) else out

        return injected
