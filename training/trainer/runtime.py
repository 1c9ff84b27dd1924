"""Where and how cheaply a Dot trains: device, mixed precision, gradient checkpointing.

These settings change the cost of a run, not what it learns (up to rounding), so they are
not fields of ``DotTrainConfig``: a run may resume on another device or in another precision.
(Gradient accumulation is a config field: it changes the batch of an optimizer step.)

* Precision: autocast for the Dash forwards and for the Dot's forward/backward; the frozen
  backbone and the trainable weights stay in float32 (LoRA updates are far below bf16/fp16
  resolution of the weights they would be added to). fp16 needs loss scaling (its range
  underflows small gradients), done with ``torch.amp.GradScaler``; bf16 has float32's range.
* Gradient checkpointing wraps only the backbone call inside the Dot: that call holds most of
  the activations the LoRA backward needs (the whole UNet at 1/2^m per side) and it is rerun
  in the backward instead; the light blocks' activations are small and are kept.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"
    grad_checkpointing: bool = False

    def __post_init__(self):
        check_precision(self.precision, self.device)

    def autocast(self):
        """The context for model calls: autocast to the precision's dtype, or nothing in fp32
        (so the fp32 path runs exactly the operations it ran before these options existed)."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def backbone_call(self, backbone):
        """The Dot's ``backbone_call``: the backbone under non-reentrant checkpointing, or None
        (the Dot then calls the backbone itself). Non-reentrant: it works with keyword arguments
        (context, SDXL's y) and with inputs that do not require grad, and keeps autocast on the rerun."""
        if not self.grad_checkpointing:
            return None

        def call(x, timesteps, context=None, **kwargs):
            return checkpoint(backbone, x, timesteps, context=context, use_reentrant=False, **kwargs)

        return call

    def describe(self) -> str:
        return f"{self.device}, {self.precision}" + (", gradient checkpointing" if self.grad_checkpointing else "")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None, local_rank: Optional[int] = None) -> torch.device:
    """``device`` (a name or torch.device; default: CUDA where available, else the CPU). A CUDA
    device without an index is the launcher's ``local_rank`` GPU, else the current one."""
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asks for CUDA, but this torch ({torch.__version__}) sees no CUDA device; "
                             "use --device cpu or a CUDA build of torch on a machine with a GPU")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {dev} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def cuda_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU (Ampere or newer). torch also reports emulated bf16 as supported
    on older GPUs, where it is slower than fp16; that does not count here."""
    with torch.cuda.device(device):  # the check reads the current device
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no emulation flag and reports native support only
            return torch.cuda.is_bf16_supported()


def default_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if cuda_bf16(device) else "fp16"
    return "fp32"  # CPU bf16 is slower than fp32 on most CPUs; opt in with --precision bf16


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {PRECISIONS}")
    if precision == "fp32":
        return
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--precision {precision} is supported here on CUDA and the CPU, not on {device}; use --precision fp32")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 needs a CUDA device (fp16 training with loss scaling); on the CPU "
                         "use --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16(device):
        raise ValueError(f"--precision bf16 is not supported by {torch.cuda.get_device_name(device)} (no native bf16); "
                         "use --precision fp16 (with loss scaling) or fp32")


def resolve(device=None, precision: Optional[str] = None, grad_checkpointing: Optional[bool] = None,
            local_rank: Optional[int] = None) -> Runtime:
    """A Runtime with every unset option at its default for the device: bf16 (fp16 where the GPU
    has no bf16) and checkpointing on CUDA, where memory is what limits the batch; fp32 and no
    checkpointing on the CPU, where the extra backbone pass would only cost time."""
    dev = resolve_device(device, local_rank)
    precision = precision or default_precision(dev)
    check_precision(precision, dev)
    if grad_checkpointing is None:
        grad_checkpointing = dev.type == "cuda"
    return Runtime(dev, precision, bool(grad_checkpointing))
