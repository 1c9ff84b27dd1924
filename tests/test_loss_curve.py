"""The loss-curve verdict of ``python -m training.loss_curve``: a falling curve is not called flat, a level one is,
and the tool reads the curve a Dot file keeps (or refuses one without) and draws it."""
import pytest

from morse_engine import PaperDotConfig, PaperDot, fingerprint_module, save_dot
from training import loss_curve as tool


def test_a_falling_curve_is_still_falling_and_its_change_is_measured():
    history = [1.0 - 0.01 * i for i in range(40)]  # the last fifth: 8 points, 0.07 down from ~0.65
    trend = tool.last_fifth_trend(history)
    assert trend.points == 8 and not trend.flat and trend.high < 0
    assert trend.change == pytest.approx(-0.07 / (sum(history[-8:]) / 8), rel=1e-6)


def test_a_level_noisy_curve_is_flat():
    history = [0.5 + (0.02 if i % 2 else -0.02) for i in range(30)]
    trend = tool.last_fifth_trend(history)
    assert trend.flat and abs(trend.change) < 0.05


def test_a_real_but_negligible_slope_is_flat():
    history = [0.5 - 0.00005 * i for i in range(50)]  # noise-free, -0.09% over the last fifth
    trend = tool.last_fifth_trend(history)
    assert trend.high < 0 and trend.flat


def test_the_fixed_set_curve_is_judged_where_the_file_keeps_one(tmp_path, backbone, capsys):
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=2, lora_rank=4, lora_alpha=4.0))
    fp = fingerprint_module(backbone)
    # the running loss still falls, the fixed set's has levelled off: the fixed set decides
    fixed = [[0, 0.02, 0.02]] + [[100 * (i + 1), 0.01 + 0.004 * 0.7 ** i, 0.02] for i in range(30)]
    path = save_dot(tmp_path / "fixed.safetensors", dot, base_family="tiny", fingerprint=fp, training={
        "steps": 3000, "loss_history": [0.02 - 0.0001 * i for i in range(60)], "fixed_set_history": fixed})
    assert tool.main([str(path), "--png", str(tmp_path / "c.png")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "fixed-set loss over the last fifth" in line and line.endswith("flat")
    falling = [[0, 0.02, 0.02]] + [[100 * (i + 1), 0.02 - 0.0003 * i, 0.02] for i in range(30)]
    path = save_dot(tmp_path / "falling.safetensors", dot, base_family="tiny", fingerprint=fp, training={
        "steps": 3000, "fixed_set_history": falling, "loss_history": [0.01] * 60})
    assert tool.main([str(path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("still falling")


def test_a_curve_too_short_to_judge_is_refused():
    with pytest.raises(ValueError, match="too short"):
        tool.last_fifth_trend([0.3, 0.2])


def test_the_tool_judges_loss_over_reuse_where_the_file_keeps_both(tmp_path, backbone, capsys):
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=2, lora_rank=4, lora_alpha=4.0))
    fp = fingerprint_module(backbone)
    # the loss falls only because the batches got easier (the reuse baseline fell alike): flat relative to reuse
    reuse = [0.02 - 0.0002 * i for i in range(20)]
    both = save_dot(tmp_path / "both.safetensors", dot, base_family="tiny", fingerprint=fp, training={
        "steps": 1000, "final_loss": 0.008, "final_reuse_loss": reuse[-1],
        "loss_history": [0.5 * r for r in reuse], "reuse_loss_history": reuse})
    loss_only = save_dot(tmp_path / "loss.safetensors", dot, base_family="tiny", fingerprint=fp, training={
        "steps": 1000, "loss_history": [0.5 * r for r in reuse]})
    png = tmp_path / "curve.png"
    assert tool.main([str(both), str(loss_only), "--png", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "loss / reuse over the last fifth" in out[0] and out[0].endswith("flat")
    assert "loss over the last fifth" in out[1] and out[1].endswith("still falling")
    assert png.stat().st_size > 10_000
    bare = save_dot(tmp_path / "bare.safetensors", dot, base_family="tiny", fingerprint=fp)
    assert tool.main([str(bare)]) == 2
    assert "keeps no loss history" in capsys.readouterr().err
