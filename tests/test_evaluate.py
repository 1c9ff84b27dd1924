"""The evaluation: analysis and report on synthetic records, resuming from records, and the quick run end to end.

The end-to-end test needs the committed reference Dash and classifier; when the trained Dot files are
absent it builds and saves untrained ones, so it never skips for want of them.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from training.evaluation import report as rep
from training.evaluation.analysis import Scorer, json_ready, sampler_analysis
from training.evaluation.records import RecordStore, RunRecord

D, N = 8, 400


def _feats(shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g) + shift


def _record(fill, lsd, shift, budget=None, pattern=None, err=None, seed=0) -> RunRecord:
    sq = None if err is None else torch.full((N,), err**2) * (1 + 0.1 * torch.rand(N, generator=torch.Generator().manual_seed(seed)))
    return RunRecord("euler", fill, steps=int(lsd), lsd=float(lsd), pattern=pattern, budget=budget,
                     features=_feats(shift, seed), predicted=torch.arange(N) % 10, sq_error=sq)


def synthetic_analysis():
    """Plain converges as steps grow (shift and error shrink); fill 'good' reaches plain's 16-step quality
    at 6 LSD, fill 'bad' only plain's 4-step quality at 8."""
    scorer = Scorer(_feats(0, 100).numpy(), _feats(0.3, 101).numpy(), np.arange(N) % 10, replicates=60, seed=0)
    bands = scorer.bands(_feats(0, 102).numpy(), _feats(0, 103).numpy(), _feats(0.3, 104).numpy(), _feats(0.3, 105).numpy())
    plain = [_record("plain", s, shift, err=e, seed=s) for s, shift, e in ((4, 3.0, 0.4), (8, 1.5, 0.2), (16, 0.8, 0.1), (32, 0.0, 0.05))]
    good = [_record("good", 6, 0.8, budget=6, pattern="D.", err=0.1, seed=7), _record("good", 6, 1.2, budget=6, pattern="D..", err=0.15, seed=8)]
    bad = [_record("bad", 8, 3.0, budget=8, pattern="D.", err=0.4, seed=9)]
    score = lambda recs: [(r, scorer.score(r)) for r in recs]  # noqa: E731
    return sampler_analysis(score(plain), {"good": score(good), "bad": score(bad)}, bands, deterministic=True), bands


def test_the_best_pattern_is_picked_per_budget_and_said_which():
    out, _ = synthetic_analysis()
    best = out["fills"]["good"]["best"]["fd_dash"][0]
    assert best["budget"] == 6 and best["pattern"] == "D."  # D. reached the smaller shift


def test_speedups_follow_the_plain_curve_with_an_interval():
    out, _ = synthetic_analysis()
    row = out["fills"]["good"]["speedup"]["rmse"][0]
    assert row["status"] == "separable"
    assert row["speedup"] == pytest.approx(16 / 6, rel=0.15)  # as good as plain at 16 steps, for 6 LSD
    assert row["lo"] <= row["speedup"] <= row["hi"]
    worse = out["fills"]["bad"]["speedup"]["rmse"][0]
    assert worse["speedup"] == pytest.approx(4 / 8, rel=0.2)
    avg = out["fills"]["good"]["average"]["rmse"]
    assert avg["n_separable"] == 1 and avg["speedup"] == pytest.approx(row["speedup"])


def test_a_run_inside_the_noise_band_gets_no_speedup():
    out, bands = synthetic_analysis()
    plain_best = out["plain"][-1]["fd_dash"]  # the converged end of the plain curve: no shift
    assert plain_best["lo"] <= bands["fd_dash"]["band"][1]
    assert out["plain_improves"]["fd_dash"]["separated"]  # 4 steps are worse than 32, beyond the noise


def test_the_report_renders_table_json_and_plot(tmp_path):
    out, bands = synthetic_analysis()
    report = json_ready({"title": "synthetic", "date": "2026-01-01", "machine": {"processor": "x"},
                         "settings": {"samples": N, "cfg": 2.5, "patterns": ["D.", "D.."], "budgets": [6, 8], "level": 0.9,
                                      "replicates": 60},
                         "fills": {"good": {"n": 5.0}, "bad": {"n": None}}, "bands": bands, "samplers": {"euler": out}})
    text = rep.format_report(report)
    assert "| euler   | good | 5.00" in text and "free" in text
    assert "`D.`" in text and "improves beyond noise" in text
    path = rep.write_json(report, tmp_path / "evaluation.json")
    assert json.loads(path.read_text())["samplers"]["euler"]["fills"]["good"]["best"]["rmse"][0]["pattern"]
    assert "_boot" not in path.read_text()
    assert rep.plot_report(report, tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep.main([str(path)]) == 0 and (tmp_path / "evaluation.png").is_file()  # re-rendered from the JSON


def test_records_round_trip_and_the_store_is_keyed_by_settings(tmp_path):
    rec = _record("good", 6, 0.5, budget=6, pattern="D.", err=0.1)
    store = RecordStore(tmp_path, {"samples": N, "seed": 0})
    store.put("k", rec)
    back = store.get("k")
    assert back.pattern == "D." and back.budget == 6 and torch.equal(back.features, rec.features)
    assert torch.equal(back.sq_error, rec.sq_error) and back.images is None
    assert RecordStore(tmp_path, {"samples": N, "seed": 1}).get("k") is None  # other settings: another store


def test_an_auto_run_reports_what_the_planner_chose():
    scorer = Scorer(_feats(0, 100).numpy(), _feats(0.3, 101).numpy(), np.arange(N) % 10, replicates=60, seed=0)
    bands = scorer.bands(_feats(0, 102).numpy(), _feats(0, 103).numpy(), _feats(0.3, 104).numpy(), _feats(0.3, 105).numpy())
    plain = [_record("plain", s, shift, err=e, seed=s) for s, shift, e in ((4, 3.0, 0.4), (16, 0.8, 0.1))]
    auto = _record("dot", 6, 0.5, budget=6, pattern="auto", err=0.1, seed=7)
    auto.extra = {"chosen": {"pattern": "D..", "source": "rule", "reason": "why"}}
    fixed = _record("dot", 6, 1.5, budget=6, pattern="D.", err=0.3, seed=8)
    score = lambda recs: [(r, scorer.score(r)) for r in recs]  # noqa: E731
    out = sampler_analysis(score(plain), {"dot": score([auto, fixed])}, bands, deterministic=True)
    best = out["fills"]["dot"]["best"]["rmse"][0]
    assert best["pattern"] == "auto" and best["chosen"]["pattern"] == "D.."
    assert [r.get("chosen") for r in out["fills"]["dot"]["runs"]] == [auto.extra["chosen"], None]
    report = json_ready({"title": "t", "date": "d", "machine": {"processor": "x"}, "settings": {"samples": N, "cfg": 2.5, "patterns": ["D.", "auto"],
                         "budgets": [6], "level": 0.9, "replicates": 60}, "fills": {"dot": {"n": 5.0}}, "bands": bands,
                         "samplers": {"euler": out}})
    assert "`auto=D..`" in rep.format_report(report)


def test_the_pattern_auto_is_accepted_next_to_fixed_ones():
    from training import evaluate

    st = evaluate.settings_from(evaluate.parser().parse_args(["--quick", "--patterns", "D.,auto"]))
    assert st["patterns"] == ("D.", "auto")
    with pytest.raises(SystemExit, match="--patterns"):
        evaluate.settings_from(evaluate.parser().parse_args(["--quick", "--patterns", "D.,Dx"]))


def test_an_auto_run_samples_the_planners_choice_exactly_as_that_fixed_pattern():
    from morse_engine import ReuseFiller, choose_pattern
    from training.evaluation.workload import TRAINING_FREE_N, Models, reference_workload, run_morse
    from training.reference.unet import load_reference_dash

    unet, conditioner, meta = load_reference_dash()
    work = reference_workload(Models(unet, conditioner, meta, None, None), 4, 4, 2.5, 0, "cpu")
    x, auto = run_morse("euler", work, 6, "auto", ReuseFiller(), None)
    choice = choose_pattern(6, TRAINING_FREE_N, "euler")  # the nodes' call
    assert auto["chosen"] == {"pattern": choice.pattern, "source": "rule", "reason": choice.reason}
    y, fixed = run_morse("euler", work, 6, choice.pattern, ReuseFiller(), None)
    assert torch.equal(x, y) and (auto["steps"], auto["pattern"]) == (fixed["steps"], fixed["pattern"])
    assert fixed["chosen"] is None
    _, measured = run_morse("euler", work, 6, "auto", ReuseFiller(), None, {"euler": [[5, "D."]]})
    assert measured["chosen"]["source"] == "measured" and measured["pattern"].startswith("D.D.D")


# --------------------------------------------------------------------------- end to end
def _dot_files(tmp_path):
    """The trained Dot files if they exist, else untrained ones saved into tmp_path."""
    from morse_engine import PaperDotConfig, PaperDot, fingerprint_module, save_dot
    from training.evaluation.workload import DEFAULT_ABLATION_DOT, DEFAULT_DOT
    from training.reference.unet import load_reference_dash

    if DEFAULT_DOT.is_file() and DEFAULT_ABLATION_DOT.is_file():
        return DEFAULT_DOT, DEFAULT_ABLATION_DOT
    unet, _, _ = load_reference_dash()
    torch.manual_seed(0)
    made = []
    for name, trajectory in (("untrained.safetensors", True), ("untrained_no_trajectory.safetensors", False)):
        model = PaperDot.build(unet, PaperDotConfig.for_backbone(unet, m=2, trajectory=trajectory))
        made.append(save_dot(tmp_path / name, model, base_family="reference-digits", fingerprint=fingerprint_module(unet)))
    return made[0], made[1]


def test_quick_run_end_to_end_and_resume(tmp_path, capsys):
    from training import evaluate

    dot, ablation = _dot_files(tmp_path)
    out, runs = tmp_path / "report", tmp_path / "runs"
    args = ["--quick", "--dot", str(dot), "--ablation-dot", str(ablation), "--out-dir", str(out), "--runs", str(runs)]
    threads = torch.get_num_threads()
    try:  # the tool sets torch's thread count (default 1); give the rest of the session its own back
        assert evaluate.main(args) == 0
        first = json.loads((out / "evaluation.json").read_text())
        assert evaluate.main(args) == 0  # every run's record is there: nothing is sampled again
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "Wall time:" in printed and "Noise floor" in printed
    again = json.loads((out / "evaluation.json").read_text())
    assert again["samplers"] == first["samplers"]

    quick = evaluate.MODES["quick"]
    assert set(first["samplers"]) == set(quick["samplers"])
    assert {"dot", "ablation", "reuse", "extrapolate"} <= set(first["fills"])
    assert first["fills"]["reuse"]["n"] is None and first["fills"]["dot"]["n"] > 0  # free, and measured
    euler = first["samplers"]["euler"]
    assert [p["lsd"] for p in euler["plain"]] == [float(s) for s in quick["plain_steps"]]
    for name, block in euler["fills"].items():
        for run in block["runs"]:
            assert run["fallback_calls"] == 0  # every fill step found its anchor
            assert run["dash_steps"] + run["fill_steps"] == run["steps"]
            assert run["lsd"] <= run["budget"] + 1e-6
            for metric in ("fd_dash", "fd_data", "rmse", "label"):
                p = run[metric]
                assert math.isfinite(p["value"]) and p["lo"] <= p["value"] <= p["hi"]
        assert [b["budget"] for b in block["best"]["rmse"]] == [float(b) for b in quick["budgets"]]
    # training-free fills are planned as free: budget B runs B Dash steps
    assert [r["dash_steps"] for r in euler["fills"]["reuse"]["runs"]] == [int(b) for b in quick["budgets"]]
    assert first["bands"]["fd_dash"]["floor"] > 0
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_records_are_analysed_elsewhere_without_sampling_again(tmp_path, monkeypatch):
    from training import evaluate

    dot, ablation = _dot_files(tmp_path)
    base = ["--quick", "--dot", str(dot), "--ablation-dot", str(ablation), "--samplers", "euler", "--budgets", "4",
            "--plain-steps", "4,8", "--samples", "16", "--reference-steps", "12", "--converged-steps", "8"]
    threads = torch.get_num_threads()
    try:
        assert evaluate.main(base + ["--out-dir", str(tmp_path / "a"), "--runs", str(tmp_path / "ra"),
                                     "--export", str(tmp_path / "packs")]) == 0
        packs = sorted((tmp_path / "packs").glob("records-*.safetensors"))
        assert [p.name for p in packs] == ["records-dpmpp_2m.safetensors", "records-euler.safetensors"]

        def no_sampling(*a, **k):
            raise AssertionError("a run was sampled although its record was imported")

        monkeypatch.setattr(evaluate, "run_job", no_sampling)
        monkeypatch.setattr(evaluate, "measure_n", no_sampling)
        assert evaluate.main(base + ["--out-dir", str(tmp_path / "b"), "--runs", str(tmp_path / "rb"),
                                     "--import-records", *map(str, packs)]) == 0
    finally:
        torch.set_num_threads(threads)
    a = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    b = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert a["fills"]["dot"]["n"] == b["fills"]["dot"]["n"]
    for pa, pb in zip(a["samplers"]["euler"]["plain"], b["samplers"]["euler"]["plain"]):
        assert pb["rmse"]["value"] == pytest.approx(pa["rmse"]["value"])  # per-sample errors travel in float32
        assert pb["fd_dash"]["value"] == pytest.approx(pa["fd_dash"]["value"], rel=0.02)  # features in float16


def test_final_dash_makes_every_fills_run_end_on_a_dash_step():
    from morse_engine import ReuseFiller
    from training import evaluate
    from training.evaluation.workload import Models, reference_workload, run_morse
    from training.reference.unet import load_reference_dash

    st = evaluate.settings_from(evaluate.parser().parse_args(["--quick", "--final-dash", "1"]))
    assert st["final_dash"] == 1
    assert "final_dash" not in evaluate.settings_from(evaluate.parser().parse_args(["--quick"]))  # old records keep their key
    with pytest.raises(SystemExit, match="--final-dash"):
        evaluate.settings_from(evaluate.parser().parse_args(["--quick", "--final-dash", "-1"]))
    unet, conditioner, meta = load_reference_dash()
    work = reference_workload(Models(unet, conditioner, meta, None, None), 4, 4, 2.5, 0, "cpu")
    _, plain_end = run_morse("euler", work, 6, "D.", ReuseFiller(), None)
    _, dash_end = run_morse("euler", work, 6, "D.", ReuseFiller(), None, final_dash=1)
    assert plain_end["pattern"].endswith(".") and dash_end["pattern"].endswith("D")
    assert dash_end["dash_steps"] <= 6 and dash_end["lsd"] <= 6 + 1e-9
