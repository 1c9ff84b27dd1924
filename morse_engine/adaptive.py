"""Adaptive Dash: the router decides, step by step, whether a step runs Dash or the fill.

A fixed schedule (``schedules.py``) is decided before the run; this one is decided during it, from a signal that
costs nothing beyond what the run already has: EasyCache's (Zhou et al. 2025, "Less is Enough: Training-Free Video
Diffusion Acceleration via Runtime-Adaptive Caching"; ComfyUI's ``comfy_extras/nodes_easycache.py``). At each Dash
step the gate measures how much the model's output changed per unit of input change since the Dash step before
(k = |Δout| / |Δin|, mean absolute values); at each later step it predicts the output's relative change as
k |x - x_dash| / |out_dash| from the input alone, accumulates the predictions since the last Dash step and calls
Dash again once the sum reaches ``threshold``. Outside ``start``..``end`` (fractions of the model's noise range, as
EasyCache's start_percent / end_percent) every step runs Dash.

Whatever serves the other steps is the fill's business: EasyCache reuses the cached output-minus-input residual
(``peers.easycache``); Morse serves them with its own fills, the Dot included. The decision is made once a step,
at its first call, from the batch entry the run saw first (the first cond, as EasyCache keys it), so second-order
and SDE samplers are counted by step and cond / uncond calls of a step agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import ScheduleError
from .schedules import DASH_CHAR, DOT_CHAR, ScheduleSpec, _check_steps, lsd_cost

UNDECIDED_CHAR = "?"
#: Morse's own window for adaptive Dash (EasyCache's 0.15-0.95 is for its residual fill on 50-step video runs)
MORSE_WINDOW = {"start": 0.0, "end": 1.0}


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ScheduleError(f"{name} must be a fraction of the noise range in [0, 1] (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class AdaptiveDash(ScheduleSpec):
    """Dash wherever the predicted output change accumulated since the last Dash step reaches ``threshold``.

    ``start`` / ``end``: where in the noise range the gate works (0 = the top, 1 = the bottom; EasyCache's
    defaults 0.15 and 0.95); before ``start`` and after ``end`` every step is Dash. ``subsample``: the stride over
    the last two axes at which inputs and outputs are compared (ComfyUI's EasyCache: 8). ``max_fills``: at most
    this many fill steps in a row (None: no cap)."""

    adaptive = True  # the router resolves it with the model's percent_to_sigma and decides it as the run goes
    threshold: float = 0.2
    start: float = 0.15
    end: float = 0.95
    subsample: int = 1
    max_fills: Optional[int] = None
    track_before_start: bool = False  # keep the gate's state from the Dash steps before start (LazyCache does)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ScheduleError(f"threshold must be a number >= 0 (got {self.threshold!r}); 0 runs Dash on every "
                                "step, EasyCache's default is 0.2")
        if _fraction("start", self.start) > _fraction("end", self.end):
            raise ScheduleError(f"start ({self.start}) is after end ({self.end}); the gate works between them")
        if isinstance(self.subsample, bool) or not isinstance(self.subsample, int) or self.subsample < 1:
            raise ScheduleError(f"subsample must be a whole number >= 1 (got {self.subsample!r})")
        if self.max_fills is not None and (isinstance(self.max_fills, bool) or not isinstance(self.max_fills, int)
                                           or self.max_fills < 1):
            raise ScheduleError(f"max_fills must be None or a whole number >= 1 (got {self.max_fills!r})")

    def resolve(self, steps: int, percent_to_sigma: Optional[Callable[[float], float]] = None,
                sigmas=None) -> "AdaptiveSchedule":
        """The run's schedule, decided as it goes. ``percent_to_sigma``: the model's (ComfyUI's
        ``model_sampling.percent_to_sigma``); without it the window is placed on the run's own sigmas."""
        return AdaptiveSchedule(self, _check_steps(steps), percent_to_sigma, sigmas)

    def describe(self) -> str:
        cap = f", at most {self.max_fills} fills in a row" if self.max_fills else ""
        tail = f", last {self.final_dash} Dash" if self.final_dash else ""
        return f"adaptive (threshold {self.threshold:g}, between {self.start:g} and {self.end:g}{cap}){tail}"


class DecidedSchedule:
    """A run's schedule decided as it goes: the decisions so far and why each was made. The router asks
    :meth:`decided` / :meth:`is_dash`, has each step decided once at its first call (:meth:`decide`, from the gate
    entry's input) and reports every Dash call of the gate entry (:meth:`observe`). A schedule that ``probes``
    decides a step only once the fill has run on it: :meth:`decide` returns False (run the fill) or True (a step
    kept on Dash whatever the signal), and :meth:`confirm` gets the signal the fill computed on the way (TeaCache's
    modulated input, First Block Cache's first-block residual) and makes the decision."""

    adaptive = True
    all_dash = False
    probes = False

    def __init__(self, steps: int):
        self.steps = steps
        self.decisions: list[Optional[bool]] = [None] * steps
        self.reasons: list[str] = [""] * steps

    def _index(self, step: int) -> int:
        return min(max(step, 0), self.steps - 1)

    # -- what the router asks -------------------------------------------------------------------------------------

    def is_dash(self, step: int) -> bool:
        """The decision of ``step`` (an undecided step counts as Dash: nothing plans ahead on a guess)."""
        decided = self.decisions[self._index(step)]
        return True if decided is None else decided

    def decided(self, step: int) -> bool:
        return self.decisions[self._index(step)] is not None

    def decide(self, step: int, sigma: float, x: torch.Tensor) -> bool:
        """Dash (True) or the fill (False) for ``step``, decided at its first call from the gate entry's input."""
        step = self._index(step)
        if self.decisions[step] is None:
            self._set(step, *self._gate(step, sigma, x))
        return self.decisions[step]

    def confirm(self, step: int, sigma: float, signal: torch.Tensor) -> bool:
        """A probing schedule's decision of ``step`` from the fill's ``signal`` (the gate entry's); True: Dash."""
        raise NotImplementedError

    def force_dash(self, step: int, why: str) -> None:
        """``step`` ran Dash whatever was decided (the router had no usable anchor for the fill)."""
        self._set(self._index(step), True, why)

    def observe(self, x: torch.Tensor, out: torch.Tensor, whole_out: Optional[torch.Tensor] = None,
                features: Optional[dict] = None) -> None:
        """A Dash call of the gate entry: its input, output, the call's whole output and what the fill captured."""

    def _set(self, step: int, dash: bool, why: str) -> None:
        self.decisions[step], self.reasons[step] = dash, why

    def _gate(self, step: int, sigma: float, x: torch.Tensor) -> tuple[bool, str]:
        raise NotImplementedError

    # -- what the summary reads -------------------------------------------------------------------------------------

    @property
    def dash_steps(self) -> int:
        return sum(1 for d in self.decisions if d)

    @property
    def dot_steps(self) -> int:
        return sum(1 for d in self.decisions if d is False)

    def lsd(self, n_speed: float) -> float:
        return lsd_cost(self.dash_steps, self.dot_steps, n_speed)

    def pattern(self) -> str:
        return "".join(UNDECIDED_CHAR if d is None else DASH_CHAR if d else DOT_CHAR for d in self.decisions)

    def explain(self) -> str:
        """Which steps ran Dash and why, in runs of consecutive steps: "0 first step; 1-2 before start; 5 change
        0.213 >= 0.2; ..." (fill steps are the ones not named)."""
        parts, i = [], 0
        while i < self.steps:
            if not self.decisions[i]:
                i += 1
                continue
            j, kind = i, self.reasons[i].split(" ")[0]
            while j + 1 < self.steps and self.decisions[j + 1] and self.reasons[j + 1].split(" ")[0] == kind \
                    and kind not in MEASURED_REASONS:
                j += 1
            parts.append(f"{i}{'-' + str(j) if j > i else ''} {self.reasons[i]}")
            i = j + 1
        return "; ".join(parts)

    def __str__(self) -> str:
        return f"{self.pattern()} ({self.dash_steps} Dash + {self.dot_steps} fill, adaptive)"


#: reasons that carry a measured figure: each such Dash step is named on its own in :meth:`DecidedSchedule.explain`
MEASURED_REASONS = ("change", "error")


class AdaptiveSchedule(DecidedSchedule):
    """One run's schedule under EasyCache's gate: the decisions so far, why each was made, and the gate's state."""

    def __init__(self, spec: AdaptiveDash, steps: int, percent_to_sigma=None, sigmas=None):
        super().__init__(steps)
        self.spec = spec
        if percent_to_sigma is not None:
            # in float32, as EasyCache compares them with the float32 sigmas (a step can sit exactly on an end)
            self.start_sigma, self.end_sigma = (float(torch.tensor(float(percent_to_sigma(p)), dtype=torch.float32))
                                                for p in (spec.start, spec.end))
        else:  # the run's own range: the fraction of the way from its first sigma to its last
            hi, lo = (float(sigmas[0]), float(sigmas[-1])) if sigmas is not None else (1.0, 0.0)
            self.start_sigma, self.end_sigma = hi + spec.start * (lo - hi), hi + spec.end * (lo - hi)
        self.x_prev = self.out_prev = self.out_norm = self.rate = None
        self.input_change: Optional[float] = None
        self.accumulated = 0.0
        self.fills_in_row = 0
        self.active = False  # the current step is inside the window (the gate keeps state only there)
        self.before = False  # the current step is before the window's start

    def _set(self, step: int, dash: bool, why: str) -> None:
        super()._set(step, dash, why)
        self.fills_in_row = 0 if dash else self.fills_in_row + 1

    def observe(self, x: torch.Tensor, out: torch.Tensor, whole_out: Optional[torch.Tensor] = None,
                features: Optional[dict] = None) -> None:
        """After a Dash call of the gate entry (``x``, ``out``; ``whole_out``: the call's whole output, whose mean
        size EasyCache divides by): the output's change per input change since the Dash call before. Only inside
        the window, as EasyCache keeps no state before its start or after its end."""
        if not (self.active or (self.before and self.spec.track_before_start)):
            return
        xs, os_ = self._sub(x), self._sub(out)
        if self.out_prev is not None and self.input_change is not None and os_.shape == self.out_prev.shape:
            output_change = (os_ - self.out_prev).flatten().abs().mean()
            self.rate = output_change / self.input_change
        self.x_prev, self.out_prev = xs, os_
        self.out_norm = (out if whole_out is None else whole_out).detach().flatten().abs().mean()
        self.input_change = None

    def _gate(self, step: int, sigma: float, x: torch.Tensor) -> tuple[bool, str]:
        spec = self.spec
        self.active = self.end_sigma < sigma <= self.start_sigma
        self.before = sigma > self.start_sigma
        self.input_change = None
        if sigma > self.start_sigma:
            return True, "before start"
        if sigma <= self.end_sigma:
            return True, "after end"
        if step == 0:
            return True, "first step"
        if step >= self.steps - spec.final_dash:
            return True, "final_dash"
        xs = self._sub(x) if self.x_prev is not None else None
        if xs is not None and xs.shape == self.x_prev.shape:
            self.input_change = (xs - self.x_prev).flatten().abs().mean()
        if self.input_change is None or self.rate is None or self.out_norm is None:
            return True, "no change rate yet"
        # EasyCache's arithmetic, in the tensors' own dtype (a bfloat16 model's signal rounds as the node's does)
        self.accumulated = self.accumulated + (self.rate * self.input_change) / self.out_norm
        if not bool(self.accumulated < spec.threshold):
            why = f"change {float(self.accumulated):.3f} >= {spec.threshold:g}"
            self.accumulated = 0.0
            return True, why
        if spec.max_fills is not None and self.fills_in_row >= spec.max_fills:
            self.accumulated = 0.0
            return True, f"{spec.max_fills} fills in a row"
        return False, f"change {float(self.accumulated):.3f} < {spec.threshold:g}"

    def _sub(self, t: torch.Tensor) -> torch.Tensor:
        s = self.spec.subsample
        t = t.detach()
        return (t[..., ::s, ::s] if s > 1 and t.dim() >= 3 else t).clone()


class ProbingSchedule(DecidedSchedule):
    """A schedule that decides each step from a signal the fill computes on its way (the first block's modulated
    input, its residual): :meth:`decide` keeps a step on Dash where :meth:`_forced` says so and otherwise lets the
    fill run; :meth:`confirm` judges the fill's signal (:meth:`_judge`); :meth:`observe` gets each Dash call's."""

    probes = True

    def __init__(self, steps: int):
        super().__init__(steps)
        self._confirmed = [False] * steps

    def confirmed(self, step: int) -> bool:
        return self._confirmed[self._index(step)]

    def _gate(self, step: int, sigma: float, x: torch.Tensor) -> tuple[bool, str]:
        why = self._forced(step, sigma)
        if why:
            self._confirmed[step] = True
            return True, why
        return False, "probing"

    def confirm(self, step: int, sigma: float, signal: torch.Tensor) -> bool:
        step = self._index(step)
        dash, why = self._judge(step, signal)
        self._confirmed[step] = True
        self._set(step, dash, why)
        return dash

    def force_dash(self, step: int, why: str) -> None:
        self._confirmed[self._index(step)] = True
        super().force_dash(step, why)

    def _forced(self, step: int, sigma: float) -> str:
        """Why ``step`` runs Dash whatever the signal ("" where the signal decides)."""
        return "first step" if step == 0 else ""

    def _judge(self, step: int, signal: torch.Tensor) -> tuple[bool, str]:
        raise NotImplementedError
