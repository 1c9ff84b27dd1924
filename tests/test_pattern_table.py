"""A fill's measured pattern table from an evaluation report, and the tool that writes it into a Dot file."""
import json

import pytest
import torch

from morse_engine import PaperDotConfig, PaperDot, choose_pattern, fingerprint_module, read_dot_info, save_dot
from training.evaluation.pattern_table import fill_speed, pattern_table_from_report, rule_against_report

BAND_TOP = 50.0  # the FD noise band's top: a run whose interval reaches below it is not told from converged


def _point(value, half):
    return {"value": value, "lo": value - half, "hi": value + half}


def _run(pattern, budget, fd, rmse=None):
    row = {"pattern": pattern, "budget": budget, "fd_dash": _point(fd, 10.0)}
    if rmse is not None:
        row["rmse"] = _point(rmse, 0.001)
    return row


def synthetic_report():
    """euler at 4 LSD: FD separates and prefers D...; at 8 LSD FD is inside the noise band (it prefers D..., by
    noise) and RMSE prefers D.; an 'auto' run scores best everywhere but is no candidate. euler_ancestral has
    no RMSE: FD decides even inside the band. The reuse fill exists only for euler."""
    euler = [_run("D.", 4, 300, 0.20), _run("D...", 4, 200, 0.21), _run("auto", 4, 100, 0.01),
             _run("D.", 8, 45, 0.05), _run("D...", 8, 40, 0.07), _run("auto", 8, 1, 0.01)]
    ancestral = [_run("D.", 8, 42), _run("D..", 8, 44)]
    return {"bands": {"fd_dash": {"band": [0.0, BAND_TOP]}, "rmse": {"band": [0.0, 0.0]}},
            "fills": {"dot": {"n": 9.7}, "reuse": {"n": None}},
            "samplers": {"euler": {"fills": {"dot": {"runs": euler}, "reuse": {"runs": [_run("D..", 4, 90, 0.1)]}}},
                         "euler_ancestral": {"fills": {"dot": {"runs": ancestral}}}}}


def test_the_distribution_metric_decides_where_it_separates_and_rmse_where_it_does_not():
    table = pattern_table_from_report(synthetic_report(), "dot")
    assert table == {"euler": [[4.0, "D..."], [8.0, "D."]], "euler_ancestral": [[8.0, "D."]]}


def test_another_metric_or_no_fallback_changes_the_table():
    report = synthetic_report()
    assert pattern_table_from_report(report, "dot", fallback=None)["euler"] == [[4.0, "D..."], [8.0, "D..."]]
    rmse = pattern_table_from_report(report, "dot", metric="rmse")
    assert rmse == {"euler": [[4.0, "D."], [8.0, "D."]]}  # no RMSE for the stochastic sampler: left to the rule
    assert pattern_table_from_report(report, "reuse") == {"euler": [[4.0, "D.."]]}


def test_a_fill_or_metric_the_report_lacks_is_refused():
    with pytest.raises(ValueError, match="no runs of the fill 'ablation'.*'dot'"):
        pattern_table_from_report(synthetic_report(), "ablation")
    with pytest.raises(ValueError, match="choose from"):
        pattern_table_from_report(synthetic_report(), "dot", metric="label")


def test_the_rule_is_set_beside_each_measured_row():
    report = synthetic_report()
    rows = rule_against_report(report, "dot")
    assert [(r["sampler"], r["budget"], r["measured"]) for r in rows] == [
        ("euler", 4.0, "D..."), ("euler", 8.0, "D."), ("euler_ancestral", 8.0, "D.")]
    for r in rows:
        assert r["rule"] == choose_pattern(r["budget"], 9.7, r["sampler"]).pattern
        if r["rule"] == r["measured"]:
            assert r["within"] and r["rule_value"] == r["measured_value"]
    assert fill_speed(report, "reuse") > 1e9  # a free fill is planned as free


def test_the_tool_writes_the_table_into_a_dot_file_and_clears_it(tmp_path, backbone, capsys):
    from training import pattern_table as tool

    report = tmp_path / "evaluation.json"
    report.write_text(json.dumps(synthetic_report()))
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=2, lora_rank=4, lora_alpha=4.0))
    path = save_dot(tmp_path / "d.safetensors", dot, base_family="tiny-test", fingerprint=fingerprint_module(backbone))
    from safetensors import safe_open

    def tensors():
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    before = tensors()
    assert tool.main(["--report", str(report), "--write"]) == 2  # which Dot? it must be named
    assert tool.main(["--report", str(report), "--dot", str(path), "--write"]) == 0
    assert "rule = measured at" in capsys.readouterr().out
    assert read_dot_info(path).pattern_table == {"euler": ((4.0, "D..."), (8.0, "D.")), "euler_ancestral": ((8.0, "D."),)}
    after = tensors()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert tool.main(["--dot", str(path), "--clear"]) == 0
    assert read_dot_info(path).pattern_table is None
    assert tool.main(["--report", str(tmp_path / "missing.json")]) == 2
