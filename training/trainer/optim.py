"""What both layouts' loops do to their weights each step: the learning-rate schedule, the optimizer step with
its loss scaling and gradient clipping, and the error of a loss that stopped being finite (the loops themselves are ``loop.py``, the paper's, and ``rollout.py``, the
feature Dot's)."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Protocol

import torch

CLIP_NORM = 1.0  # the gradient norm both layouts clip to


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


class Schedule(Protocol):
    """A config with a schedule: ``DotTrainConfig`` and ``RolloutConfig`` both are."""

    lr: float
    warmup: int
    steps: int


def lr_at(step: int, config: Schedule) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 5% of the peak at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, step: int, config: Schedule) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)


def backward(loss: torch.Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    """Gradients of ``loss`` into ``.grad``; in fp16 scaled, so that small gradients do not underflow."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                   scaler: Optional[torch.amp.GradScaler]) -> None:
    """One step on the gradients that ``backward`` left: unscaled (fp16), clipped to CLIP_NORM, applied. With a
    scaler the step is skipped where the fp16 gradients overflowed, and the scale then shrinks."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
