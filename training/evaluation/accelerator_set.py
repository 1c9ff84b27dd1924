"""Every accelerator the table prices, on one reference model: the peers at their published defaults and at
enough other settings that their curves span the table's budgets, and Morse's fixed and adaptive schedules.

An :class:`Accelerator` is a row of the table: how to build ``(schedule, fill)`` for one setting, the settings
swept (the published default marked), the step counts each setting runs at, and where it hooks (the diffusion
model, as the router does, or the whole guided prediction, as LazyCache does). Which budget a run lands on is
measured, never planned: its LSD is counted from the calls it made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from morse_engine import AdaptiveDash, Pattern
from morse_engine.peers import deepcache, easycache, faster_diffusion, fbcache, lazycache, magcache, taylorseer, teacache
from morse_engine.peers.easycache import easycache as easycache_pair

PEER, MORSE = "peer", "morse"
MODEL, DENOISER = "model", "denoiser"


@dataclass
class Accelerator:
    name: str
    label: str
    family: str  # PEER or MORSE
    make: Callable  # setting -> (schedule spec, fill); for a DENOISER row: setting -> spec
    settings: list  # the settings swept
    steps: tuple  # step counts each setting runs at
    default: Optional[object] = None  # the published default setting (None: no single default)
    level: str = MODEL
    source: str = ""
    fill_name: str = ""  # the fill of a Morse row (its N is the fill's)
    extra: dict = field(default_factory=dict)


# step counts: the peers' and adaptive runs land on their budgets by their own decisions; the fixed patterns'
# runs at every step count the speedup knob looks its choices up at
PEER_STEPS = (8, 16, 24, 48)
FIXED_STEPS = (4, 6, 8, 12, 16, 24, 32, 48)
MORSE_PATTERNS = ("DD.", "D.", "D..", "D...")  # 1.5x, 2x, 3x, 4x for a free fill
ADAPTIVE_THRESHOLDS = (0.05, 0.15, 0.4, 1.0)
GATE_THRESHOLDS = (0.05, 0.1, 0.2, 0.5, 1.0)  # EasyCache's / LazyCache's reuse_threshold (default 0.2)


def thinned(rows: list, settings: int, peer_steps: tuple, fixed_steps: tuple) -> list:
    """The rows with at most ``settings`` settings each (the published default kept, then the extremes; a fixed
    Morse row keeps its patterns) and fewer step counts: the default run's grid, sized for 2 CPU cores; the full grid is the rows as built."""
    for row in rows:
        row.steps = fixed_steps if row.name.startswith("morse_fixed_") else peer_steps
        if row.name.startswith("morse_fixed_"):  # every pattern: the speedup knob offers each
            continue
        keep = [row.default] if row.default in row.settings else []
        for s in (row.settings[0], row.settings[-1], *row.settings):
            if len(keep) < settings and s not in keep:
                keep.append(s)
        row.settings = [s for s in row.settings if s in keep]
    return rows


def peer_rows(kind: str, blocks, calibration: dict) -> list[Accelerator]:
    """The peers that have a form for this model kind ("unet": an eps UNet; "dit": a Flux-layout flow DiT)."""
    rows = [
        Accelerator("easycache", "EasyCache (ComfyUI)", PEER, lambda t: easycache_pair(t), list(GATE_THRESHOLDS),
                    PEER_STEPS, 0.2, source=easycache.__name__),
        Accelerator("lazycache", "LazyCache (ComfyUI)", PEER, lambda t: lazycache.lazycache(t), list(GATE_THRESHOLDS),
                    PEER_STEPS, 0.2, level=DENOISER, source=lazycache.__name__),
    ]
    if kind == "dit":
        coefficients = calibration["teacache"]["coefficients"]
        rows += [
            Accelerator("teacache", "TeaCache", PEER, lambda t: teacache.teacache(blocks, t, coefficients),
                        [0.1, 0.25, 0.4, 0.8, 1.5], PEER_STEPS, 0.4, source=teacache.__name__,
                        extra={"coefficients": list(coefficients)}),
            Accelerator("fbcache", "First Block Cache (WaveSpeed)", PEER, lambda t: fbcache.fbcache(blocks, t),
                        [0.05, 0.12, 0.2, 0.35, 0.6], PEER_STEPS, fbcache.DIT_THRESHOLD, source=fbcache.__name__),
            Accelerator("magcache", "MagCache", PEER,
                        lambda t: magcache.magcache(blocks, calibration["magcache"]["ratios"], magcache_thresh=t),
                        [0.06, 0.12, 0.24, 0.5, 1.0], PEER_STEPS, magcache.DEFAULT_THRESHOLD, source=magcache.__name__,
                        extra={"ratios": list(calibration["magcache"]["ratios"])}),
            Accelerator("taylorseer1", "TaylorSeer, order 1", PEER,
                        lambda n: taylorseer.taylorseer(blocks, 1, fresh_threshold=n), [2, 3, 4, 6], PEER_STEPS,
                        taylorseer.DEFAULT_INTERVAL, source=taylorseer.__name__),
            Accelerator("taylorseer2", "TaylorSeer, order 2", PEER,
                        lambda n: taylorseer.taylorseer(blocks, 2, fresh_threshold=n), [2, 3, 4, 6], PEER_STEPS,
                        taylorseer.DEFAULT_INTERVAL, source=taylorseer.__name__),
        ]
    else:
        rows.append(Accelerator("fbcache", "First Block Cache (WaveSpeed, UNet form)", PEER,
                                lambda t: fbcache.fbcache(blocks, t), [0.05, 0.1, 0.2, 0.35, 0.6], PEER_STEPS,
                                fbcache.UNET_THRESHOLD, source=fbcache.__name__))
    rows += [
        Accelerator("deepcache", "DeepCache (the pack's inherit_k1)", PEER, lambda n: deepcache.deepcache(blocks, n),
                    [2, 3, 4, 5], PEER_STEPS, deepcache.DEFAULT_INTERVAL, source=deepcache.__name__),
        Accelerator("faster_diffusion", "Faster Diffusion (the pack's propagate)", PEER,
                    lambda k: faster_diffusion.faster_diffusion(blocks, None if k == "50ls" else k), ["50ls", 2, 3, 4],
                    PEER_STEPS, "50ls", source=faster_diffusion.__name__),
    ]
    return rows


def morse_rows(fills: dict, adaptive_spec: Callable[[float], AdaptiveDash]) -> list[Accelerator]:
    """Morse with each fill (``{name: filler}``): the fixed patterns, and adaptive Dash at several thresholds."""
    rows = []
    for name, filler in fills.items():
        rows.append(Accelerator(f"morse_fixed_{name}", f"Morse, {name}, fixed pattern", MORSE,
                                lambda p, f=filler: (Pattern(p), f), list(MORSE_PATTERNS), FIXED_STEPS,
                                fill_name=name))
        rows.append(Accelerator(f"morse_adaptive_{name}", f"Morse, {name}, adaptive Dash", MORSE,
                                lambda t, f=filler: (adaptive_spec(t), f), list(ADAPTIVE_THRESHOLDS), PEER_STEPS,
                                fill_name=name))
    return rows
