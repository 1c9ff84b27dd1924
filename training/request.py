"""What ``python -m training.train_dot`` asks for, typed: the command turns its flags into one
:class:`TrainRequest` and hands it to the layout's trainer (``training.trainer.feature_layout`` or
``training.trainer.paper_layout``); nothing below the command sees its flags."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .dash_source import DashSource
from .trainer.config import DotTrainConfig
from .trainer.rollout import RolloutConfig
from .trainer.runtime import Runtime

LAYOUTS = ("feature", "paper")


@dataclass(frozen=True)
class RunFiles:
    """A run's files: its name, the Dot it writes, and its resumable checkpoint (whose folder also keeps the
    run's caches: rollout targets, a checkpoint's latents and text embeddings)."""

    name: str
    dot: Path
    state: Path

    @property
    def run_dir(self) -> Path:
        return self.state.parent


@dataclass(frozen=True)
class Measurements:
    """What the run measures on its Dot once trained: N on ``n_batch`` (a CFG batch), and for a feature Dot of
    the reference model the share of the reuse-to-Dash gap closed at ``compare_steps`` euler steps on
    ``compare_samples`` samples, as ``training.compare_fills`` measures it (0 samples: not measured)."""

    n_batch: int
    compare_samples: int = 32
    compare_steps: tuple = (6, 12, 20, 40)


@dataclass(frozen=True)
class TrainRequest:
    layout: str  # one of LAYOUTS
    dash: DashSource  # the Dash and its training data
    settings: Union[RolloutConfig, DotTrainConfig]  # the layout's Dot and its loop: RolloutConfig for "feature"
    files: RunFiles
    runtime: Runtime  # device, precision, gradient checkpointing
    measure: Measurements
    resume: bool = False
    cfg_given: bool = True  # the runs' CFG range was asked for (else a guidance-distilled Dash trains at CFG 1)

    def __post_init__(self):
        want = RolloutConfig if self.layout == "feature" else DotTrainConfig
        if self.layout not in LAYOUTS or not isinstance(self.settings, want):
            raise ValueError(f"layout {self.layout!r} takes a {want.__name__}, not a {type(self.settings).__name__}")
