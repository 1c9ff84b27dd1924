"""The budget planner's choice of fills per Dash: the rule, a measured table, and the auto spec."""
import math

import pytest

from morse_engine import (AutoPattern, BudgetSchedule, EveryK, Pattern, ScheduleError, check_pattern_table, choose_pattern,
                          is_stochastic_sampler, plan_budget, rule_fills)
from morse_engine.pattern_choice import MAX_FILLS, TARGET_STEPS

FREE = 1e12  # a training-free fill, as the evaluation plans it


def planned_steps(budget, n, fills):
    return plan_budget(budget, n, Pattern("D" + "." * fills)).steps


@pytest.mark.parametrize("n", [2.0, 4.0, 9.7, FREE])
@pytest.mark.parametrize("budget", [1, 3, 4, 6, 7, 8, 12, 20, 50])
def test_the_rule_takes_the_fewest_fills_that_reach_the_target_steps(budget, n):
    choice = rule_fills(budget, n)
    assert choice.source == "rule" and 1 <= choice.fills <= MAX_FILLS
    if planned_steps(budget, n, choice.fills) >= TARGET_STEPS:
        assert choice.fills == 1 or planned_steps(budget, n, choice.fills - 1) < TARGET_STEPS
    else:  # nothing reaches the target: as many fills as allowed
        assert choice.fills == MAX_FILLS
        assert all(planned_steps(budget, n, f) < TARGET_STEPS for f in range(1, MAX_FILLS + 1))


@pytest.mark.parametrize("n", [1.5, 3.0, 9.7, FREE])
def test_a_larger_budget_never_gets_more_fills_per_dash(n):
    fills = [choose_pattern(b, n).fills for b in range(1, 61)]
    assert fills == sorted(fills, reverse=True)
    assert fills[0] == MAX_FILLS and fills[-1] == 1  # the paper's "most latency on fills" at low budgets only


def test_low_budgets_fill_more_than_high_ones_for_a_dot_and_for_a_free_fill():
    for n in (9.7, FREE):
        assert choose_pattern(4, n).pattern == "D..."
        assert choose_pattern(50, n).pattern == "D."


def test_stochastic_samplers_get_one_fill_and_slow_fills_none():
    for name in ("euler_ancestral", "dpmpp_2m_sde_gpu", "ddpm", "res_multistep_ancestral_cfg_pp"):
        assert is_stochastic_sampler(name)
        assert choose_pattern(4, 9.7, name).pattern == "D."
    assert not is_stochastic_sampler("dpmpp_2m") and not is_stochastic_sampler(None)
    assert choose_pattern(4, 1.0).pattern == "D"  # a fill as slow as Dash buys no steps
    assert choose_pattern(4, 9.7, max_fills=0).pattern == "D"
    assert choose_pattern(4, 9.7, max_fills=2).pattern == "D.."


def test_a_measured_table_is_read_at_the_nearest_budget_on_a_log_scale():
    table = {"euler": [[4, "D..."], [16, "D."]], "dpmpp_2m": [[8, "D.."]]}
    assert choose_pattern(7, 9.7, "euler", table).pattern == "D..."  # 7/4 is nearer than 16/7
    assert choose_pattern(9, 9.7, "euler", table).pattern == "D."  # 16/9 is nearer than 9/4
    tie = choose_pattern(8, 9.7, "euler", table)  # 8/4 == 16/8: the simpler pattern
    assert tie.pattern == "D." and tie.source == "measured" and "16 LSD" in tie.reason
    assert choose_pattern(200, 9.7, "dpmpp_2m", table).pattern == "D.."  # beyond the table: its nearest row
    capped = choose_pattern(4, 9.7, "euler", table, max_fills=2)
    assert capped.pattern == "D.." and "capped" in capped.reason


def test_a_sampler_the_table_lacks_falls_back_to_the_rule():
    table = {"euler": [[4, "D."]]}
    for sampler in ("heun", None):
        choice = choose_pattern(4, 9.7, sampler, table)
        assert choice.source == "rule" and choice == choose_pattern(4, 9.7, sampler)
    assert "rule:" in choose_pattern(4, 9.7, "heun", table).describe()


@pytest.mark.parametrize("table, words", [
    ([["euler", 4]], ["maps sampler names"]),
    ({}, ["maps sampler names"]),
    ({"euler": []}, ["'euler'", "non-empty"]),
    ({"euler": [[4]]}, ["[budget, pattern] pair"]),
    ({"euler": [[0.5, "D."]]}, ["budget 0.5", ">= 1"]),
    ({"euler": [[math.inf, "D."]]}, ["budget inf"]),
    ({"euler": [[4, "D.D."]]}, ["'D.D.'", "'D' followed by dots only"]),
    ({"euler": [[4, "auto"]]}, ["'auto'"]),
    ({"euler": [[4, "D."], [4.0, "D.."]]}, ["budget twice"]),
])
def test_a_bad_table_is_refused_saying_what_is_wrong(table, words):
    with pytest.raises(ScheduleError) as err:
        check_pattern_table(table)
    for word in words:
        assert word in str(err.value)


def test_a_good_table_is_sorted_by_budget():
    assert check_pattern_table({"euler": [[8, "D."], [4, "D..."]]}) == {"euler": ((4.0, "D..."), (8.0, "D."))}


def test_an_auto_budget_plans_with_the_chosen_pattern_and_says_why():
    plan = BudgetSchedule(AutoPattern(), 6).plan(9.7)
    assert plan.choice == choose_pattern(6, 9.7)
    assert plan.spec == Pattern(plan.choice.pattern)
    assert plan.schedule.pattern().startswith(plan.choice.pattern + "D")
    same = plan_budget(6, 9.7, Pattern(plan.choice.pattern))
    assert (plan.steps, plan.schedule, plan.lsd) == (same.steps, same.schedule, same.lsd)
    measured = BudgetSchedule(AutoPattern(), 6).plan(9.7, "euler", {"euler": [[6, "D."]]})
    assert measured.choice.source == "measured" and measured.spec == Pattern("D.")
    assert "auto pattern" in BudgetSchedule(AutoPattern(), 6).describe()


def test_auto_keeps_final_dash_and_the_schedules_own_n():
    plan = BudgetSchedule(AutoPattern(final_dash=2), 10, n_speed=FREE).plan(measured_n=2.0)
    assert plan.n_speed == FREE and plan.schedule.dash[-2:] == (True, True)
    assert plan.spec == Pattern(plan.choice.pattern, final_dash=2)


def test_an_explicit_pattern_plans_exactly_as_before():
    for spec in (Pattern("D.."), EveryK(3), Pattern("D.D..", final_dash=1)):
        plan = BudgetSchedule(spec, 10).plan(5.0, "euler", {"euler": [[10, "D."]]})
        before = plan_budget(10, 5.0, spec)
        assert plan.choice is None and plan.spec is spec
        assert (plan.steps, plan.schedule, plan.lsd, plan.n_speed) == (before.steps, before.schedule, before.lsd, before.n_speed)


def test_auto_outside_a_budget_is_refused_with_the_fix():
    with pytest.raises(ScheduleError, match="lsd_budget"):
        AutoPattern().resolve(10)
    with pytest.raises(ScheduleError, match="max_fills"):
        AutoPattern(max_fills=-1)
    with pytest.raises(ScheduleError, match="needs N"):
        BudgetSchedule(AutoPattern(), 6).plan(None)
