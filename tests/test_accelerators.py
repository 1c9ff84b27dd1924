"""The accelerators table (``python -m training.accelerators``): its per-budget analysis on made-up runs, and the
tool end to end at its test size on the reference DiT."""
import json

import numpy as np
import pytest

from training import accelerators
from training.evaluation.frontier import accelerator_table, best_within, morse_against_peers


def _point(lsd, value, n=50, seed=0):
    rng = np.random.default_rng(seed)
    boot = value * (1 + 0.02 * rng.standard_normal(n))
    return {"value": value, "lo": float(np.percentile(boot, 5)), "hi": float(np.percentile(boot, 95)), "_boot": boot,
            "lsd": lsd}


def _run(name, lsd, value, setting=None, steps=8, seed=0):
    return {"name": name, "setting": setting, "steps": steps, "lsd": lsd, "rmse": _point(lsd, value, seed=seed)}


def test_each_budget_takes_the_best_run_within_it_and_prices_it_against_plain():
    plain = [_run("plain", s, 0.4 / s, seed=s) for s in (2, 4, 8, 16, 32)]  # RMSE halves as the steps double
    runs = {"fast": [_run("fast", 4, 0.05, "a", seed=1), _run("fast", 3.9, 0.2, "b", seed=2),
                     _run("fast", 8.1, 0.03, "c", seed=3)]}
    assert best_within(runs["fast"], 4, "rmse")["setting"] == "a"
    assert best_within(runs["fast"], 8, "rmse")["setting"] == "c"  # 8.1 is within 2% of 8
    table = accelerator_table(plain, runs, [0.0, 0.0], "rmse")["fast"]
    at4 = next(r for r in table["budgets"] if r["budget"] == 4)
    assert at4["speedup"] == pytest.approx(8 / 4) and at4["status"] == "separable"  # plain needs 8 LSD for 0.05
    assert table["average"]["speedup"] > 1


def test_morse_against_each_peer_says_where_it_is_behind_beyond_the_noise():
    runs = {"morse_fixed_x": [_run("morse_fixed_x", 4, 0.05, "D.", seed=1), _run("morse_fixed_x", 8, 0.04, "D.", seed=2)],
            "peer": [_run("peer", 4, 0.10, 0.2, seed=3), _run("peer", 8, 0.02, 0.1, seed=4)]}
    families = {"morse_fixed_x": "morse", "peer": "peer"}
    vs = morse_against_peers(runs, families, [0.0, 0.0], "rmse", best_peer="peer")
    by_budget = {r["budget"]: r for r in vs["budgets"]}
    assert by_budget[4]["morse_ahead_of_all"] and not by_budget[8]["morse_ahead_of_all"]
    assert vs["best_peer"] == "peer" and vs["over_best_peer"]


def test_the_tool_writes_its_table_on_the_reference_dit(tmp_path):
    assert accelerators.main(["--quick", "--models", "dit", "--out-dir", str(tmp_path), "--threads", "1"]) == 0
    report = json.loads((tmp_path / "accelerators.json").read_text())
    model = report["models"]["dit"]
    assert set(model["rows"]) >= {"easycache", "lazycache", "teacache", "fbcache", "magcache", "taylorseer1",
                                  "taylorseer2", "deepcache", "faster_diffusion", "morse_fixed_dot",
                                  "morse_adaptive_extrapolate"}
    assert len(model["calibration"]["teacache"]["coefficients"]) == 5 and model["calibration"]["magcache"]["ratios"][0] == 1
    rep = model["samplers"]["euler"]
    for name, runs in rep["runs"].items():
        assert runs and all(r["lsd"] > 0 and r["rmse"]["lo"] <= r["rmse"]["value"] <= r["rmse"]["hi"] for r in runs), name
    text = (tmp_path / "accelerators.md").read_text()
    assert "TeaCache" in text and "Best Morse configuration" in text and (tmp_path / "accelerators.png").stat().st_size
    with pytest.raises(SystemExit):
        accelerators.parser().parse_args(["--grid", "huge"])
    assert accelerators.main(["--models", "sd3", "--out-dir", str(tmp_path)]) == 2
