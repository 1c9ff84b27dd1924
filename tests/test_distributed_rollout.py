"""Data-parallel rollout training of the feature Dot (``train_dot``'s default layout): 2 CPU processes (gloo),
started the way torchrun starts them, on the reference UNet at a tiny setting."""
import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from training.reference.blocks import ReferenceBlocks
from training.trainer import distributed
from training.trainer.dash_setup import reference_setup
from training.trainer.optim import optimizer_step, set_lr
from training.trainer.rollout import RolloutConfig, Rollouts, relative_end_error, targets_for, train_feature_dot
from morse_engine import FeatureDot, FeatureDotConfig, FeatureDotFiller
from test_distributed_training import TIMEOUT_S, _free_port

WORLD = 2
TINY = dict(runs=3, fixed_runs=2, batch=2, min_steps=4, max_steps=6, fixed_every=2, checkpoint_every=2, lr=1e-2,
            warmup=1, steps=4, dot=FeatureDotConfig(width=8))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from pathlib import Path

    import training.trainer.rollout as rollout

    writes = []
    real_save = rollout.save_state
    rollout.save_state = lambda path, *a, **k: (writes.append(str(path)), real_save(path, *a, **k))
    dp = distributed.from_env(use_cuda=False)
    try:
        setup = reference_setup()
        result = train_feature_dot(setup, ReferenceBlocks(setup.unet), RolloutConfig(**TINY),
                                   Path(out) / "run" / "train-state.safetensors", log=lambda *_: None, parallel=dp)
    finally:
        dp.close()
    meta = {"writes": json.dumps(writes), "fixed": json.dumps(result.summary["fixed_history"])}
    save_file({k: v.contiguous() for k, v in result.dot.state_dict().items()}, str(Path(out) / f"rank{rank}.safetensors"),
              metadata=meta)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("rollout-ddp")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {WORLD} rollout-training processes did not finish in {TIMEOUT_S} s")
    ranks = []
    for r in range(WORLD):
        with safe_open(str(out / f"rank{r}.safetensors"), "pt") as f:
            ranks.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    return out, ranks


@pytest.fixture(scope="module")
def setup():
    return reference_setup()


@pytest.fixture
def one_thread():
    """The ranks ran on one thread each; the same here, so that float sums are taken in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_both_ranks_hold_the_same_dot_and_only_rank_0_writes(two_ranks):
    out, ((w0, m0), (w1, m1)) = two_ranks
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert json.loads(m1["writes"]) == [] and len(json.loads(m0["writes"])) == 2  # steps 2 and 4
    assert m0["fixed"] == m1["fixed"]  # the held-out score is the ranks' shared sum
    with safe_open(str(out / "run" / "train-state.safetensors"), "pt") as f:
        assert {f"rng.generator.rank{r}" for r in range(WORLD)} <= set(f.keys())


def test_the_targets_made_by_two_ranks_are_a_single_process_s(two_ranks, setup, tmp_path, one_thread):
    out, _ = two_ranks
    config = RolloutConfig(**TINY)
    single = targets_for(setup, config, Rollouts(setup, "cpu"), tmp_path / "t.safetensors", log=lambda *_: None)
    shared = targets_for(setup, config, Rollouts(setup, "cpu"), out / "run" / "rollout-targets.safetensors",
                         log=lambda *_: None)
    for part in ("train", "fixed"):
        for a, b in zip(single[part], shared[part]):
            assert torch.equal(a["plain"], b["plain"]) and a["reuse_err"] == b["reuse_err"]


def test_two_ranks_train_as_one_process_averaging_both_ranks_runs_each_step(two_ranks, setup, tmp_path, one_thread):
    """Each step, rank r trains on a run from its own stream; the averaged gradient is the mean of the two runs'
    gradients, which one process accumulates here by hand and steps on with the same optimizer."""
    _, ((w0, _), _) = two_ranks
    config = RolloutConfig(**TINY)
    torch.manual_seed(config.seed)
    dot = FeatureDot.build(setup.unet, config.dot.bound_to(setup.unet, setup.prediction)).train().requires_grad_(True)
    filler, rollouts = FeatureDotFiller(ReferenceBlocks(setup.unet), dot), Rollouts(setup, "cpu")
    runs = targets_for(setup, config, rollouts, tmp_path / "t.safetensors", log=lambda *_: None)["train"]
    opt = torch.optim.AdamW(dot.parameters(), lr=config.lr, weight_decay=0.0)
    gens = [torch.Generator().manual_seed(distributed.stream_seed(config.seed + 1, r)) for r in range(WORLD)]
    picked = []
    for step in range(config.steps):
        set_lr(opt, step, config)
        idx = [int(torch.randint(0, len(runs), (), generator=g)) for g in gens]
        picked.append(idx)
        opt.zero_grad()
        for i in idx:  # each run's backward before the next run's forward, as on the ranks
            (relative_end_error(rollouts, runs[i], filler) / WORLD).backward()
        optimizer_step(opt, dot.parameters(), None)
    assert any(a != b for a, b in picked), picked  # the ranks trained on different runs
    for k, v in dot.state_dict().items():
        torch.testing.assert_close(w0[k], v, atol=1e-6, rtol=1e-4)


def test_one_process_does_not_resume_a_two_process_run(two_ranks, setup):
    out, _ = two_ranks
    with pytest.raises(ValueError, match="2 process"):
        train_feature_dot(setup, ReferenceBlocks(setup.unet), RolloutConfig(**TINY),
                          out / "run" / "train-state.safetensors", resume=True, log=lambda *_: None)
