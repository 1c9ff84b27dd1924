import pytest

from morse_engine import EveryK, FrontLoaded, Pattern, ScheduleError, lsd_cost, plan_budget
from morse_engine.schedules import DashSchedule


def test_every_k_marks_every_kth_step_and_the_first():
    assert EveryK(3).resolve(10).pattern() == "D..D..D..D"
    assert EveryK(1).resolve(5).all_dash


def test_final_dash_forces_the_last_steps():
    assert EveryK(4, final_dash=2).resolve(10).pattern() == "D...D...DD"
    assert EveryK(4, final_dash=20).resolve(3).pattern() == "DDD"


def test_front_loaded_is_denser_early_than_late():
    s = FrontLoaded(0.4).resolve(20)
    assert s.dash[0]
    assert s.dash_steps == 8
    first_half, second_half = sum(s.dash[:10]), sum(s.dash[10:])
    assert first_half > second_half


def test_front_loaded_power_one_spreads_evenly():
    # 4 Dash steps (round(0.5 * 9)) at round(8 * j / 3) for j = 0..3
    assert FrontLoaded(0.5, power=1.0).resolve(9).pattern() == "D..D.D..D"


def test_pattern_repeats_and_is_cut_to_the_step_count():
    assert Pattern("D..").resolve(7).pattern() == "D..D..D"
    assert Pattern("D.D..").resolve(3).pattern() == "D.D"


def test_schedule_costs_in_lsd():
    s = Pattern("D...").resolve(8)
    assert (s.dash_steps, s.dot_steps) == (2, 6)
    assert s.lsd(4.0) == pytest.approx(2 + 6 / 4)
    assert lsd_cost(3, 4, 2.0) == pytest.approx(5.0)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: EveryK(0), ["k", ">= 1"]),
        (lambda: EveryK(2.5), ["k"]),
        (lambda: Pattern("D.x"), ["pattern", "'x'", "position 2"]),
        (lambda: Pattern("..."), ["no Dash step"]),
        (lambda: Pattern(".D"), ["start it with 'D'"]),
        (lambda: Pattern(""), ["non-empty"]),
        (lambda: EveryK(2).resolve(0), ["steps", ">= 1"]),
        (lambda: EveryK(2, final_dash=-1), ["final_dash"]),
        (lambda: FrontLoaded(0.0), ["dash_fraction"]),
        (lambda: plan_budget(0.5, 5.0, EveryK(2)), ["budget_lsd", "at least 1"]),
        (lambda: plan_budget(10, 0.0, EveryK(2)), ["N", "positive"]),
        (lambda: DashSchedule((False, True)), ["first step", "'D'"]),
    ],
)
def test_bad_input_names_the_input_and_the_fix(make, words):
    with pytest.raises(ScheduleError) as err:
        make()
    for word in words:
        assert word in str(err.value)


def test_budget_planner_takes_the_most_steps_that_fit():
    plan = plan_budget(10, 5.0, EveryK(2))
    # 16 steps: 8 Dash + 8 Dot = 8 + 8/5 = 9.6 LSD; 17 steps would cost 9 + 8/5 = 10.6
    assert plan.steps == 16
    assert plan.lsd == pytest.approx(9.6)
    assert plan.schedule.pattern() == "D." * 8
    assert EveryK(2).resolve(17).lsd(5.0) > 10


def test_budget_planner_with_all_dash_equals_plain_sampling():
    plan = plan_budget(7, 5.0, EveryK(1))
    assert plan.steps == 7 and plan.lsd == pytest.approx(7)


def test_budget_planner_minimum_budget_is_one_dash_step():
    plan = plan_budget(1, 3.0, Pattern("D.."))
    # 1 Dash costs 1; adding a Dot step would cost 1.33
    assert plan.steps == 1 and plan.lsd == pytest.approx(1.0)


def test_budget_schedule_uses_its_own_n_or_the_dots():
    from morse_engine import BudgetSchedule

    assert BudgetSchedule(EveryK(2), 10, n_speed=5.0).plan(measured_n=99.0).steps == 16
    assert BudgetSchedule(EveryK(2), 10).plan(measured_n=5.0).steps == 16
    with pytest.raises(ScheduleError, match="needs N"):
        BudgetSchedule(EveryK(2), 10).plan(measured_n=None)
    with pytest.raises(ScheduleError, match="budget_lsd"):
        BudgetSchedule(EveryK(2), 0.5)


def test_faster_diffusion_key_steps_are_the_papers_at_50_steps_and_scale_to_others():
    from morse_engine import KeySteps

    fifty = KeySteps().resolve(50)
    # the paper's t_key = {50, 49, 48, 47, 45, 40, 35, 25, 15} counted down from t = 50 at step 0
    assert [i for i, d in enumerate(fifty.dash) if d] == [50 - t for t in (50, 49, 48, 47, 45, 40, 35, 25, 15)]
    assert KeySteps().resolve(100).dash_steps == 9 and KeySteps().resolve(25).pattern().startswith("DDD..D")
    assert KeySteps(final_dash=2).resolve(50).dash[-2:] == (True, True)
    assert "Faster Diffusion" in KeySteps().describe()
    with pytest.raises(ScheduleError, match="key_steps must be step indices in"):
        KeySteps((0, 60))
