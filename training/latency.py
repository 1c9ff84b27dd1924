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
def measure_n(unet, dot, x: torch.Tensor, context: torch.Tensor, t: float = 500.0, repeats: int = 5) -> dict:
    """Median wall time of one Dash call and one Dot call on the same batch, and their ratio."""
    b = x.shape[0]
    t_now = torch.full((b,), t)
    t_anchor = torch.full((b,), t + 50)
    z = unet(x, t_anchor, context=context)
    dash = median_seconds(lambda: unet(x, t_now, context=context), repeats)
    dot_s = median_seconds(lambda: dot(unet, x, t_now, x, z, t_anchor, context=context), repeats)
    return {"dash_seconds": dash, "dot_seconds": dot_s, "N": dash / dot_s, "batch": b, "shape": list(x.shape[1:])}
