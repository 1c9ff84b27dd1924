"""The per-model calibrations two peers need before they run, done on the reference DiT as their authors do on
theirs, on a training split of the workload (noise the evaluated runs never see):

* TeaCache's polynomial: full runs, every consecutive pair of steps gives x = the relative L1 change of the first
  block's modulated input and y = that of the model's output; ``np.polyfit(x, y, 4)`` (the maintainers' answer in
  ali-vilab/TeaCache#2: all steps of all calibration prompts). Here per sample, over the cond and uncond entries.
* MagCache's magnitude ratios: one full run at its calibration step count (28 for Flux in the authors' scripts),
  the residual all blocks add at each step, image tokens only.
"""
from __future__ import annotations

import torch

from morse_engine.dit_fills import RESIDUAL
from morse_engine.peers.cached_blocks import relative_l1
from morse_engine.peers.magcache import magnitude_ratios
from morse_engine.peers.teacache import fit_coefficients, modulated_input

from .samplers import GuidedDenoiser, normal_sigmas, sample

CALIBRATION_SEED_OFFSET = 7000  # the calibration split's noise: disjoint from the runs' and the converged sets'
TEACACHE_STEPS, MAGCACHE_STEPS = 50, 28


class _Recording:
    """The DiT's model call, recording the first block's modulated input, the residual of all blocks and the
    output of every call (a fresh ``transformer_options`` each call, as ComfyUI gives one)."""

    def __init__(self, model, blocks):
        self.model, self.blocks = model, blocks
        self.signal = modulated_input(blocks.first_block)
        self.calls = []

    def __call__(self, x, t, context=None, **kwargs):
        kwargs = {**kwargs, "transformer_options": {}}
        with self.blocks.recording(kwargs, 0, self.blocks.n_blocks - 1) as rec, \
                self.blocks.watching_first(kwargs, self.signal) as seen:
            out = self.model(x, t, context=context, **kwargs)
        self.calls.append({"signal": seen["signal"], RESIDUAL: rec[RESIDUAL], "out": out})
        return out


@torch.no_grad()
def _record_run(work, blocks, steps: int, samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *work.noise.shape[1:]), generator=g).to(work.noise.device)
    rec = _Recording(work.unet, blocks)
    den = GuidedDenoiser(rec, work.ms, work.cond[:samples], work.uncond[:samples], work.cfg)
    sample("euler", den, noise, normal_sigmas(work.ms, steps), work.ms)
    return rec.calls


def calibrate_teacache(work, blocks, samples: int = 8, steps: int = TEACACHE_STEPS) -> dict:
    """TeaCache's polynomial for this model, fitted on ``samples`` full runs of ``steps`` euler steps."""
    calls = _record_run(work, blocks, steps, samples, work.seed + CALIBRATION_SEED_OFFSET)
    xs, ys = [], []
    batch = calls[0]["out"].shape[0]
    for prev, cur in zip(calls, calls[1:]):
        for j in range(batch):
            xs.append(relative_l1(cur["signal"][j], prev["signal"][j]))
            ys.append(relative_l1(cur["out"][j], prev["out"][j]))
    return {"coefficients": fit_coefficients(xs, ys, 4), "points": len(xs), "steps": steps, "samples": samples}


def calibrate_magcache(work, blocks, image_tokens: int, samples: int = 1, steps: int = MAGCACHE_STEPS) -> dict:
    """MagCache's magnitude ratios for this model, from one full run of ``steps`` euler steps (the authors use
    one prompt); ``image_tokens``: the last tokens of the residual, the image's."""
    calls = _record_run(work, blocks, steps, samples, work.seed + CALIBRATION_SEED_OFFSET + 1)
    ratios = magnitude_ratios([c[RESIDUAL][:, -image_tokens:] for c in calls])
    return {"ratios": ratios, "steps": steps, "samples": samples}
