"""Rollout training of a feature Dot (``training.trainer.rollout``) and its command line (``train_dot --layout
feature``), on the reference model at a tiny setting."""
import pytest
import torch

from morse_engine import FeatureDotConfig, FeatureDotFiller, read_dot_info
from training.reference.blocks import ReferenceBlocks
from training.train_dot import main as train_dot_main
from training.trainer.dash_setup import reference_setup
from training.trainer.rollout import RolloutConfig, Rollouts, relative_end_error, targets_for, train_feature_dot

TINY = dict(runs=2, fixed_runs=1, batch=2, min_steps=4, max_steps=6, fixed_every=4, checkpoint_every=3, lr=1e-2,
            warmup=1, dot=FeatureDotConfig(width=8))


@pytest.fixture(scope="module")
def setup():
    return reference_setup()


def test_rollout_training_lowers_the_end_error_of_its_runs(setup, tmp_path):
    config = RolloutConfig(steps=12, **TINY)
    state = tmp_path / "run" / "train-state.safetensors"
    result = train_feature_dot(setup, ReferenceBlocks(setup.unet), config, state, log=lambda *_: None)
    runs = targets_for(setup, config, Rollouts(setup, "cpu"), state.parent / "rollout-targets.safetensors",
                       log=lambda *_: None)
    fill = FeatureDotFiller(ReferenceBlocks(setup.unet), result.dot)
    untrained = FeatureDotFiller(ReferenceBlocks(setup.unet), type(result.dot)(result.dot.config))
    with torch.no_grad():
        before = [float(relative_end_error(Rollouts(setup, "cpu"), r, untrained)) for r in runs["train"]]
        after = [float(relative_end_error(Rollouts(setup, "cpu"), r, fill)) for r in runs["train"]]
        held_out = float(relative_end_error(Rollouts(setup, "cpu"), runs["fixed"][0], untrained))
    assert sum(after) < sum(before)
    fixed = result.summary["fixed_history"]  # the held-out run, scored untrained and every 4 steps
    assert [s for s, _, _ in fixed] == [0, 4, 8, 12] and fixed[0][1] == pytest.approx(held_out, rel=1e-5)
    assert all(not p.requires_grad for p in result.dot.parameters())


def test_a_killed_rollout_run_resumes_to_the_weights_of_an_unbroken_one(setup, tmp_path, monkeypatch):
    import training.trainer.rollout as rollout

    config = RolloutConfig(steps=6, **TINY)
    whole = train_feature_dot(setup, ReferenceBlocks(setup.unet), config, tmp_path / "a" / "train-state.safetensors",
                              log=lambda *_: None)
    real_save = rollout.save_state

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt  # killed right after the checkpoint at step 3

    path = tmp_path / "b" / "train-state.safetensors"
    monkeypatch.setattr(rollout, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_feature_dot(setup, ReferenceBlocks(setup.unet), config, path, log=lambda *_: None)
    monkeypatch.setattr(rollout, "save_state", real_save)
    resumed = train_feature_dot(setup, ReferenceBlocks(setup.unet), config, path, resume=True, log=lambda *_: None)
    assert resumed.resumed_from == 3
    for a, b in zip(whole.dot.state_dict().values(), resumed.dot.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.summary["fixed_history"] == whole.summary["fixed_history"]
    with pytest.raises(ValueError, match="other settings"):
        train_feature_dot(setup, ReferenceBlocks(setup.unet), RolloutConfig(steps=7, **TINY), path, resume=True,
                          log=lambda *_: None)


def test_the_command_line_trains_and_writes_a_feature_dot(tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    rc = train_dot_main(["--threads", "1", "--steps", "4", "--rollout-runs", "2", "--rollout-batch", "2",
                         "--rollout-steps", "4,6", "--change-width", "8", "--n-batch", "4", "--out", str(out),
                         "--runs", str(tmp_path / "runs"), "--no-trajectory", "--compare-samples", "2"])
    assert rc == 0
    info = read_dot_info(out)
    assert isinstance(info.config, FeatureDotConfig) and not info.config.trajectory and info.measured_n > 0
    assert info.training["layout"] == "feature" and len(info.training["fixed_set_history"]) >= 2
    out = capsys.readouterr().out
    assert "held-out runs' end error" in out
    assert "gap closed at 6/12/20/40 euler steps" in out and "its untrained start (forecast_k1)" in out


def test_the_verdict_says_plainly_whether_the_trained_dot_beats_its_start():
    from training.trainer.verdict import gap_lines

    table, sentence = gap_lines([0.5, 0.4], [0.3, 0.2], "forecast_k1", (6, 12), "test")
    assert "0.50/0.40" in table and "0.30/0.20" in table
    assert sentence.startswith("The trained Dot beats its untrained start (forecast_k1): better at 2 of 2") and "+0.20" in sentence
    _, mixed = gap_lines([0.5, 0.1], [0.3, 0.2], "forecast_k1", (6, 12), "test")
    assert "on average, by +0.05, but is better at 1 of 2 step counts only" in mixed
    _, worse = gap_lines([0.1, 0.1], [0.3, 0.2], "forecast_k1", (6, 12), "test")
    _, level = gap_lines([0.30001, 0.2], [0.3, 0.2], "forecast_k1", (6, 12), "test")  # equal as printed
    assert "does NOT beat" in level and "better at 0 of 2" in level
    assert "does NOT beat" in worse and "-0.15" in worse and "--steps" in worse


def test_the_command_line_refuses_options_of_the_other_layout(tmp_path, capsys):
    assert train_dot_main(["--m", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--m: an option of the paper's Dot; add --layout paper" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_the_rollout_denoiser_reads_v_models_and_extra_inputs_as_sampling_does():
    """A v-prediction model (and one that takes SDXL-style ``y``) guided through GuidedDenoiser gives the denoised
    estimate of the eps model it was made from: rollouts on SD2.x-v and SDXL checkpoints sample what ComfyUI does."""
    from morse_engine.parameterization import DiscreteSchedule
    from training.evaluation.samplers import GuidedDenoiser
    from training.reference.unet import sd_alphas_cumprod

    ms = DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    seen = []

    def eps_model(x, t, context=None, y=None):
        seen.append(y)
        return torch.tanh(x * 0.5 + context.mean() + t.reshape(-1, 1, 1, 1) / 1000)

    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor(3.0)

    def v_model(x, t, context=None, y=None):  # v = eps sqrt(sigma^2 + 1) - x_scaled sigma, at the call's sigma
        return eps_model(x, t, context, y) * (sigma**2 + 1) ** 0.5 - x * sigma

    cond, uncond = torch.ones(2, 3, 5), torch.zeros(2, 3, 5)
    y = torch.arange(4.0).reshape(4, 1)
    want = GuidedDenoiser(eps_model, ms, cond, uncond, 2.5, kwargs={"y": y})(x, sigma)
    got = GuidedDenoiser(v_model, ms, cond, uncond, 2.5, prediction="v", kwargs={"y": y})(x, sigma)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(s, y) for s in seen)  # the [cond, uncond] batch's y reached every call
    GuidedDenoiser(eps_model, ms, cond, uncond, 1.0, kwargs={"y": y})(x, sigma)
    assert torch.equal(seen[-1], y[:2])  # cfg 1: the cond half alone


def test_the_held_out_score_is_a_ratio_of_summed_errors_not_a_mean_of_ratios():
    """A run whose reuse error is tiny by its luck must not swing the score: each run weighs by its error."""
    from training.trainer.rollout import held_out_error

    class Ends:  # a run ends where its "end" says, whatever the fill
        def end(self, run, filler):
            return run["end"]

    runs = [{"plain": torch.zeros(4), "end": torch.full((4,), 0.5 ** 0.5), "reuse_err": 1.0},
            {"plain": torch.zeros(4), "end": torch.full((4,), 0.02 ** 0.5), "reuse_err": 0.01}]
    assert held_out_error(Ends(), runs, None) == pytest.approx((0.5 + 0.02) / (1.0 + 0.01))  # a mean of ratios: 1.25


def test_rollout_targets_are_kept_for_their_own_dash_only(setup, tmp_path):
    """The cached targets are one Dash's runs: the same settings with another Dash (or other weights) under the
    same run folder make them again rather than train on the first Dash's ends."""
    from dataclasses import replace

    config = RolloutConfig(steps=1, **{**TINY, "runs": 1, "fixed_runs": 1})
    cache, logged = tmp_path / "rollout-targets.safetensors", []
    targets_for(setup, config, Rollouts(setup, "cpu"), cache, log=logged.append)
    targets_for(setup, config, Rollouts(setup, "cpu"), cache, log=logged.append)
    assert len(logged) == 1 and "from" in logged[0]  # the second call read the cache
    other = replace(setup, fingerprint=replace(setup.fingerprint, architecture="another-backbone"))
    targets_for(other, config, Rollouts(other, "cpu"), cache, log=logged.append)
    assert len(logged) == 1  # made again (a cache hit would have logged)
