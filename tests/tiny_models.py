"""Tiny models and a small sampler for the host-free tests (imported by name, so unique)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TinyAttention(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.to_out(w @ v)


class TinyBackbone(nn.Module):
    """An SD-shaped toy: conv in, 1x1 proj_in, self- and cross-attention, a down/up pair."""

    def __init__(self, in_channels=4, model_channels=16, context_dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.in_channels = in_channels
        self.model_channels = model_channels
        mc = model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, mc), nn.SiLU(), nn.Linear(mc, mc))
        self.conv_in = nn.Conv2d(in_channels, mc, 3, padding=1)
        self.proj_in = nn.Conv2d(mc, mc, 1)
        self.attn1 = TinyAttention(mc, mc)
        self.attn2 = TinyAttention(mc, context_dim)
        self.down = nn.Conv2d(mc, mc, 3, stride=2, padding=1)
        self.conv_out = nn.Conv2d(2 * mc, in_channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)
        temb = self.time_embed(torch.cat([torch.cos(timesteps[:, None] * freqs), torch.sin(timesteps[:, None] * freqs)], -1))
        h = self.proj_in(self.conv_in(x)) + temb[:, :, None, None]
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn1(tokens)
        if context is not None:
            tokens = tokens + self.attn2(tokens, context)
        h = tokens.transpose(1, 2).reshape(b, c, hh, ww)
        low = F.interpolate(F.silu(self.down(h)), size=(hh, ww), mode="nearest")
        return self.conv_out(torch.cat([h, low], dim=1))


def karras_sigmas(steps, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, steps)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1)])


def sigma_to_t(sigma):
    return torch.log(torch.as_tensor(sigma, dtype=torch.float32)) * 100 + 300


def euler_sample(model_call, noise, sigmas, context=None, heun=False):
    """Euler (or Heun) over ``sigmas``; ``model_call(x_in, t, sigma, context)`` returns eps."""
    x = noise * sigmas[0]

    def denoise(x, sigma):
        c_in = 1 / (sigma**2 + 1) ** 0.5
        t = sigma_to_t(sigma).expand(x.shape[0])
        eps = model_call(x * c_in, t, float(sigma), context)
        return x - sigma * eps

    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s)) / s
        x_next = x + d * (s_next - s)
        if heun and s_next > 0:
            d2 = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (d + d2) / 2 * (s_next - s)
        x = x_next
    return x
