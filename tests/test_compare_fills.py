import json

import pytest
import torch

from training import compare_fills


def test_gap_closed_is_the_share_of_the_reuse_to_dash_gap():
    assert compare_fills.gap_closed(dash=0.1, reuse=0.3, dot=0.2) == pytest.approx(0.5)
    assert compare_fills.gap_closed(dash=0.1, reuse=0.3, dot=0.1) == pytest.approx(1.0)
    assert compare_fills.gap_closed(dash=0.1, reuse=0.3, dot=0.4) < 0


def test_small_run_on_the_committed_dot_writes_measured_rows(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "fills.json"
    assert compare_fills.main(["--steps", "4,6", "--samples", "4", "--reference-steps", "12", "--json", str(out),
                               "--fills", "dot,inherit_k2,propagate"]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["steps"] for r in rows] == [4, 6]
    assert set(report["n"]) == {"dot", "inherit_k2", "propagate"} and all(v > 0 for v in report["n"].values())
    for r in rows:
        assert r["dash_rmse"] > 0 and r["reuse_rmse"] > 0
        for name, f in r["fills"].items():
            assert f["fill_calls_per_run"] > 0  # the fill really served steps
            assert f["rmse"] > 0 and f["rmse"] != r["reuse_rmse"]
            assert f["gap_closed"] == pytest.approx(compare_fills.gap_closed(r["dash_rmse"], r["reuse_rmse"], f["rmse"]))


def test_bad_step_counts_are_refused_by_name(capsys):
    assert compare_fills.main(["--steps", "1"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert compare_fills.main(["--steps", "six"]) == 2
