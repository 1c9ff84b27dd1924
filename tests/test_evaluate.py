"""The evaluation tool: report assembly on synthetic curves, and the quick run end to end.

The end-to-end test needs the committed reference Dash and classifier; when the trained
Dot files are absent it builds and saves untrained ones, so it never skips for want of them.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from training.evaluation import report as rep

PLAIN = [
    {"lsd": 4.0, "steps": 4, "fd": 40.0, "rmse": 0.4},
    {"lsd": 8.0, "steps": 8, "fd": 20.0, "rmse": 0.2},
    {"lsd": 16.0, "steps": 16, "fd": 10.0, "rmse": 0.1},
    {"lsd": 32.0, "steps": 32, "fd": 5.0, "rmse": 0.05},
]
MORSE = [
    {"budget": 4.0, "lsd": 4.5, "steps": 8, "dash_steps": 4, "dot_steps": 4, "fd": 20.0, "rmse": 0.1},
    {"budget": 8.0, "lsd": 9.0, "steps": 16, "dash_steps": 8, "dot_steps": 8, "fd": 7.5, "rmse": 0.15},
    {"budget": 20.0, "lsd": 20.0, "steps": 36, "dash_steps": 18, "dot_steps": 18, "fd": 4.0, "rmse": 0.01},
]
REUSE = [
    {"budget": 4.0, "lsd": 4.0, "steps": 8, "dash_steps": 4, "dot_steps": 4, "fd": 50.0, "rmse": 0.5},
    {"budget": 8.0, "lsd": 8.0, "steps": 16, "dash_steps": 8, "dot_steps": 8, "fd": 30.0, "rmse": 0.3},
    {"budget": 20.0, "lsd": 20.0, "steps": 40, "dash_steps": 20, "dot_steps": 20, "fd": 15.0, "rmse": 0.15},
]


def synthetic_report():
    curves = {"plain": PLAIN, "morse": MORSE, "training-free": REUSE}
    samplers = {
        "euler": rep.sampler_report("euler", curves, deterministic=True, fd_tolerance=0.5),
        "euler_ancestral": rep.sampler_report(
            "euler_ancestral", {k: [{kk: vv for kk, vv in p.items() if kk != "rmse"} for p in v] for k, v in curves.items()},
            deterministic=False,
        ),
    }
    return {"N": 6.0, "machine": {"cpu_count": 2}, "date": "2025-01-01T00:00:00", "fd_floor": 2.0, "samplers": samplers}


def test_speedups_on_synthetic_curves_match_hand_computed_values():
    r = synthetic_report()["samplers"]["euler"]
    fd = [p["speedup"] for p in r["per_budget"]]
    # FD 20 -> plain needs 8 LSD: 8 / 4.5; FD 7.5 -> halfway between 16 and 32: 24 / 9;
    # FD 4 beats every plain point -> at least 32 / 20 (a lower bound)
    assert fd == [pytest.approx(8 / 4.5), pytest.approx(24 / 9), pytest.approx(32 / 20)]
    assert [p["bound"] for p in r["per_budget"]] == [None, None, "lower"]
    assert r["average_speedup"] == pytest.approx((8 / 4.5 + 24 / 9 + 32 / 20) / 3)
    assert r["average_speedup_interpolated"] == pytest.approx((8 / 4.5 + 24 / 9) / 2)
    assert r["bounded_points"] == 1
    assert [p["quality"] for p in r["per_budget"]] == [20.0, 7.5, 4.0]
    assert [p["budget"] for p in r["per_budget"]] == [4.0, 8.0, 20.0]

    te = r["trajectory_error"]
    # RMSE 0.1 -> 16 LSD: 16 / 4.5; RMSE 0.15 -> between 8 (0.2) and 16 (0.1): 12 / 9; 0.01 -> >= 32 / 20
    assert [p["speedup"] for p in te["per_budget"]] == [pytest.approx(16 / 4.5), pytest.approx(12 / 9), pytest.approx(1.6)]
    assert te["average_speedup"] == pytest.approx((16 / 4.5 + 12 / 9 + 1.6) / 3)

    reuse = r["other_curves"]["training-free"]["fd"]
    # FD 50 is worse than every plain point -> at most 4 / 4 (an upper bound); FD 30 -> 6 LSD; FD 15 -> 12 LSD
    assert [p["speedup"] for p in reuse["per_budget"]] == [pytest.approx(1.0), pytest.approx(6 / 8), pytest.approx(12 / 20)]
    assert reuse["per_budget"][0]["bound"] == "upper"

    ll = r["lossless"]
    assert ll["plain_best"] == 5.0 and ll["morse_best"] == 4.0 and ll["reaches_plain_best"] is True
    assert ll["tolerance"] == 0.5


def test_stochastic_samplers_get_no_trajectory_error():
    r = synthetic_report()["samplers"]["euler_ancestral"]
    assert r["deterministic"] is False and r["trajectory_error"] is None
    assert r["average_speedup"] == pytest.approx((8 / 4.5 + 24 / 9 + 32 / 20) / 3)


def test_lossless_check_allows_only_the_tolerance():
    worse = [dict(p, fd=p["fd"] + 2.0) for p in MORSE]  # best 6.0 vs plain best 5.0
    assert rep.lossless_check(PLAIN, worse, "fd", tolerance=0.5)["reaches_plain_best"] is False
    assert rep.lossless_check(PLAIN, worse, "fd", tolerance=1.0)["reaches_plain_best"] is True


def test_table_json_and_plot_from_synthetic_curves(tmp_path):
    report = synthetic_report()
    text = rep.format_report(report)
    assert "== euler (deterministic) ==" in text and "== euler_ancestral (stochastic) ==" in text
    assert f"{8 / 4.5:.2f}x" in text and ">=1.60x" in text
    assert "reaches plain best (tolerance 0.500): yes" in text
    path = rep.write_json(report, tmp_path / "evaluation.json")
    back = json.loads(path.read_text())
    assert back["samplers"]["euler"]["per_budget"][1]["speedup"] == pytest.approx(24 / 9)
    png = rep.plot_report(report, tmp_path / "evaluation.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plain_curve_that_gets_worse_with_more_steps_is_flagged():
    noisy = [{"lsd": 4.0, "fd": 40.0}, {"lsd": 8.0, "fd": 10.0}, {"lsd": 16.0, "fd": 25.0}, {"lsd": 32.0, "fd": 10.5}]
    check = rep.monotone_check(noisy, "fd", tolerance=1.0)
    assert check["monotone"] is False
    assert [(v["from_lsd"], v["to_lsd"]) for v in check["violations"]] == [(8.0, 16.0)]  # 10.5 is within the tolerance
    assert rep.monotone_check(PLAIN, "fd")["monotone"] is True
    r = rep.sampler_report("dpmpp_2m", {"plain": noisy, "morse": MORSE}, deterministic=False, fd_tolerance=1.0)
    assert r["plain_monotone"]["fd"]["monotone"] is False
    assert "does not improve with LSD" in rep.format_sampler_table("dpmpp_2m", r)


def test_fd_below_the_real_data_floor_is_warned_about():
    report = synthetic_report()
    report["fd_floor"] = 4.5  # Morse's 4.0 at 20 LSD scores better than real data
    warnings = rep.floor_warnings(report)
    assert len(warnings) == 2 and "morse at 20.00 LSD: 4.000" in warnings[0]
    assert "WARNING: euler:" in rep.format_report(report)


def test_a_report_is_rebuilt_from_its_raw_curves(tmp_path):
    report = synthetic_report()
    path = rep.write_json(report, tmp_path / "in" / "evaluation.json")
    assert rep.main([str(path), "--out-dir", str(tmp_path / "out")]) == 0
    back = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert back["samplers"]["euler"]["average_speedup"] == pytest.approx(report["samplers"]["euler"]["average_speedup"])
    assert (tmp_path / "out" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_quality_values_are_left_out_not_crashed_on():
    block = rep.speedup_block(PLAIN, [{"lsd": 4.0, "fd": float("nan")}, {"lsd": 9.0, "fd": 7.5}], "fd")
    assert len(block["per_budget"]) == 1 and block["per_budget"][0]["speedup"] == pytest.approx(24 / 9)
    assert rep.speedup_block(PLAIN, [], "fd") is None


# --------------------------------------------------------------------------- end to end
def _dot_files(tmp_path):
    """The trained Dot files if they exist, else untrained ones saved into tmp_path."""
    from morse_engine import DotConfig, DotModel, fingerprint_module, save_dot
    from training import evaluate
    from training.reference.unet import load_reference_dash

    dot, ablation = evaluate.DEFAULT_DOT, evaluate.DEFAULT_ABLATION_DOT
    if dot.is_file() and ablation.is_file():
        return dot, ablation, True
    unet, _, _ = load_reference_dash()
    torch.manual_seed(0)
    made = []
    for name, trajectory in (("untrained.safetensors", True), ("untrained_no_trajectory.safetensors", False)):
        model = DotModel.build(unet, DotConfig.for_backbone(unet, m=2, trajectory=trajectory))
        made.append(save_dot(tmp_path / name, model, base_family="reference-digits", fingerprint=fingerprint_module(unet)))
    return (dot if dot.is_file() else made[0]), (ablation if ablation.is_file() else made[1]), False


def test_quick_run_end_to_end(tmp_path, capsys):
    from training import evaluate

    dot, ablation, _ = _dot_files(tmp_path)
    out = tmp_path / "report"
    threads = torch.get_num_threads()
    try:  # the tool sets torch's thread count (default 1); give the rest of the session its own back
        rc = evaluate.main(["--quick", "--dot", str(dot), "--ablation-dot", str(ablation), "--out-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Wall time:" in printed and "average speedup (FD)" in printed

    report = json.loads((out / "evaluation.json").read_text())
    assert isinstance(report["N"], float) and math.isfinite(report["N"]) and report["N"] > 0
    assert report["latency"]["dash_seconds"] > 0 and report["latency"]["dot_seconds"] > 0
    assert isinstance(report["machine"], dict) and isinstance(report["date"], str)
    assert set(report["samplers"]) == {"euler"}
    euler = report["samplers"]["euler"]
    assert isinstance(euler["average_speedup"], float) and euler["average_speedup"] > 0
    assert len(euler["per_budget"]) == len(evaluate.QUICK["budgets"])
    for point in euler["per_budget"]:
        assert {"lsd", "speedup", "quality"} <= set(point)
        assert all(isinstance(point[k], float) and math.isfinite(point[k]) for k in ("lsd", "speedup", "quality"))
        assert point["bound"] in (None, "lower", "upper")
        assert point["lsd"] <= point["budget"] + 1e-6
    assert isinstance(euler["trajectory_error"]["average_speedup"], float)
    curves = euler["curves"]
    assert {"plain", "morse", "training-free", "ablation"} <= set(curves)
    assert [p["lsd"] for p in curves["plain"]] == [float(s) for s in evaluate.QUICK["plain_steps"]]
    for name in ("morse", "training-free", "ablation"):
        for p in curves[name]:
            assert p["fallback_calls"] == 0  # every Dot step found its anchor
            assert p["dash_steps"] + p["dot_steps"] == p["steps"]
    # training-free fills are planned as free: budget B runs B Dash steps
    assert [p["dash_steps"] for p in curves["training-free"]] == [int(b) for b in evaluate.QUICK["budgets"]]
    assert euler["lossless"]["metric"] == "fd"
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
