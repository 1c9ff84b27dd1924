"""Trajectory maths shared by the fills and both Dot layouts: where the line or parabola through earlier Dash
calls goes by a later time, and the sinusoidal features of a timestep.

Pure tensor arithmetic on per-entry times (no model, no host), so extrapolating the estimates (the
``extrapolate`` fill, the paper layout's ``base``) and forecasting block features (``forecast_k``,
``forecast2_k``, the feature Dot) are one formula each.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def extrapolated_change(anchor_z, anchor_t, prev_z, prev_t, t) -> torch.Tensor:
    """(t - t_s) / (t_s - t_p) (z_s - z_p): how far the line in t through the previous Dash estimate
    (z_p at t_p) and the anchor's (z_s at t_s) moves from z_s by t. Zero where t_p = t_s (no earlier
    estimate) or where there is none at all (``prev_z`` None)."""
    if prev_z is None:
        return torch.zeros_like(anchor_z)
    b = anchor_z.shape[0]
    per = lambda v: torch.as_tensor(v, device=anchor_z.device).float().reshape(-1).expand(b)  # noqa: E731
    t_s, t_p, t_now = per(anchor_t), per(prev_t), per(t)
    span = t_s - t_p
    usable = span.abs() > 1e-8
    ratio = (t_now - t_s) / torch.where(usable, span, torch.ones_like(span)) * usable
    return ratio.reshape(-1, *([1] * (anchor_z.dim() - 1))).to(anchor_z.dtype) * (anchor_z - prev_z)


def parabola_change(f_s, t_s, f_p, t_p, f_q, t_q, t) -> Optional[torch.Tensor]:
    """How far the parabola in t through (t_q, f_q), (t_p, f_p) and (t_s, f_s) moves from f_s by t (second-order
    extrapolation through three calls, oldest q; TaylorSeer's second order in Lagrange form). Written as
    l_q (f_q - f_s) + l_p (f_p - f_s), so it is exactly zero at t = t_s. None where any two of the three times
    coincide in some row (the caller then extrapolates to first order)."""
    b = f_s.shape[0]
    per = lambda v: torch.as_tensor(v, device=f_s.device).float().reshape(-1).expand(b)  # noqa: E731
    t_s, t_p, t_q, t_now = per(t_s), per(t_p), per(t_q), per(t)
    spans = torch.stack([t_s - t_p, t_s - t_q, t_p - t_q])
    if bool((spans.abs() <= 1e-8).any()):
        return None
    l_q = (t_now - t_p) * (t_now - t_s) / ((t_q - t_p) * (t_q - t_s))
    l_p = (t_now - t_q) * (t_now - t_s) / ((t_p - t_q) * (t_p - t_s))
    view = lambda v: v.reshape(-1, *([1] * (f_s.dim() - 1))).to(f_s.dtype)  # noqa: E731
    return view(l_q) * (f_q - f_s) + view(l_p) * (f_p - f_s)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a diffusion timestep (the embedding of DDPM / SD)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
