"""Data-parallel Dot training under an existing launcher: ``torchrun`` or ``accelerate launch``.

Both launchers start one process per device and describe the job in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); this module reads
that, joins the process group and gives the trainer the few collective operations it needs.
Without a launcher (or with ``WORLD_SIZE=1``) :func:`from_env` returns ``None`` and the trainer
runs its single-process path untouched.

Why an explicit all-reduce of the gradients and not ``DistributedDataParallel``: the Dot's
trainable parameters live in two places, its light blocks and the LoRA that peft injects into
the frozen Dash backbone, which the Dot receives as a call argument. DDP wraps one module
and its forward, so it would need a made-up module holding the Dot and the whole backbone,
and it needs extra settings for reentrant gradient checkpointing (``static_graph``) and for
gradient accumulation (``no_sync``). Averaging the trainable gradients once per optimizer
step, before clipping, gives every rank the same gradient, so with the same start weights
and the same optimizer every rank stays bit-identical. The cost: communication does not
overlap the backward pass, which for an adapter of about 10% of Dash's parameters is one
all-reduce of that size per step.

The rank's device (:attr:`DataParallel.device`) is where a setup should put its models;
:func:`from_env` also makes it the current CUDA device, so code that asks for "cuda" gets it.
``train_dot --device cuda`` (the default where CUDA exists) trains each rank on ``cuda:LOCAL_RANK``.
With gradient accumulation the all-reduce runs once per optimizer step, after the last
micro-batch, not once per micro-batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

# Rank streams are spread by the 64-bit golden ratio so that nearby seeds and ranks never
# share a stream; rank 0 keeps the run's seed, so its data are those of a single-process run.
_STREAM_STRIDE = 0x9E3779B97F4A7C15
# Gradients are reduced in buckets of about this many elements (64 MB in float32), so the
# flat copy stays small next to the model even for an SDXL-sized adapter.
_BUCKET_ELEMENTS = 1 << 24


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} says this is a data-parallel run, but {name} is not set; "
                "start the run with `torchrun --nproc_per_node=N -m training.train_dot ...` or `accelerate launch`, "
                "which set it, or unset WORLD_SIZE to train in one process"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} is not an integer; it should be set by torchrun or accelerate launch") from None


def world_size() -> int:
    """The launcher's ``WORLD_SIZE``; 1 without a launcher."""
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> Optional[int]:
    """The launcher's ``LOCAL_RANK`` (this process's GPU on its machine); None without a launcher."""
    return _env_int("LOCAL_RANK") if world_size() > 1 else None


def is_main_process() -> bool:
    """Rank 0 of a launcher's run, or a run without a launcher: the process that prints and writes."""
    return world_size() <= 1 or _env_int("RANK") == 0


def stream_seed(seed: int, rank: int) -> int:
    """Seed of the data stream of ``rank``: different per rank, the same on every rerun."""
    return (seed + rank * _STREAM_STRIDE) % (1 << 64)


@dataclass
class DataParallel:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # where this rank should train: its own GPU, or the CPU
    owns_group: bool  # we initialised the process group, so we also tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def stream_seed(self, seed: int) -> int:
        return stream_seed(seed, self.rank)

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (identical start weights)."""
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over the ranks.

        A parameter with no gradient on this rank counts as zeros, so every rank still
        applies the same update (the Dot's graph is the same on every rank, so this does
        not happen in practice).
        """
        params = [p for p in params if p.requires_grad]
        # Reduce per (device, dtype): a collective needs one of each.
        groups: dict[tuple, list] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
        for group in groups.values():
            bucket: list = []
            size = 0
            for p in group:
                bucket.append(p)
                size += p.numel()
                if size >= _BUCKET_ELEMENTS:
                    self._reduce_bucket(bucket)
                    bucket, size = [], 0
            if bucket:
                self._reduce_bucket(bucket)

    def _reduce_bucket(self, params: list) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over the ranks. A NaN on any rank makes it NaN on all of them,
        so every rank stops at the same step instead of leaving the others waiting."""
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def share_rows(self, rows: list[dict], fields: tuple) -> None:
        """Fill ``fields`` of every row from the rank that made it (row i by rank i % world_size), in place."""
        mine = {i: {f: rows[i][f] for f in fields} for i in range(self.rank, len(rows), self.world_size)}
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        for made in everyone:
            for i, values in made.items():
                rows[i].update(values)

    def gather_generator_states(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Every rank's data-generator state, in rank order (for rank 0's checkpoint)."""
        state = generator.get_state()
        states = [torch.empty_like(state) for _ in range(self.world_size)]
        dist.all_gather(states, state)
        return states

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def from_env(use_cuda: Optional[bool] = None) -> Optional[DataParallel]:
    """Join the launcher's process group, or return ``None`` for a single-process run.

    ``use_cuda``: give each rank its own GPU (default: where CUDA is available); ``False``
    keeps every rank on the CPU with gloo, as the tests do on any machine.

    The backend is NCCL for CUDA tensors and gloo for CPU tensors (both are registered where
    CUDA is present, so a run whose model stays on the CPU still works). The rank's GPU is
    made the current CUDA device before any model is built, so code that places models on
    "the" GPU (ComfyUI's model management) puts each rank on its own.
    """
    n = world_size()
    if n <= 1:
        return None
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns = False
    if dist.is_initialized():
        # Accelerate (or a caller) already joined the group: use it as it is.
        if dist.get_world_size() != n or dist.get_rank() != rank:
            raise RuntimeError(
                f"a process group of {dist.get_world_size()} ranks (this is rank {dist.get_rank()}) is already set up, "
                f"but the environment says WORLD_SIZE={n}, RANK={rank}; start the run with one launcher"
            )
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={n} but {name} is not set; start the run with "
                    "`torchrun --nproc_per_node=N -m training.train_dot ...` or `accelerate launch`"
                )
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=n)
        owns = True
    return DataParallel(rank=rank, world_size=n, local_rank=local_rank, device=device, owns_group=owns)


def join(parallel: Optional[DataParallel], device: torch.device) -> tuple[Optional[DataParallel], bool]:
    """(the process group, whether this call joined it): ``parallel``, else the launcher's where there is one."""
    if parallel is None and world_size() > 1:
        return from_env(use_cuda=device.type == "cuda"), True
    return parallel, False
