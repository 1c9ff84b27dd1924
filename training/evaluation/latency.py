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


@torch.no_grad()
def sampling_wall_clock(unet, blocks, cond, uncond, noise, steps: int = 50, cfg: float = 7.5, sync=None,
                        sequential: bool = False, progress=None) -> dict:
    """Wall seconds of whole Euler/DDIM runs with CFG: ``steps`` plain steps, and the same steps with Faster
    Diffusion (its key steps, encoder propagation, the spans decoded in one batched call each), one after the
    other in this process, on SD's noise schedule (scaled-linear betas 0.00085 to 0.012).
    ``sequential``: also the Faster Diffusion run with each step decoded on its own (what the batching buys)."""
    from morse_engine import KeySteps, MorseRouter
    from morse_engine.feature_fills import EncoderPropagationFiller
    from morse_engine.parameterization import DiscreteSchedule
    from ..reference.unet import sd_alphas_cumprod

    from .samplers import GuidedDenoiser, normal_sigmas, sample

    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    sigmas = normal_sigmas(ms, steps).to(noise.device)

    def counted(den):
        def model(x, sigma):
            if progress:
                progress.update(1)
            return den(x, sigma)
        return model

    def run(router):
        def go():
            if router is None:
                return sample("euler", counted(GuidedDenoiser(unet, ms, cond, uncond, cfg)), noise, sigmas, ms)
            with router.run(sigmas) as morse:
                return sample("euler", counted(GuidedDenoiser(unet, ms, cond, uncond, cfg, run=morse)), noise, sigmas, ms)
        return timed(go, sync)

    fills = {"faster_diffusion": EncoderPropagationFiller(blocks)}
    if sequential:
        fills["faster_diffusion_sequential"] = EncoderPropagationFiller(blocks, parallel=False)
    out = {"steps": steps, "schedule": KeySteps().resolve(steps).pattern(), "plain_s": run(None)}
    for name, fill in fills.items():
        router = MorseRouter(KeySteps(), fill, measure=False, sync=sync, timestep_of=ms.timestep)
        out[f"{name}_s"] = run(router)
        out[f"{name}_speedup"] = out["plain_s"] / out[f"{name}_s"]
        out[f"{name}_decoded_ahead"] = router.last_summary.decoded_ahead
    return out
