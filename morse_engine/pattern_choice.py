"""How many fills per Dash an LSD budget should buy: the pattern ``"D" + "." * f`` chosen per budget.

One home for the choice: the budget planner (:class:`AutoPattern` in a ``BudgetSchedule``), the
nodes and the evaluation all call :func:`choose_pattern`. It takes, in this order,

1. a **measured table** ``{sampler: [(budget, pattern), ...]}`` (a Dot file can carry one, written
   from an evaluation report), at the nearest measured budget on a log scale, ties to the pattern
   with fewer fills;
2. else **the rule** (:func:`rule_fills`), derived from the published evaluation.

The rule, and why. On the reference model (``reports/evaluation.json``: 1000 samples, budgets
4-50 LSD, patterns ``D.``/``D..``/``D...``, fills Dot N 9.7, ablation Dot N 10.5, reuse, extrapolate)
more fills per Dash pay while the run has few steps, where the sampler's own step error dominates,
and stop paying once it has enough, where each fill's own error dominates. So the rule takes
**the fewest fills per Dash whose planned run has at least** :data:`TARGET_STEPS` **(14) steps**,
and the most allowed fills when none reaches it. 14 is its one parameter, the best of 8-24 against the
measured tables of the deterministic samplers (euler, dpmpp_2m; 4 fills x 7 budgets; each table as
``python -m training.pattern_table`` derives it: FD to the Dash's distribution where it separates the
runs from converged, which on that run is only at 4 LSD, else trajectory RMSE): the rule's pattern is
the measured best at 37 of 56 budgets and inside the best's 90% interval at 54 of 56 (mean excess error
4.3%; 12 steps: 34 and 51; 16 steps: 30 and 47; always ``D.``: 31 and 48, excess 15.7%). For the Dot (N
about 10) that is ``D...`` up to 5 LSD, ``D..`` at 6-7, ``D.`` from 8 on; for a free fill planned at
N = 1e12 (the evaluation) ``D...`` up to 4, ``D..`` at 5-6, ``D.`` from 7 on. Where it disagrees with the measurements:

* the Dot at 30 LSD (euler and dpmpp_2m): ``D..`` beats ``D.`` (RMSE 0.022 against 0.028-0.029) because that
  run has 73 = 24 x 3 + 1 steps and so ends on a Dash step, which the rule does not model
  (``final_dash`` does that explicitly);
* extrapolation on euler keeps gaining from ``D...`` up to 12 LSD (the rule says ``D.`` from 7 on),
  each time inside the overlapping intervals but always the same way: a fill that good wants more fills
  than the rule gives;
* the rule never picks plain sampling (``f = 0``) for a fill faster than Dash, though plain sampling
  matched or beat every fill on dpmpp_2m at equal trajectory RMSE: the user asked for fills.

**Stochastic samplers** (ancestral, SDE and the like) get one fill per Dash: on euler_ancestral ``D.``
was best at every budget for every fill, and ``D..``/``D...`` far worse at low budgets (FD 621 against
6055/19167 for the Dot at 6 LSD). That one sampler is the evidence; the others that add fresh noise
every step are assumed to behave alike. A fill no faster than Dash (N <= 1) buys no steps: ``D``.

The rule is calibrated on one small model with the normal scheduler; a Dot's measured table, where
it has one, is the better guide for that Dot (``python -m training.pattern_table``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import ScheduleError
from .schedules import DASH_CHAR, DOT_CHAR, Pattern, ScheduleSpec, _check_n, plan_budget

MAX_FILLS = 3  # the evaluation measured up to D...; more is extrapolation
TARGET_STEPS = 14  # the rule's one parameter (module docstring)
# ComfyUI's samplers that draw fresh noise every step, besides the names containing "ancestral" or "sde"
STOCHASTIC_SAMPLERS = frozenset({"ddpm", "lcm", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"})


def is_stochastic_sampler(name: Optional[str]) -> bool:
    """Whether a sampler (by its ComfyUI name) adds fresh noise on every step."""
    if not name:
        return False
    name = name.lower()
    return "ancestral" in name or "sde" in name or name in STOCHASTIC_SAMPLERS


@dataclass(frozen=True)
class PatternChoice:
    """The chosen pattern ``"D" + "." * fills`` and why: ``source`` is "measured" or "rule"."""

    fills: int
    source: str
    reason: str

    @property
    def pattern(self) -> str:
        return DASH_CHAR + DOT_CHAR * self.fills

    def describe(self) -> str:
        return f"{self.pattern} ({self.source}: {self.reason})"


def fills_of(pattern, where: str = "pattern") -> int:
    """f for a pattern ``"D" + "." * f``; ScheduleError naming ``where`` for anything else."""
    if not isinstance(pattern, str) or not pattern.startswith(DASH_CHAR) or set(pattern[1:]) - {DOT_CHAR}:
        raise ScheduleError(f"{where} is {pattern!r}; write one Dash and its fills, 'D' followed by dots only, e.g. 'D..'")
    return len(pattern) - 1


def _check_max_fills(max_fills) -> int:
    if isinstance(max_fills, bool) or not isinstance(max_fills, int) or max_fills < 0:
        raise ScheduleError(f"max_fills must be a whole number >= 0 (got {max_fills!r}); {MAX_FILLS} is the default")
    return max_fills


def rule_fills(budget_lsd: float, n_speed: float, sampler: Optional[str] = None, max_fills: int = MAX_FILLS,
               final_dash: int = 0, target_steps: int = TARGET_STEPS) -> PatternChoice:
    """The rule of the module docstring: the fewest fills per Dash whose planned run at ``budget_lsd`` has
    ``target_steps`` steps (one fill for a stochastic sampler, none for N <= 1), at most ``max_fills``."""
    _check_max_fills(max_fills)
    n_speed = _check_n(n_speed)
    if max_fills == 0:
        return PatternChoice(0, "rule", "no fills allowed")
    if n_speed <= 1:
        return PatternChoice(0, "rule", f"a fill with N {n_speed:g} is no faster than Dash")
    if is_stochastic_sampler(sampler):
        return PatternChoice(1, "rule", f"one fill per Dash for the stochastic sampler {sampler}")
    for fills in range(1, max_fills + 1):
        steps = plan_budget(budget_lsd, n_speed, Pattern(DASH_CHAR + DOT_CHAR * fills, final_dash=final_dash)).steps
        if steps >= target_steps:
            return PatternChoice(fills, "rule", f"fewest fills per Dash for at least {target_steps} steps ({steps} planned)")
    return PatternChoice(max_fills, "rule", f"no pattern up to {max_fills} fills per Dash reaches {target_steps} steps")


def check_pattern_table(table) -> dict:
    """A measured table ``{sampler: [[budget, pattern], ...]}`` as ``{sampler: ((budget, pattern), ...)}`` sorted by
    budget; ScheduleError saying what is wrong for anything else."""
    if not isinstance(table, dict) or not table:
        raise ScheduleError(f"a pattern table maps sampler names to [budget, pattern] pairs (got {table!r}); "
                            "for example {'euler': [[4, 'D...'], [8, 'D.']]}")
    out = {}
    for sampler, rows in table.items():
        if not isinstance(sampler, str) or not sampler or not isinstance(rows, (list, tuple)) or not rows:
            raise ScheduleError(f"the pattern table's entry {sampler!r} must be a sampler name with a non-empty list "
                                "of [budget, pattern] pairs")
        checked = []
        for row in rows:
            if not isinstance(row, (list, tuple)) or len(row) != 2:
                raise ScheduleError(f"the pattern table's row {row!r} for {sampler!r} is not a [budget, pattern] pair")
            budget, pattern = row
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 1:
                raise ScheduleError(f"the pattern table's budget {budget!r} for {sampler!r} must be a number of LSD >= 1")
            fills_of(pattern, f"the pattern table's pattern for {sampler!r} at {budget:g} LSD")
            checked.append((float(budget), pattern))
        budgets = [b for b, _ in checked]
        if len(set(budgets)) != len(budgets):
            raise ScheduleError(f"the pattern table lists a budget twice for {sampler!r}; keep one pattern per budget")
        out[sampler] = tuple(sorted(checked))
    return out


def measured_fills(table: dict, sampler: str, budget_lsd: float) -> Optional[tuple[int, float]]:
    """(fills, the measured budget used) from a checked table's nearest budget on a log scale, ties to fewer
    fills; None where the table has no row for ``sampler``."""
    rows = table.get(sampler)
    if not rows:
        return None
    budget, pattern = min(rows, key=lambda r: (round(abs(math.log(r[0] / budget_lsd)), 12), len(r[1])))
    return len(pattern) - 1, budget


def choose_pattern(budget_lsd: float, n_speed: float, sampler: Optional[str] = None, table: Optional[dict] = None,
                   max_fills: int = MAX_FILLS, final_dash: int = 0) -> PatternChoice:
    """How many fills per Dash for ``budget_lsd`` at fill speed ``n_speed``: the measured ``table``'s row for
    ``sampler`` at the nearest budget where it has one (at most ``max_fills``), else :func:`rule_fills`."""
    _check_max_fills(max_fills)
    if table and sampler:
        found = measured_fills(check_pattern_table(table), sampler, budget_lsd)
        if found is not None:
            fills, at = found
            capped = f", capped at {max_fills}" if fills > max_fills else ""
            return PatternChoice(min(fills, max_fills), "measured", f"best for {sampler} at {at:g} LSD{capped}")
    return rule_fills(budget_lsd, n_speed, sampler, max_fills, final_dash)


@dataclass(frozen=True)
class AutoPattern(ScheduleSpec):
    """The pattern ``"D" + "." * f`` with f chosen per LSD budget by :func:`choose_pattern`; only an LSD budget
    (``BudgetSchedule``) can resolve it, since the choice depends on the budget and N."""

    max_fills: int = MAX_FILLS

    def __post_init__(self):
        super().__post_init__()
        _check_max_fills(self.max_fills)

    def for_budget(self, budget_lsd, n_speed, sampler=None, table=None):
        choice = choose_pattern(budget_lsd, n_speed, sampler, table, self.max_fills, self.final_dash)
        return Pattern(choice.pattern, final_dash=self.final_dash), choice

    def _base(self, steps):
        raise ScheduleError("the 'auto' pattern is chosen per LSD budget; use it in an lsd_budget schedule, "
                            "or give an explicit pattern such as 'D.'")

    def describe(self):
        return f"auto pattern (up to {self.max_fills} fills per Dash)" + (
            f", last {self.final_dash} Dash" if self.final_dash else "")
