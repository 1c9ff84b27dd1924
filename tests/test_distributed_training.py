"""Data-parallel Dot training: 2 CPU processes (gloo), started the way torchrun starts them.

Each worker gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and
joins through ``training.trainer.distributed.from_env``, the same call the CLI makes; one spawn runs
every scenario so the processes start (and import torch) only once.
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from morse_engine import PaperDot
from training.trainer import distributed
from training.trainer.config import DotTrainConfig
from training.trainer.loop import train_dot
from test_dot_training import CFG, tiny_setup

WORLD = 2
STEPS = 10
TIMEOUT_S = 120  # a collective that waits for a rank that never comes must fail the test, not hang it


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # the CI machine is small and shared
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from pathlib import Path

    from training.trainer import loop as dot_trainer
    from training.trainer.optim import TrainingDiverged

    out = Path(out)
    writes = []
    real_save = dot_trainer.save_state

    def counting_save(path, *args, **kwargs):
        writes.append(str(path))
        return real_save(path, *args, **kwargs)

    dot_trainer.save_state = counting_save
    dp = distributed.from_env(use_cuda=False)  # the CPU path, also where GPUs are present
    assert dp is not None and dp.rank == rank and dp.world_size == world and dp.device.type == "cpu"
    try:
        # gradient averaging on its own: rank r holds r + 1 everywhere
        p = torch.nn.Parameter(torch.zeros(5))
        p.grad = torch.full((5,), float(rank + 1))
        dp.average_gradients([p])
        cfg = DotTrainConfig.of(**CFG, steps=STEPS)
        straight = train_dot(tiny_setup(), cfg, out / "a.safetensors", progress=False, parallel=dp)
        try:
            train_dot(tiny_setup(kill_after=7), cfg, out / "b.safetensors", progress=False, parallel=dp)
        except KeyboardInterrupt:
            pass  # both ranks stop at step 8; the checkpoint of step 5 is on disk
        else:
            raise AssertionError("the killed run was not interrupted")
        resumed = train_dot(tiny_setup(), cfg, out / "b.safetensors", resume=True, progress=False, parallel=dp)
        # a NaN on rank 1 alone must stop both ranks at the same step, not leave rank 0 waiting
        try:
            train_dot(tiny_setup(poison_after=7 if rank == 1 else None), cfg, out / "c.safetensors", progress=False, parallel=dp)
        except TrainingDiverged as exc:
            diverged = str(exc)
        else:
            diverged = ""
    finally:
        dp.close()
    tensors = {f"straight.{k}": v for k, v in straight.dot.state_dict().items()}
    tensors.update({f"resumed.{k}": v for k, v in resumed.dot.state_dict().items()})
    tensors["grad"] = p.grad
    meta = {"writes": json.dumps(writes), "final_loss": repr(straight.final_loss), "resumed_from": str(resumed.resumed_from),
            "diverged": diverged}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"), metadata=meta)


def _spawn(out) -> None:
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"the {WORLD} training processes did not finish in {TIMEOUT_S} s (a rank waiting on a collective?)")


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _spawn(out)
    return out, [_read(out / f"rank{r}.safetensors") for r in range(WORLD)]


def _weights(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_gradients_are_averaged_over_the_ranks(two_ranks):
    _, ranks = two_ranks
    for tensors, _ in ranks:
        assert torch.equal(tensors["grad"], torch.full((5,), 1.5))


def test_both_ranks_end_with_identical_trained_weights(two_ranks):
    _, ((t0, m0), (t1, m1)) = two_ranks
    w0, w1 = _weights(t0, "straight."), _weights(t1, "straight.")
    assert w0.keys() == w1.keys() and w0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert m0["final_loss"] == m1["final_loss"]  # the logged loss is the mean over ranks

    setup = tiny_setup()
    cfg = DotTrainConfig.of(**CFG, steps=STEPS)
    torch.manual_seed(cfg.seed)  # how train_dot builds its start weights
    initial = PaperDot.build(setup.unet, cfg.dot.bound_to(setup.unet)).state_dict()
    moved = [k for k in w0 if not torch.equal(w0[k], initial[k])]
    assert len(moved) > len(w0) // 2, f"only {moved} changed"
    assert w0["out.weight"].abs().sum() > 0  # the zero-initialised output learned something


def test_the_result_is_not_a_single_process_run_on_rank_0s_data(two_ranks, tmp_path):
    # Rank 0 draws the single-process run's data; had rank 1's gradients not been averaged in,
    # rank 0 would end exactly where a single process ends.
    _, ((t0, _), _) = two_ranks
    single = train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=STEPS), tmp_path / "s.safetensors", progress=False)
    w0 = _weights(t0, "straight.")
    assert any(not torch.allclose(w0[k], v, atol=1e-4) for k, v in single.dot.state_dict().items())


def test_only_rank_0_writes_checkpoints_and_a_killed_run_resumes_on_every_rank(two_ranks):
    out, ranks = two_ranks
    (_, m0), (_, m1) = ranks
    assert json.loads(m1["writes"]) == []
    # straight run: steps 5 and 10; killed run: step 5; resumed run: step 10; diverged run: step 5
    written = [os.path.basename(p) for p in json.loads(m0["writes"])]
    assert written == ["a.safetensors"] * 2 + ["b.safetensors"] * 2 + ["c.safetensors"]
    with safe_open(str(out / "b.safetensors"), "pt") as f:
        assert {f"rng.generator.rank{r}" for r in range(WORLD)} <= set(f.keys())
    for tensors, meta in ranks:
        assert meta["resumed_from"] == "5"
        straight, resumed = _weights(tensors, "straight."), _weights(tensors, "resumed.")
        for k in straight:
            torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-5, msg=k)


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(two_ranks):
    _, ranks = two_ranks
    for _, meta in ranks:
        assert "at step 8" in meta["diverged"] and "step 5) is kept" in meta["diverged"], meta["diverged"]


def test_a_single_process_does_not_resume_a_two_process_checkpoint(two_ranks):
    out, _ = two_ranks
    with pytest.raises(ValueError, match="2 process"):
        train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=STEPS + 5), out / "a.safetensors", resume=True, progress=False)


def test_without_a_launcher_training_stays_single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.from_env() is None


def test_a_half_set_launcher_environment_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK is not set.*torchrun"):
        distributed.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="not an integer"):
        distributed.from_env()


def test_each_rank_has_its_own_reproducible_data_stream():
    assert distributed.stream_seed(7, 0) == 7  # rank 0 sees what a single process sees
    seeds = {distributed.stream_seed(s, r) for s in range(4) for r in range(8)}
    assert len(seeds) == 32
