"""Measured latency of Dash and Dot calls, and N = t_dash / t_dot (never assumed)."""
from __future__ import annotations

import statistics
import time

import torch

from morse_engine.parameterization import scale_input
from morse_engine.solver_steps import euler_step

from .samplers import normal_sigmas


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


@torch.no_grad()
def measure_latency(unet, dot, work, repeats: int = 9, warmup: int = 2) -> dict:
    """Median seconds of a Dash call and a Dot call on the run's batch, interleaved; N = ratio.

    The Dot gets a real anchor: Dash's estimate one step earlier on a 10-step "normal"
    schedule, and the current input is the Euler step from it, as in a run.
    """
    sl = next(work.chunks())
    noise, cond, uncond = work.noise[sl], work.cond[sl], work.uncond[sl]
    copies = 1 if work.cfg == 1.0 else 2  # CFG runs cond and uncond in one batch (GuidedDenoiser)
    ctx = cond if copies == 1 else torch.cat([cond, uncond])
    sigmas = normal_sigmas(work.ms, 10)
    s_s, s_i = sigmas[3], sigmas[4]
    b = copies * noise.shape[0]
    x_s = torch.cat([noise] * copies) * s_s
    xin_s = scale_input(x_s, s_s)
    t_s = work.ms.timestep(s_s).reshape(1).expand(b)
    t_i = work.ms.timestep(s_i).reshape(1).expand(b)
    z_s = unet(xin_s, t_s, context=ctx)
    x_i = euler_step(x_s, z_s, s_s, s_i)  # with eps prediction, d = eps
    xin_i = scale_input(x_i, s_i)

    dash_call = lambda: unet(xin_i, t_i, context=ctx)  # noqa: E731
    dot_call = lambda: dot(unet, xin_i, t_i, xin_s, z_s, t_s, context=ctx, sigma=s_i, anchor_sigma=s_s)  # noqa: E731
    dash_t, dot_t = interleaved_times(dash_call, dot_call, repeats, warmup, work.sync)
    dash_med, dot_med = statistics.median(dash_t), statistics.median(dot_t)
    return {
        "N": dash_med / dot_med,
        "dash_seconds": dash_med,
        "dot_seconds": dot_med,
        # cross-checks against machine load changing during the measurement
        "N_median_of_pairs": statistics.median(a / b_ for a, b_ in zip(dash_t, dot_t)),
        "N_of_fastest": min(dash_t) / min(dot_t),
        "batch": b,
        "repeats": repeats,
        "warmup": warmup,
        "dash_all": dash_t,
        "dot_all": dot_t,
    }
