"""One step of the k-diffusion samplers, written once (as in k-diffusion's ``sampling.py``).

The evaluation's sampling loops and the Dot's training tuples (Algorithm 1 forms x_i with one
sampler step from the anchor) both step with these, so what the Dot is trained on is the step
the samplers take. A host test checks them against ComfyUI's own samplers on the same inputs.
"""
from __future__ import annotations

import torch


def to_d(x, sigma, denoised):
    """The ODE's derivative dx/dsigma: (x - denoised) / sigma, which is eps."""
    return (x - denoised) / sigma


def euler_step(x, d, sigma, sigma_next):
    """Euler (with eps prediction: DDIM) from sigma to sigma_next along d."""
    return x + d * (sigma_next - sigma)


def ancestral_sigmas(sigma, sigma_next, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step: go down deterministically to sigma_down, then
    add fresh noise of scale sigma_up, so the marginal at sigma_next is right (k-diffusion's
    ``get_ancestral_step``; clamped at 0 so tensors of sigmas with round-off stay real)."""
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp(min=0) ** 0.5
    up = torch.minimum(torch.as_tensor(sigma_next), up)
    down = (sigma_next**2 - up**2).clamp(min=0) ** 0.5
    return down, up


def ancestral_step(x, d, sigma, sigma_next, noise, eta: float = 1.0):
    """Euler ancestral: an Euler step to sigma_down plus ``noise`` (unit normal) times sigma_up."""
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    return x + d * (down - sigma) + noise * up


def dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigma, sigma_next):
    """DPM-Solver++(2M) from sigma to sigma_next (k-diffusion's ``sample_dpmpp_2m``).

    ``old_denoised`` (at ``sigma_prev``) is None on the first step, which is then first order;
    a last step to sigma 0 returns ``denoised``.
    """
    if sigma_next == 0:
        return denoised
    t, t_next = -sigma.log(), -sigma_next.log()
    h = t_next - t
    ratio = sigma_next / sigma
    if old_denoised is None:
        return ratio * x - torch.expm1(-h) * denoised
    r = (t - (-sigma_prev.log())) / h
    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x - torch.expm1(-h) * d
