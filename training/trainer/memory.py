"""How much memory a Dot training run needs, estimated before it starts.

    weights of Dash (frozen, at their dtype)
  + the Dot's weights, the LoRA in the backbone, their gradients and AdamW's two moments (fp32)
  + activations of one sample, measured, x the micro-batch

The activations are measured on one sample (a CFG pair) rather than computed from layer
shapes, so they follow whatever the backbone, the precision and gradient checkpointing do:
on CUDA as the peak memory of a Dot forward/backward (and of a Dash forward) above what was
allocated before; elsewhere as the bytes of the tensors autograd saves for the backward,
which is what a forward/backward keeps alive. Scaling one sample to a micro-batch is linear,
so this is an estimate, not a bound (allocator caching and workspaces come on top on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

GiB, MiB = 2**30, 2**20


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_tensor_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for the backward while ``forward`` runs.

    Counted per storage, once (views and tensors saved by several ops share one), leaving out
    the storages of ``exclude`` (weights, counted as weights). Tensors saved inside a
    non-reentrant checkpoint go to the checkpoint's own hooks and are not kept, so they are
    rightly not counted here.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set = set()
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out  # the graph and what it saved are freed here
    return total


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def activation_bytes(loss_fn: Callable[[], torch.Tensor], params: list, device: torch.device,
                     no_grad_fns: Iterable[Callable[[], object]] = (), exclude: Iterable[torch.Tensor] = ()) -> tuple[int, str]:
    """(bytes, how measured) of one forward/backward of ``loss_fn`` with respect to ``params``.

    The backward uses ``torch.autograd.grad`` so that no ``.grad`` is left on the parameters.
    On CUDA the peaks of ``no_grad_fns`` (Dash's own passes) count too: at full resolution and
    twice the Dot's batch they can need more than the Dot's backward.
    """
    if device.type == "cuda":
        def step():
            torch.autograd.grad(loss_fn(), params, allow_unused=True)

        peaks = [cuda_peak_bytes(step, device)]
        with torch.no_grad():
            peaks += [cuda_peak_bytes(fn, device) for fn in no_grad_fns]
        return max(peaks), "CUDA peak of a batch of 1"
    return saved_tensor_bytes(loss_fn, exclude), "tensors saved for backward, batch of 1"


@dataclass
class MemoryEstimate:
    dash_bytes: int
    train_bytes: int  # Dot + LoRA weights, gradients, AdamW moments
    activation_bytes_per_sample: int
    micro_batch: int
    how: str = ""

    @property
    def activation_bytes(self) -> int:
        return self.activation_bytes_per_sample * self.micro_batch

    @property
    def total_bytes(self) -> int:
        return self.dash_bytes + self.train_bytes + self.activation_bytes

    def line(self) -> str:
        return (f"memory estimate: Dash weights {size(self.dash_bytes)}, Dot + LoRA + AdamW {size(self.train_bytes)}, "
                f"activations ~{size(self.activation_bytes)} per micro-batch of {self.micro_batch} -> "
                f"~{size(self.total_bytes)} per process (an estimate: activations measured as {self.how or 'one sample'}, "
                "scaled linearly)")


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def estimate(dash_params: Iterable[torch.Tensor], dot_params: Iterable[torch.Tensor], peft_lora: Iterable[torch.Tensor],
             trainable: Iterable[torch.Tensor], activation_per_sample: int, micro_batch: int, how: str = "") -> MemoryEstimate:
    """``dot_params``: all of the Dot's tensors (light blocks and its own LoRA copy); ``peft_lora``: the LoRA
    trained inside the backbone; ``trainable``: what AdamW updates. Each trainable tensor also has a
    gradient and two AdamW moments of its own size."""
    trainable = list(trainable)
    train = tensor_bytes(dot_params) + tensor_bytes(peft_lora) + 3 * tensor_bytes(trainable)
    return MemoryEstimate(tensor_bytes(dash_params), train, activation_per_sample, micro_batch, how)
