"""Measured latency of Dash and Dot calls, and N = t_dash / t_dot (never assumed)."""
from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_n(unet, dot, x: torch.Tensor, context: torch.Tensor, t: float = 500.0, repeats: int = 5, **backbone_kwargs) -> dict:
    """Median wall time of one Dash call and one Dot call on the same batch, and their ratio.

    ``backbone_kwargs``: what else the backbone takes (SDXL's ``y``), passed to both calls."""
    b = x.shape[0]
    t_now = torch.full((b,), t)
    t_anchor = torch.full((b,), t + 50)
    z = unet(x, t_anchor, context=context, **backbone_kwargs)
    dash = median_seconds(lambda: unet(x, t_now, context=context, **backbone_kwargs), repeats)
    # sigmas only feed the Dot's step input; their values do not change its cost
    dot_s = median_seconds(lambda: dot(unet, x, t_now, x, z, t_anchor, context=context, sigma=1.0, anchor_sigma=1.2,
                                          **backbone_kwargs),
                           repeats)
    return {"dash_seconds": dash, "dot_seconds": dot_s, "N": dash / dot_s, "batch": b, "shape": list(x.shape[1:])}
