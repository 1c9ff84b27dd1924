"""One knob for users: ask for a speedup (1.5x, 2x, 3x, 4x) or "quality first", and the pack picks the fill and
the schedule from the measured table it ships (``knob_table.json``, written by ``python -m training.knob_table``
from the accelerators report), for the model's kind and the sampler.

The table holds, per model kind ("unet": SD-style eps / v UNets, measured on the reference UNet; "dit": flow
transformers, measured on the reference DiT) and sampler, each training-free fill on each fixed pattern at several
step counts with its trajectory RMSE (and 90% interval) and the plain sampler's at the same step count. A request
for S x at K steps:

1. takes every (fill, pattern) whose run of K steps spends at most K / S LSD (within 5%: a pattern's Dash steps on
   K steps are whole steps, and a free fill costs nothing, so the spend is known before the run);
2. picks the one whose measured RMSE, relative to plain sampling at the same step count, is lowest at the table's
   nearest step count (log scale);
3. refuses, in one sentence naming the most it can give, a speedup no pattern reaches at K steps.

"quality first" picks the choice the table expects closest to plain sampling, at any speedup above 1. A Dot the
user loads is used for the fill (the user chose it); the knob then picks its pattern, with the Dot's measured N in
the spend, and the table's expectation is the Dot's only where the Dot file measured one (it carries no error:
the log says so). Fixed patterns only: an adaptive schedule's spend is known only after the run.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .errors import MorseError
from .schedules import Pattern

TABLE_PATH = Path(__file__).with_name("knob_table.json")
OFF, QUALITY_FIRST = "off", "quality first"
SPEEDUPS = {"1.5x": 1.5, "2x": 2.0, "3x": 3.0, "4x": 4.0}
CHOICES = (OFF, QUALITY_FIRST, *SPEEDUPS)
SLACK = 1.05  # "at most 1/S of plain's LSD, within 5%"


@dataclass(frozen=True)
class KnobChoice:
    fill: str
    pattern: str
    steps: int
    lsd: float  # what the run will spend (Dash steps + fill steps / N)
    expected: Optional[dict]  # {"ratio", "lo", "hi", "rmse", "rmse_lo", "rmse_hi", "at_steps", "table"}
    request: str
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.steps / self.lsd

    def describe(self) -> str:
        head = (f"{self.request}: {self.fill} on pattern {self.pattern}, {self.lsd:.2f} LSD of {self.steps} steps "
                f"({self.speedup:.2f}x)")
        if self.expected is None:
            return head + "; the table expects no error for it" + (f" ({self.note})" if self.note else "")
        e = self.expected
        return (head + f"; the table ({e['table']}, {e['at_steps']} steps) expects trajectory RMSE {e['ratio']:.2f}x "
                f"[{e['lo']:.2f}, {e['hi']:.2f}] that of plain sampling" + (f"; {self.note}" if self.note else ""))


@lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MorseError(f"the speedup table {path} is missing; reinstall the pack or write it with "
                         "`python -m training.knob_table reports/accelerators.json`") from None


def sampler_table(table: dict, kind: str, sampler: str) -> tuple[str, list, str]:
    """(the table's name, its rows, a note) for a model kind and sampler; a sampler the table did not measure gets
    euler's, and the note says so."""
    kinds = table["kinds"]
    if kind not in kinds:
        raise MorseError(f"the speedup knob has no measured table for a {kind} model (it has {', '.join(kinds)}); "
                         "pick a schedule and fill yourself")
    samplers = kinds[kind]
    used = sampler if sampler in samplers else "euler"
    note = "" if used == sampler else f"no table for {sampler}: euler's is used"
    return f"{kind}/{used}", samplers[used], note


def _nearest(rows: list, fill: str, pattern: str, steps: int) -> Optional[dict]:
    cands = [r for r in rows if r["fill"] == fill and r["pattern"] == pattern]
    return min(cands, key=lambda r: abs(math.log(r["steps"] / steps))) if cands else None


def _spend(pattern: str, steps: int, n: Optional[float]) -> float:
    flags = Pattern(pattern).resolve(steps).dash
    dash = sum(flags)
    return dash + (0.0 if not n else (steps - dash) / n)


def choose(request: str, steps: int, kind: str, sampler: str, dot_n: Optional[float] = None,
           table: Optional[dict] = None) -> Optional[KnobChoice]:
    """The knob's choice for ``request`` (one of :data:`CHOICES`) at ``steps`` steps; None for "off". ``dot_n``:
    the loaded Dot's measured N (the Dot is then the fill)."""
    if request == OFF:
        return None
    if request != QUALITY_FIRST and request not in SPEEDUPS:
        raise MorseError(f"speedup {request!r} is not one of {', '.join(CHOICES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MorseError(f"steps must be a whole number >= 1 (got {steps!r})")
    name, rows, note = sampler_table(table or load_table(), kind, sampler)
    fills = ["dot"] if dot_n else sorted({r["fill"] for r in rows})
    patterns = sorted({r["pattern"] for r in rows}, key=len)
    options = []
    for fill in fills:
        for pattern in patterns:
            lsd = _spend(pattern, steps, dot_n if fill == "dot" else None)
            if lsd >= steps:
                continue
            row = None if fill == "dot" else _nearest(rows, fill, pattern, steps)
            if fill != "dot" and row is None:  # a training-free fill is offered only where the table measured it
                continue
            expected = None if row is None else {
                "ratio": row["rmse"] / row["plain_rmse"], "lo": row["rmse_lo"] / row["plain_rmse"],
                "hi": row["rmse_hi"] / row["plain_rmse"], "rmse": row["rmse"], "rmse_lo": row["rmse_lo"],
                "rmse_hi": row["rmse_hi"], "at_steps": row["steps"], "table": name}
            options.append((fill, pattern, lsd, expected))
    dot_note = "a Dot's own file measures no error" if dot_n else ""
    note = "; ".join(n for n in (note, dot_note) if n)

    def quality(option):  # the expected error, then the larger spend (fewer fills per Dash) for the Dot
        return option[3]["ratio"] if option[3] else -option[2]

    if request == QUALITY_FIRST:
        if not options:
            raise MorseError(f"at {steps} steps no pattern is faster than plain sampling; ask for more steps")
        fill, pattern, lsd, expected = min(options, key=quality)
        return KnobChoice(fill, pattern, steps, lsd, expected, request, note)
    target = SPEEDUPS[request]
    within = [o for o in options if o[2] <= steps / target * SLACK]
    if not within:
        fastest = min(options, key=lambda o: o[2]) if options else None
        most = f"{steps / fastest[2]:.2f}x ({fastest[0]}, pattern {fastest[1]})" if fastest else "1x (plain sampling)"
        raise MorseError(f"Morse cannot give {request} with {sampler} at {steps} steps on a {kind} model; the most it "
                         f"can give there is {most}")
    fill, pattern, lsd, expected = min(within, key=quality)
    return KnobChoice(fill, pattern, steps, lsd, expected, request, note)


def model_kind(has_unet_blocks: bool, flow: bool) -> str:
    """The table a model is looked up in: a UNet's (SD1.x / SD2.x / SDXL) or a flow transformer's."""
    if has_unet_blocks and not flow:
        return "unet"
    if flow:
        return "dit"
    raise MorseError("the speedup knob has measured tables for SD-style UNets and flow transformers only; this model "
                     "is neither: pick a schedule and fill yourself")
