"""Which sampling steps run Dash and which run the Dot.

A *schedule spec* is independent of the step count (the user picks steps in the sampler),
and resolves to a :class:`DashSchedule`, one flag per step, when a run starts. That keeps a
schedule valid for any step count and any sigma schedule.

The first step is always Dash: the Dot fills a step with a residual on top of the latest
Dash estimate, and before the first step there is none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from .errors import ScheduleError

DASH_CHAR = "D"
DOT_CHAR = "."


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ScheduleError(f"steps must be a whole number >= 1 (got {steps!r}); ask for at least one sampling step")
    return steps


# The N a training-free fill (reuse, extrapolate: arithmetic, ~0 LSD) is planned with. 1e12 rather than 1e9
# because plan_budget's 1e-9 LSD tolerance would let 1e9 lose a Dash step (budget 4 -> 3 Dash + 3 fills).
FREE_FILL_N = 1e12


def lsd_cost(dash_steps: int, dot_steps: int, n_speed: float) -> float:
    """Latency of a run in LSD (latency of one Dash step): k Dash steps + j Dot steps cost k + j/N."""
    _check_n(n_speed)
    return dash_steps + dot_steps / n_speed


def _check_n(n_speed: float) -> float:
    if not isinstance(n_speed, (int, float)) or not math.isfinite(n_speed) or n_speed <= 0:
        raise ScheduleError(
            f"N (how many times faster the Dot is than Dash) must be a positive number (got {n_speed!r}); "
            "use the N measured for your Dot, for example from its adapter file"
        )
    return float(n_speed)


@dataclass(frozen=True)
class DashSchedule:
    """A resolved schedule: ``dash[i]`` is True where step i runs Dash."""

    dash: tuple[bool, ...]

    def __post_init__(self):
        if len(self.dash) == 0:
            raise ScheduleError("a schedule needs at least one step; ask for steps >= 1")
        if not self.dash[0]:
            raise ScheduleError(
                "the first step of a schedule must be Dash (there is no Dash estimate before it "
                "for the Dot to build on); start the pattern with 'D'"
            )

    @property
    def steps(self) -> int:
        return len(self.dash)

    @property
    def dash_steps(self) -> int:
        return sum(self.dash)

    @property
    def dot_steps(self) -> int:
        return self.steps - self.dash_steps

    def is_dash(self, step: int) -> bool:
        return self.dash[min(max(step, 0), self.steps - 1)]

    @property
    def all_dash(self) -> bool:
        return self.dash_steps == self.steps

    def pattern(self) -> str:
        return "".join(DASH_CHAR if d else DOT_CHAR for d in self.dash)

    def lsd(self, n_speed: float) -> float:
        return lsd_cost(self.dash_steps, self.dot_steps, n_speed)

    def __str__(self) -> str:
        return f"{self.pattern()} ({self.dash_steps} Dash + {self.dot_steps} Dot)"


@dataclass(frozen=True)
class ScheduleSpec:
    """Base of the step-count independent schedule kinds.

    ``final_dash`` forces the last n steps to Dash: the final steps set fine detail, and a
    user who wants them exact can keep them on the full model.
    """

    final_dash: int = field(default=0, kw_only=True)

    def __post_init__(self):
        if isinstance(self.final_dash, bool) or not isinstance(self.final_dash, int) or self.final_dash < 0:
            raise ScheduleError(
                f"final_dash (the last n steps always Dash) must be a whole number >= 0 (got {self.final_dash!r}); "
                "use 0 to leave the last steps to the schedule"
            )

    def _base(self, steps: int) -> list[bool]:
        raise NotImplementedError

    def for_budget(self, budget_lsd: float, n_speed: float, sampler=None, table=None):
        """(the spec an LSD budget plans with, why it was chosen or None). A spec is the user's own choice; a spec
        that chooses per budget (``pattern_choice.AutoPattern``) returns the pattern it chose."""
        return self, None

    def resolve(self, steps: int) -> DashSchedule:
        _check_steps(steps)
        flags = self._base(steps)
        flags[0] = True
        for i in range(max(0, steps - self.final_dash), steps):
            flags[i] = True
        return DashSchedule(tuple(flags))

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class EveryK(ScheduleSpec):
    """Dash on steps 0, k, 2k, ...; k=1 is plain sampling (every step Dash)."""

    k: int = 2

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ScheduleError(
                f"k (Dash on every k-th step) must be a whole number >= 1 (got {self.k!r}); use k=1 for Dash on every step"
            )

    def _base(self, steps):
        return [i % self.k == 0 for i in range(steps)]

    def describe(self):
        return f"every {self.k}" + (f", last {self.final_dash} Dash" if self.final_dash else "")


@dataclass(frozen=True)
class FrontLoaded(ScheduleSpec):
    """Dense Dash steps early, sparse late, as Faster Diffusion places its key steps.

    ``dash_fraction`` of the steps run Dash, at positions ``round((steps-1) * u**power)`` for
    u evenly spaced in [0, 1]; power > 1 crowds them towards the start, where the sample
    changes fastest.
    """

    dash_fraction: float = 0.5
    power: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.dash_fraction, (int, float)) or not 0 < self.dash_fraction <= 1:
            raise ScheduleError(
                f"dash_fraction must be in (0, 1] (got {self.dash_fraction!r}); 0.5 puts Dash on half of the steps"
            )
        if not isinstance(self.power, (int, float)) or not math.isfinite(self.power) or self.power < 1:
            raise ScheduleError(
                f"power must be a number >= 1 (got {self.power!r}); 1 spaces Dash steps evenly, 2 crowds them early"
            )

    def _base(self, steps):
        count = max(1, min(steps, round(self.dash_fraction * steps)))
        flags = [False] * steps
        for j in range(count):
            u = j / (count - 1) if count > 1 else 0.0
            i = round((steps - 1) * u**self.power)
            while flags[i]:  # collisions near the start move to the next free step
                i += 1
            flags[i] = True
        return flags

    def describe(self):
        tail = f", last {self.final_dash} Dash" if self.final_dash else ""
        return f"front-loaded {self.dash_fraction:g} Dash (power {self.power:g}){tail}"


#: Faster Diffusion's key steps for SD with 50 DDIM steps (t = 50, 49, 48, 47, 45, 40, 35, 25, 15 counted down
#: from 50, i.e. step indices 0, 1, 2, 3, 5, 10, 15, 25, 35): dense early, where the encoder features change most.
FASTER_DIFFUSION_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)
FASTER_DIFFUSION_STEPS = 50


@dataclass(frozen=True)
class KeySteps(ScheduleSpec):
    """Dash on fixed key steps given for ``reference_steps`` steps (by default Faster Diffusion's non-uniform
    schedule for 50 steps); another step count places them at the same fractions of the run,
    ``round(i * steps / reference_steps)``. Faster Diffusion's uniform schedule is :class:`EveryK`."""

    key_steps: tuple = FASTER_DIFFUSION_KEY_STEPS
    reference_steps: int = FASTER_DIFFUSION_STEPS

    def __post_init__(self):
        super().__post_init__()
        ref = self.reference_steps
        if isinstance(ref, bool) or not isinstance(ref, int) or ref < 1:
            raise ScheduleError(f"reference_steps must be a whole number >= 1 (got {ref!r}); Faster Diffusion's is 50")
        keys = tuple(self.key_steps)
        if not keys or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < ref for i in keys):
            raise ScheduleError(f"key_steps must be step indices in [0, {ref}) (got {self.key_steps!r}); "
                                f"for example {FASTER_DIFFUSION_KEY_STEPS}")

    def _base(self, steps):
        flags = [False] * steps
        for i in self.key_steps:
            flags[min(steps - 1, round(i * steps / self.reference_steps))] = True
        return flags

    def describe(self):
        name = ("Faster Diffusion key steps" if tuple(self.key_steps) == FASTER_DIFFUSION_KEY_STEPS and
                self.reference_steps == FASTER_DIFFUSION_STEPS else f"key steps {list(self.key_steps)} of {self.reference_steps}")
        return name + (f", last {self.final_dash} Dash" if self.final_dash else "")


@dataclass(frozen=True)
class Pattern(ScheduleSpec):
    """An explicit pattern such as ``D..D.D...``: 'D' is Dash, '.' is Dot.

    A pattern shorter than the run repeats; a longer one is cut to the step count.
    """

    pattern: str = "D."

    def __post_init__(self):
        super().__post_init__()
        p = self.pattern
        if not isinstance(p, str) or not p:
            raise ScheduleError(
                f"pattern must be a non-empty string of 'D' (Dash) and '.' (Dot) (got {p!r}); for example 'D.D..'"
            )
        for pos, ch in enumerate(p):
            if ch not in (DASH_CHAR, DOT_CHAR):
                raise ScheduleError(
                    f"pattern {p!r} has {ch!r} at position {pos}; write Dash steps as 'D' and Dot steps as '.' only"
                )
        if DASH_CHAR not in p:
            raise ScheduleError(f"pattern {p!r} has no Dash step; put at least one 'D' in it, starting with 'D'")
        if p[0] != DASH_CHAR:
            raise ScheduleError(
                f"pattern {p!r} starts with a Dot step; start it with 'D' (the first step is always Dash)"
            )

    def _base(self, steps):
        p = self.pattern
        return [p[i % len(p)] == DASH_CHAR for i in range(steps)]

    def describe(self):
        return f"pattern {self.pattern}" + (f", last {self.final_dash} Dash" if self.final_dash else "")


@dataclass(frozen=True)
class BudgetPlan:
    """What the budget planner chose: the step count, the schedule and what it costs; ``spec`` is the spec it
    planned with, ``choice`` why its pattern was chosen where the planner chose it (a ``PatternChoice``)."""

    steps: int
    schedule: DashSchedule
    lsd: float
    budget_lsd: float
    n_speed: float
    spec: Optional[ScheduleSpec] = None
    choice: Optional[object] = None


def plan_budget(budget_lsd: float, n_speed: float, spec: ScheduleSpec, max_steps: int = 1000) -> BudgetPlan:
    """The most sampling steps whose schedule under ``spec`` fits in ``budget_lsd``.

    Cost is k + j/N for k Dash and j Dot steps; more steps buy more Dot steps at 1/N each,
    so the planner takes the largest step count that stays within the budget.
    """
    n_speed = _check_n(n_speed)
    if not isinstance(budget_lsd, (int, float)) or not math.isfinite(budget_lsd) or budget_lsd < 1:
        raise ScheduleError(
            f"budget_lsd={budget_lsd!r} is below the cost of one Dash step (1 LSD); raise budget_lsd to at least 1"
        )
    best = None
    for steps in range(1, max_steps + 1):
        schedule = spec.resolve(steps)
        cost = schedule.lsd(n_speed)
        if cost <= budget_lsd + 1e-9:
            best = BudgetPlan(steps, schedule, cost, float(budget_lsd), n_speed, spec)
        elif schedule.dash_steps > budget_lsd:
            break  # Dash steps alone exceed the budget; more steps only cost more
    assert best is not None  # steps=1 costs exactly 1 LSD <= budget
    return best


@dataclass(frozen=True)
class BudgetSchedule:
    """A schedule spec plus an LSD budget: the planner, not the sampler, picks the step count.

    ``n_speed`` None means "use the N measured for the Dot in use".
    """

    spec: ScheduleSpec
    budget_lsd: float
    n_speed: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.budget_lsd, (int, float)) or not math.isfinite(self.budget_lsd) or self.budget_lsd < 1:
            raise ScheduleError(
                f"budget_lsd={self.budget_lsd!r} is below the cost of one Dash step (1 LSD); raise budget_lsd to at least 1"
            )
        if self.n_speed is not None:
            _check_n(self.n_speed)

    def _n(self, measured_n: Optional[float]) -> float:
        n = self.n_speed if self.n_speed is not None else measured_n
        if n is None:
            raise ScheduleError(
                "an LSD budget needs N (how many times faster the fill is than Dash): connect a Dot whose file "
                "records a measured N, or set N on the schedule (a fill that reruns UNet blocks has no N of its own: "
                "it depends on the model and resolution; measure it with python -m training.bench_latency --fills)"
            )
        return n

    def spec_for(self, measured_n: Optional[float], sampler: Optional[str] = None, table: Optional[dict] = None):
        """(the spec this budget runs, why or None): the spec itself, or the pattern an auto spec chose for the
        budget, N, the sampler and a measured table ``{sampler: [[budget, pattern], ...]}``."""
        return self.spec.for_budget(self.budget_lsd, self._n(measured_n), sampler, table)

    def plan(self, measured_n: Optional[float], sampler: Optional[str] = None, table: Optional[dict] = None) -> BudgetPlan:
        spec, choice = self.spec_for(measured_n, sampler, table)
        return replace(plan_budget(self.budget_lsd, self._n(measured_n), spec), choice=choice)

    def describe(self) -> str:
        n = f"N={self.n_speed:g}" if self.n_speed is not None else "the Dot's N"
        return f"budget {self.budget_lsd:g} LSD with {n}, {self.spec.describe()}"
