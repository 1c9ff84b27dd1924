import pytest

from morse_engine import average_speedup, speedup_curve
from morse_engine.speedup import baseline_lsd_for

BASELINE = [(5, 40.0), (10, 20.0), (20, 10.0), (50, 5.0)]


def test_baseline_lsd_is_linearly_interpolated():
    assert baseline_lsd_for(15.0, BASELINE) == (pytest.approx(15.0), None)
    assert baseline_lsd_for(30.0, BASELINE) == (pytest.approx(7.5), None)
    assert baseline_lsd_for(20.0, BASELINE) == (pytest.approx(10.0), None)


def test_speedup_is_baseline_lsd_over_morse_lsd():
    points = speedup_curve(BASELINE, [(5, 20.0), (10, 7.5)])
    assert [p.speedup for p in points] == [pytest.approx(2.0), pytest.approx(35 / 10)]
    assert average_speedup(points) == pytest.approx((2.0 + 3.5) / 2)


def test_points_beyond_the_baseline_are_flagged_as_bounds():
    better, worse = speedup_curve(BASELINE, [(10, 4.0), (4, 60.0)])
    assert better.bound == "lower" and better.speedup == pytest.approx(5.0)
    assert worse.bound == "upper" and worse.speedup == pytest.approx(5 / 4)


def test_a_non_monotone_baseline_uses_its_best_so_far():
    noisy = [(5, 40.0), (10, 20.0), (15, 22.0), (20, 10.0)]
    # at 15 LSD the plain sampler's best so far is still 20.0
    assert baseline_lsd_for(20.0, noisy)[0] == pytest.approx(10.0)


def test_empty_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="baseline curve is empty"):
        baseline_lsd_for(1.0, [])
    with pytest.raises(ValueError, match="no speedup points"):
        average_speedup([])
