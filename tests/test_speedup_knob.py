"""The speedup knob (``morse_engine.speedup_knob``): what it picks from a measured table, what it spends, and how
it refuses."""
import pytest

from morse_engine import MorseError
from morse_engine.speedup_knob import CHOICES, TABLE_PATH, choose, load_table, model_kind


def _row(fill, pattern, steps, rmse, plain):
    return {"fill": fill, "pattern": pattern, "steps": steps, "rmse": rmse, "rmse_lo": rmse * 0.9,
            "rmse_hi": rmse * 1.1, "plain_rmse": plain}


TABLE = {"kinds": {"unet": {"euler": [
    _row("extrapolate", "DD.", 16, 0.050, 0.04), _row("reuse", "DD.", 16, 0.060, 0.04),
    _row("extrapolate", "D.", 16, 0.070, 0.04), _row("reuse", "D.", 16, 0.065, 0.04),
    _row("extrapolate", "D..", 16, 0.090, 0.04), _row("extrapolate", "D...", 16, 0.120, 0.04),
    _row("extrapolate", "D.", 48, 0.020, 0.015),
]}}}


def test_a_speedup_spends_at_most_its_share_and_takes_the_lowest_expected_error():
    c = choose("2x", 20, "unet", "euler", table=TABLE)
    assert (c.fill, c.pattern, c.lsd) == ("reuse", "D.", 10.0)  # 0.065 < extrapolate's 0.070 at 2x
    assert c.lsd <= 20 / 2 and c.expected["ratio"] == pytest.approx(0.065 / 0.04)
    c = choose("1.5x", 21, "unet", "euler", table=TABLE)
    assert (c.fill, c.pattern) == ("extrapolate", "DD.") and c.lsd == 14 and c.speedup == pytest.approx(1.5)
    # 25 steps of D.: 13 Dash steps, 0.52 of plain's LSD: within 5% of a half
    assert choose("2x", 25, "unet", "euler", table=TABLE).lsd == 13
    # the table's nearest step count on a log scale: 40 steps looks D. up at 48
    assert choose("2x", 40, "unet", "euler", table=TABLE).expected["at_steps"] == 48


def test_quality_first_and_the_dot():
    c = choose("quality first", 20, "unet", "euler", table=TABLE)
    assert (c.fill, c.pattern) == ("extrapolate", "DD.")
    c = choose("2x", 20, "unet", "euler", dot_n=8.0, table=TABLE)  # the loaded Dot is the fill; its N is paid
    assert c.fill == "dot" and c.pattern == "D.." and c.lsd == pytest.approx(7 + 13 / 8) and c.expected is None
    assert "measures no error" in c.describe()


def test_a_speedup_out_of_reach_is_refused_with_the_most_it_can_give():
    with pytest.raises(MorseError, match=r"cannot give 4x with euler at 6 steps .* the most it can give there is "
                                         r"3.00x \(extrapolate, pattern D\.\.\.?\)"):
        choose("4x", 6, "unet", "euler", table=TABLE)
    with pytest.raises(MorseError, match="not one of"):
        choose("5x", 20, "unet", "euler", table=TABLE)
    with pytest.raises(MorseError, match="no measured table for a dit model"):
        choose("2x", 20, "dit", "euler", table=TABLE)
    assert choose("off", 20, "unet", "euler", table=TABLE) is None
    c = choose("2x", 20, "unet", "heun", table=TABLE)
    assert "no table for heun: euler's is used" in c.describe()


def test_model_kinds_and_the_shipped_table():
    assert model_kind(True, False) == "unet" and model_kind(False, True) == "dit"
    with pytest.raises(MorseError, match="neither"):
        model_kind(False, False)
    table = load_table(TABLE_PATH)
    assert set(table["kinds"]) == {"unet", "dit"} and set(table["kinds"]["unet"]) == {"euler", "dpmpp_2m"}
    for kind, samplers in table["kinds"].items():
        for sampler in samplers:
            for request in CHOICES[1:]:
                try:
                    c = choose(request, 24, kind, sampler)
                except MorseError as exc:
                    assert "the most it can give" in str(exc)
                    continue
                assert c.lsd <= 24 / c.speedup + 1e-9 and c.expected is not None
