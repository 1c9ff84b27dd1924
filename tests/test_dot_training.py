"""The Dot trainer on a tiny backbone: it learns, resumes exactly, and stops cleanly on NaN."""
import copy

import pytest
import torch

from tiny_models import TinyBackbone
from morse_engine import fingerprint_module
from training.trainer.dash_setup import DashSetup
from training.trainer.config import DotTrainConfig
from training.trainer.loop import peft_adapters, train_dot, training_tuple
from training.trainer.optim import TrainingDiverged
from morse_engine.parameterization import DiscreteSchedule
from training.reference.unet import sd_alphas_cumprod


def tiny_setup(poison_after=None, kill_after=None):
    unet = TinyBackbone(in_channels=1, model_channels=16, context_dim=8).eval().requires_grad_(False)
    table = torch.randn(11, 2, 8, generator=torch.Generator().manual_seed(0))
    data = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    labels = torch.arange(64) % 10

    def batches(batch_size, gen):
        step = 0
        while True:
            idx = torch.randint(0, len(data), (batch_size,), generator=gen)
            x = data[idx].clone()
            step += 1
            if kill_after is not None and step > kill_after:
                raise KeyboardInterrupt  # the user or the machine stops the run
            if poison_after is not None and step > poison_after:
                x[0, 0, 0, 0] = float("nan")
            yield x, labels[idx]

    return DashSetup(
        unet=unet,
        sampling=DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod()),
        encode=lambda c: table[c],
        null_condition=lambda b: torch.full((b,), 10),
        batches=batches,
        base_family="tiny",
        fingerprint=fingerprint_module(unet),
        latent_shape=(1, 8, 8),
    )


CFG = dict(m=1, lora_rank=2, batch_size=8, lr=3e-3, warmup=2, jump_min=5, jump_max=200, checkpoint_every=5)


def fixed_batch(setup):
    gen = torch.Generator().manual_seed(123)
    x0, cond = next(setup.batches(16, gen))
    with torch.no_grad(), peft_adapters(setup.unet, False):
        return training_tuple(setup, x0, cond, DotTrainConfig.of(**CFG, steps=1), gen)


def eval_loss(dot, unet, batch):
    with torch.no_grad():
        pred = dot(unet, batch.x, batch.t, batch.anchor_x, batch.anchor_z, batch.anchor_t, context=batch.context,
                   sigma=batch.sigma, anchor_sigma=batch.anchor_sigma)
    return torch.nn.functional.mse_loss(pred, batch.target).item()


def test_training_lowers_the_loss_below_reusing_the_anchor(tmp_path):
    setup = tiny_setup()
    batch = fixed_batch(setup)
    reuse = torch.nn.functional.mse_loss(batch.anchor_z, batch.target).item()
    result = train_dot(setup, DotTrainConfig.of(**CFG, steps=150), tmp_path / "s.safetensors", progress=False)
    clean = tiny_setup().unet
    trained = eval_loss(result.dot, clean, batch)
    assert trained < 0.9 * reuse, (trained, reuse)
    assert all(not m._forward_hooks for m in clean.modules())
    # every 50 steps the loss and the reuse baseline of the same batches, for the file's loss curve
    loss, base = result.summary["history"], result.summary["reuse_history"]
    assert len(loss) == len(base) == 3 and loss[-1] / base[-1] < loss[0] / base[0]


def test_the_fixed_set_curve_starts_at_reuse_and_falls_and_resumes_unchanged(tmp_path):
    from training.trainer import loop

    # base "anchor": the untrained Dot is reusing the anchor, so its first point is the reuse loss
    cfg = DotTrainConfig.of(**CFG, base="anchor", steps=10)
    setup = tiny_setup()
    state = tmp_path / "b.safetensors"
    # scored at the start, every FIXED_SET_EVERY steps and at the end: here every 4 steps
    every = loop.FIXED_SET_EVERY
    loop.FIXED_SET_EVERY = 4
    try:
        straight = train_dot(setup, cfg, tmp_path / "a.safetensors", progress=False).summary["fixed_history"]
        with pytest.raises(KeyboardInterrupt):
            train_dot(tiny_setup(kill_after=7), cfg, state, progress=False)
        resumed = train_dot(tiny_setup(), cfg, state, resume=True, progress=False).summary["fixed_history"]
    finally:
        loop.FIXED_SET_EVERY = every
    assert [s for s, _, _ in straight] == [0, 4, 8, 10]
    start, reuse = straight[0][1], straight[0][2]
    assert start == pytest.approx(reuse, rel=1e-6)  # an untrained Dot is reusing the anchor
    assert all(r == reuse for _, _, r in straight)  # the set is fixed: its reuse loss never moves
    assert straight[-1][1] < start
    # the set does not depend on the training stream: a resumed run scores the same set, the same Dot
    assert [s for s, _, _ in resumed] == [0, 4, 8, 10]
    for a, b in zip(straight, resumed):
        assert a[1] == pytest.approx(b[1], rel=1e-4) and a[2] == b[2]


def test_dash_targets_are_computed_without_the_lora(tmp_path):
    setup = tiny_setup()
    clean = copy.deepcopy(setup.unet)
    train_dot(setup, DotTrainConfig.of(**CFG, steps=10), tmp_path / "s.safetensors", progress=False)
    x, t, ctx = torch.randn(2, 1, 8, 8), torch.full((2,), 300.0), torch.randn(2, 2, 8)
    with torch.no_grad():
        with peft_adapters(setup.unet, False):
            off = setup.unet(x, t, context=ctx)
        on = setup.unet(x, t, context=ctx)
    assert torch.equal(off, clean(x, t, context=ctx))
    assert not torch.allclose(on, off)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    straight = train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=10), tmp_path / "a.safetensors", progress=False)
    state = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_dot(tiny_setup(kill_after=7), DotTrainConfig.of(**CFG, steps=10), state, progress=False)
    resumed = train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=10), state, resume=True, progress=False)
    assert resumed.resumed_from == 5
    for (k, a), (_, b) in zip(straight.dot.state_dict().items(), resumed.dot.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_resume_with_other_settings_or_no_checkpoint_is_refused(tmp_path):
    state = tmp_path / "s.safetensors"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=5), state, resume=True, progress=False)
    train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=5), state, progress=False)
    other = dict(CFG, lr=1e-2)
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        train_dot(tiny_setup(), DotTrainConfig.of(**other, steps=10), state, resume=True, progress=False)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    state = tmp_path / "s.safetensors"
    with pytest.raises(TrainingDiverged, match=r"step 8.*step 5.*Lower --lr"):
        train_dot(tiny_setup(poison_after=7), DotTrainConfig.of(**CFG, steps=20), state, progress=False)
    from safetensors import safe_open

    with safe_open(str(state), "pt") as f:
        assert f.metadata()["step"] == "5"


def test_step_weighting_counts_each_tuple_by_its_sigma_step():
    from morse_engine.training_tuples import weighted_mse

    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 3 * torch.ones(1, 2, 2)])
    steps = torch.tensor([1.0, 3.0])
    assert weighted_mse(pred, target, steps, "none").item() == pytest.approx((1 + 9) / 2)
    assert weighted_mse(pred, target, steps, "step").item() == pytest.approx((1 * 1 + 9 * 3) / 4)


def test_cli_resume_without_a_checkpoint_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    from training import train_dot as cli

    code = cli.main(["--layout", "paper", "--resume", "--name", "nothing_here", "--runs", str(tmp_path), "--steps", "1",
                     "--out", str(tmp_path / "dot.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "no checkpoint" in err
    assert not (tmp_path / "dot.safetensors").exists()


def test_guided_loss_sees_errors_that_cfg_amplifies_and_reuse_errors_that_cancel():
    from types import SimpleNamespace

    from morse_engine.training_tuples import LossRecipe as Cfg
    from morse_engine.training_tuples import dot_loss

    target = torch.zeros(4, 1, 2, 2)  # [cond, cond, uncond, uncond]
    batch = SimpleNamespace(target=target, sigma_step=torch.ones(4), guidance=torch.tensor([3.0, 3.0]))
    same = torch.ones(4, 1, 2, 2)  # both branches off by +1: the guided estimate is off by 1
    opposite = torch.cat([torch.ones(2, 1, 2, 2), -torch.ones(2, 1, 2, 2)])  # guided off by -1 + 3 * (1 - -1) = 5
    branches, guided = Cfg(loss_on="branches"), Cfg()
    assert dot_loss(same, batch, branches).item() == pytest.approx(1.0)
    assert dot_loss(opposite, batch, branches).item() == pytest.approx(1.0)
    assert dot_loss(same, batch, guided).item() == pytest.approx(1.0 + 1.0)
    assert dot_loss(opposite, batch, guided).item() == pytest.approx(1.0 + 25.0)
    with pytest.raises(ValueError, match="loss_on"):
        Cfg(loss_on="both")


def test_cli_empty_cfg_range_is_a_clear_error(tmp_path, capsys):
    from training import train_dot as cli

    code = cli.main(["--layout", "paper", "--cfg-min", "5", "--cfg-max", "2", "--runs", str(tmp_path), "--steps", "1",
                     "--out", str(tmp_path / "dot.safetensors")])
    assert code == 2
    assert "CFG range 5.0..2.0 is empty" in capsys.readouterr().err
    assert not (tmp_path / "dot.safetensors").exists()


def test_extrapolating_base_tuples_carry_the_dash_estimate_before_the_anchor():
    setup = tiny_setup()
    gen = torch.Generator().manual_seed(11)
    x0, cond = next(setup.batches(64, gen))
    with torch.no_grad():
        batch = training_tuple(setup, x0, cond, DotTrainConfig.of(**{**CFG, "base": "extrapolate"}, steps=1), gen)
    assert batch.prev_z.shape == batch.anchor_z.shape and batch.prev_t.shape == batch.anchor_t.shape
    later = batch.prev_t - batch.anchor_t
    assert (later >= 0).all()
    first = later == 0  # a run's first Dash step: no earlier estimate, the extrapolated change is zero
    assert 0 < first.sum() < len(first) / 2
    assert not torch.equal(batch.prev_z[~first], batch.anchor_z[~first])
    anchor_only = DotTrainConfig.of(**CFG, base="anchor", steps=1)
    assert training_tuple(setup, x0, cond, anchor_only, torch.Generator().manual_seed(11)).prev_z is None


def test_cli_base_is_extrapolate_except_for_the_no_trajectory_ablation(tmp_path, capsys):
    from training import train_dot as cli

    from training.trainer.config import config_from_options

    p = cli.parser()
    assert config_from_options(cli.options_given(p.parse_args([]))).dot.base == "extrapolate"
    assert config_from_options(cli.options_given(p.parse_args(["--no-trajectory"]))).dot.base == "anchor"
    assert config_from_options(cli.options_given(p.parse_args(["--base", "anchor"]))).dot.base == "anchor"
    rc = cli.main(["--layout", "paper", "--no-trajectory", "--base", "extrapolate", "--steps", "1", "--out", str(tmp_path / "x.safetensors"),
                   "--runs", str(tmp_path)])
    assert rc == 2 and "--base anchor" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("layout,flags", [("paper", ["--batch-size", "2"]),
                                          ("feature", ["--rollout-runs", "1", "--rollout-batch", "1", "--rollout-steps", "2,3",
                                                       "--compare-samples", "0"])])
def test_the_reference_run_writes_its_own_file_beside_the_committed_dot(tmp_path, monkeypatch, capsys, layout, flags):
    """The default run is shorter than the committed reference Dot's: it must not write over it."""
    from training import train_dot as cli

    committed = tmp_path / "reference_digits.safetensors"
    committed.write_bytes(b"the committed Dot")
    monkeypatch.setattr(cli, "DOT_DIR", tmp_path)
    assert cli.main(["--layout", layout, "--steps", "1", *flags, "--n-batch", "2", "--runs", str(tmp_path / "runs")]) == 0
    assert committed.read_bytes() == b"the committed Dot"
    assert (tmp_path / "reference_digits_trained.safetensors").is_file()
    assert "reference_digits_trained.safetensors" in capsys.readouterr().out
