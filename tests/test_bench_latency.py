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


def test_both_stems_are_timed_when_asked(tmp_path, monkeypatch):
    rows = run_tiny(tmp_path, monkeypatch, "--m", "2", "--stem", "pixel_shuffle,full_res")["rows"]
    assert [r["stem"] for r in rows] == ["pixel_shuffle", "full_res"]
    with pytest.raises(SystemExit, match="--stem"):
        bench_latency.main(["--arch", "tiny", "--stem", "half"])


def test_unknown_architecture_is_named():
    with pytest.raises(SystemExit, match="not one of"):
        bench_latency.main(["--arch", "sd3"])


def test_feature_fills_are_timed_against_dash_with_a_real_anchor(tmp_path, monkeypatch):
    fills = run_tiny(tmp_path, monkeypatch, "--m", "2", "--fills", "inherit_k1,propagate")["fills"]
    assert [f["fill"] for f in fills] == ["inherit_k1", "propagate"]
    for f in fills:
        assert f["dash_ms"] > 0 and f["fill_ms"] > 0 and f["N"] == pytest.approx(f["dash_ms"] / f["fill_ms"])
    with pytest.raises(SystemExit, match="--fills"):
        bench_latency.main(["--arch", "tiny", "--fills", "nope"])
