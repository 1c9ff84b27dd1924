"""Measured latency of Dash and Dot calls, and N = t_dash / t_dot (never assumed)."""
from __future__ import annotations

import statistics
import time

import torch



def timed(fn, sync=None) -> float:
    """Wall seconds of one call; ``sync`` (e.g. torch.cuda.synchronize) brackets it on an async device."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def interleaved_times(dash_call, dot_call, repeats: int, warmup: int, sync=None, on_repeat=None):
    """Times of Dash and Dot calls taken in turns, so a change of machine load hits both alike."""
    for _ in range(warmup):
        dash_call(), dot_call()
    dash_t, dot_t = [], []
    for _ in range(repeats):
        dash_t.append(timed(dash_call, sync))
        dot_t.append(timed(dot_call, sync))
        if on_repeat:
            on_repeat()
    return dash_t, dot_t


@torch.no_grad()
def measure_n(unet, dot, x: torch.Tensor, context: torch.Tensor, t: float = 500.0, repeats: int = 5, **backbone_kwargs) -> dict:
    """Median wall time of one Dash call and one Dot call on the same batch, and their ratio.

    ``backbone_kwargs``: what else the backbone takes (SDXL's ``y``), passed to both calls."""
    b = x.shape[0]
    t_now = torch.full((b,), t, device=x.device)
    t_anchor = torch.full((b,), t + 50, device=x.device)
    sync = torch.cuda.synchronize if x.is_cuda else None  # CUDA calls return before the work is done
    z = unet(x, t_anchor, context=context, **backbone_kwargs)
    dash_t, dot_t = interleaved_times(
        lambda: unet(x, t_now, context=context, **backbone_kwargs),
        # sigmas only feed the Dot's step input; their values do not change its cost
        lambda: dot(unet, x, t_now, x, z, t_anchor, context=context, sigma=1.0, anchor_sigma=1.2, prev_z=z, prev_t=t_anchor + 50,
                    **backbone_kwargs),
        repeats, warmup=2, sync=sync)
    dash, dot_s = statistics.median(dash_t), statistics.median(dot_t)
    return {"dash_seconds": dash, "dot_seconds": dot_s, "N": dash / dot_s, "batch": b, "shape": list(x.shape[1:])}
