"""The fills an evaluation compares, with their cost: every fill the engine offers by name (training-free and
block fills, ``morse_engine.FILLS_WITHOUT_DOT``), the Dot, and the Table 4 ablation Dot. A fill the engine adds
joins the table without a change here.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

import torch

from morse_engine import FILLS_WITHOUT_DOT, MorseRouter, Pattern, make_fill
from morse_engine.fillers import Filler

from .samplers import GuidedDenoiser, normal_sigmas, sample

LABELS = {"dot": "Morse (Dash + Dot)", "ablation": "ablation: Dot without trajectory inputs",
          "reuse": "training-free: reuse", "extrapolate": "training-free: extrapolate",
          "inherit_k1": "feature inheritance, 1 block per side (A-SDM)", "inherit_k2": "feature inheritance, 2 blocks per side",
          "forecast_k1": "feature forecasting, 1 block per side", "forecast_k2": "feature forecasting, 2 blocks per side",
          "forecast2_k2": "second-order feature forecasting, 2 blocks per side",
          "propagate": "encoder propagation (Faster Diffusion)"}


@dataclass
class EvalFill:
    name: str
    filler: Filler
    n: Optional[float] = None  # measured speed ratio; None for a free fill
    latency: Optional[dict] = None
    pattern_table: Optional[dict] = None  # the Dot file's measured best patterns, for the pattern "auto"

    @property
    def free(self) -> bool:
        return self.filler.free

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)


DEFAULT_FILLS = ("dot", "ablation", "reuse", "extrapolate")


def collect_fills(models, names=None) -> list[EvalFill]:
    """The fills called ``names`` (default: the Dot, the ablation Dot where there is one, and the reuse and
    extrapolation fills) from every fill there is: the Dots and each fill the engine offers by name (those that
    rerun Dash's blocks on the reference UNet's, or on the reference DiT's through its block-replace patches)."""
    from morse_engine.block_replace import PatchedDiTBlocks, takes_block_patches
    from morse_engine.dit_fills import DIT_FILLS
    from morse_engine.fillers import TRAINING_FREE_FILLS

    from ..reference.blocks import ReferenceBlocks

    unet = models.unet
    dit = takes_block_patches(unet)
    blocks = PatchedDiTBlocks(unet) if dit else ReferenceBlocks(unet)
    fills = []
    if models.dot is not None:
        fills.append(EvalFill("dot", make_fill("dot", dot=models.dot, backbone=unet, blocks=blocks),
                              pattern_table=models.dot_info.pattern_table))
    if models.ablation is not None:
        fills.append(EvalFill("ablation", make_fill("dot", dot=models.ablation[0], backbone=unet, blocks=blocks),
                              pattern_table=models.ablation[1].pattern_table))
    offered = (*TRAINING_FREE_FILLS, *DIT_FILLS) if dit else FILLS_WITHOUT_DOT
    fills += [EvalFill(name, make_fill(name, blocks=blocks)) for name in offered]
    names = names or [n for n in DEFAULT_FILLS if n in {f.name for f in fills}]
    if names:
        unknown = set(names) - {f.name for f in fills}
        if unknown:
            raise ValueError(f"--fills: {sorted(unknown)} not available; choose from {[f.name for f in fills]}")
        fills = [f for f in fills if f.name in names]
    return fills


@torch.no_grad()
def measure_fill_n(work, filler: Filler, steps: int = 12, repeats: int = 3, warmup: int = 1) -> dict:
    """N of a fill that calls a network: the router's own timing of Dash calls and fill calls, which alternate
    in an Euler run with the pattern ``D.`` on the workload's first chunk (real anchors, the runs' batch)."""
    sl = next(work.chunks())
    return router_n(lambda run: GuidedDenoiser(work.unet, work.ms, work.cond[sl], work.uncond[sl], work.cfg, run=run),
                    work.noise[sl], work.ms, filler, work.sync, steps, repeats, warmup, cfg=work.cfg)


@torch.no_grad()
def router_n(denoiser_for, noise, ms, filler: Filler, sync=None, steps: int = 12, repeats: int = 3, warmup: int = 1,
             cfg: float = 2.0) -> dict:
    """The median over repeats of (mean Dash call) / (mean fill call), timed by the router in Euler runs with the
    pattern ``D.`` from ``noise``; ``denoiser_for(run)``: the guided model through that run."""
    sigmas = normal_sigmas(ms, steps)
    router = MorseRouter(Pattern("D."), filler, measure=True, sync=sync)
    ratios, dash_ms, fill_ms = [], [], []
    for i in range(warmup + repeats):
        with router.run(sigmas) as run:
            sample("euler", denoiser_for(run), noise, sigmas, ms)
        s = router.last_summary
        if i < warmup:
            continue
        dash, fill = s.dash_seconds / s.dash_calls, s.dot_seconds / s.dot_calls
        ratios.append(dash / fill)
        dash_ms.append(dash * 1e3)
        fill_ms.append(fill * 1e3)
    return {"N": statistics.median(ratios), "N_all": ratios, "dash_ms": statistics.median(dash_ms),
            "fill_ms": statistics.median(fill_ms), "batch": int(noise.shape[0]) * (1 if cfg == 1.0 else 2),
            "repeats": repeats, "how": "router timing inside euler runs with pattern D. (interleaved calls)"}
