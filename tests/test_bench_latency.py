import json

import pytest
import torch

from training import bench_latency


def test_schedule_bounds_follow_the_lsd_cost():
    rows = {r["schedule"]: r for r in bench_latency.schedule_table(7.0)}
    d = rows["D."]
    assert (d["dash"], d["dot"]) == (15, 15)
    assert d["lsd"] == pytest.approx(15 + 15 / 7)
    assert d["speedup_bound"] == pytest.approx(30 / (15 + 15 / 7))
    assert rows["D..."]["speedup_bound"] > rows["D.."]["speedup_bound"] > d["speedup_bound"]


def run_tiny(tmp_path, monkeypatch, *args) -> dict:
    """The benchmark on the tiny architecture without ComfyUI, one timed call each; its JSON report."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    torch.set_num_threads(1)
    out = tmp_path / "bench.json"
    assert bench_latency.main(["--arch", "tiny", "--repeats", "1", "--warmup", "0", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_tiny_benchmark_end_to_end_writes_measured_figures(tmp_path, monkeypatch):
    report = run_tiny(tmp_path, monkeypatch, "--m", "1,2", "--train-steps", "2")
    assert [r["m"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["dash_ms"] > 0 and row["dot_ms"] > 0
        assert row["N"] == pytest.approx(row["dash_ms"] / row["dot_ms"])
        assert 0 < row["dot_param_share"] < 1
    assert report["training"]["samples_per_s"] > 0 and report["training"]["peak_mb"] > 0


def test_the_feature_dots_rollout_training_is_timed_too(tmp_path, monkeypatch):
    training = run_tiny(tmp_path, monkeypatch, "--m", "2", "--train-steps", "2", "--train-layout", "feature",
                        "--train-run-steps", "3")["training"]
    assert training["layout"] == "feature" and training["run_steps"] == 3 and training["steps"] == 2
    assert training["samples_per_s"] > 0 and training["peak_mb"] > 0


def test_both_stems_are_timed_when_asked(tmp_path, monkeypatch):
    rows = run_tiny(tmp_path, monkeypatch, "--m", "2", "--stem", "pixel_shuffle,full_res")["rows"]
    assert [r["stem"] for r in rows] == ["pixel_shuffle", "full_res"]
    with pytest.raises(SystemExit, match="--stem"):
        bench_latency.main(["--arch", "tiny", "--stem", "half"])


def test_unknown_architecture_is_named():
    with pytest.raises(SystemExit, match="not one of"):
        bench_latency.main(["--arch", "sd3"])


def test_feature_fills_are_timed_against_dash_with_a_real_anchor(tmp_path, monkeypatch):
    fills = run_tiny(tmp_path, monkeypatch, "--m", "2", "--fills", "inherit_k1,propagate,feature_dot")["fills"]
    assert [f["fill"] for f in fills] == ["inherit_k1", "propagate", "feature_dot"]
    for f in fills:
        assert f["dash_ms"] > 0 and f["fill_ms"] > 0 and f["N"] == pytest.approx(f["dash_ms"] / f["fill_ms"])
    # only the feature Dot has weights of its own
    assert [f["params"] > 0 for f in fills] == [False, False, True] and 0 < fills[2]["param_share"] < 1
    with pytest.raises(SystemExit, match="--fills"):
        bench_latency.main(["--arch", "tiny", "--fills", "nope"])


def test_faster_diffusion_whole_runs_are_timed_against_plain_runs(tmp_path, monkeypatch):
    w = run_tiny(tmp_path, monkeypatch, "--m", "2", "--faster-diffusion", "--fd-steps", "20", "--fd-sequential")[
        "faster_diffusion_wall_clock"]
    assert w["steps"] == 20 and w["schedule"].count("D") == 7 and w["schedule"].startswith("DDD.D")
    for name in ("faster_diffusion", "faster_diffusion_sequential"):
        assert w[f"{name}_s"] > 0 and w[f"{name}_speedup"] == pytest.approx(w["plain_s"] / w[f"{name}_s"])
    # the spans after the key steps (DDD.D.D...D...D.....): all but each span's first step are decoded ahead
    assert w["faster_diffusion_decoded_ahead"] == 0 + 0 + 2 + 2 + 4 and w["faster_diffusion_sequential_decoded_ahead"] == 0
    with pytest.raises(SystemExit, match="--faster-diffusion times SD1.5-family"):
        bench_latency.main(["--arch", "sdxl", "--faster-diffusion"])
