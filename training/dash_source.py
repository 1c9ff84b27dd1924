"""Where a training run's Dash comes from, as the command names it, and the :class:`DashSetup` made from it.

Either the project's reference model (the embedded default, or other weights in its format) on the digits, or
the user's checkpoint loaded by ComfyUI, with its data: prompts (data-free, on Dash's own sampling runs) or
captioned images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .host.checkpoint import TrajectorySettings
from .host.comfy_setup import comfy_setup
from .trainer.dash_setup import DashSetup, reference_setup


@dataclass(frozen=True)
class ReferenceDash:
    """The reference model: ``weights`` in its own format (None: the embedded one), trained on ``data``."""

    weights: Optional[Path] = None
    data: str = "digits"

    is_checkpoint = False

    def describe_data(self) -> str:
        return self.data


@dataclass(frozen=True)
class CheckpointDash:
    """A ComfyUI checkpoint and its training data: ``prompts`` (data-free) or ``images``, exactly one."""

    checkpoint: Path
    prompts: Optional[Path] = None
    images: Optional[Path] = None
    comfyui: Optional[str] = None  # the ComfyUI folder (None: $COMFYUI_PATH, else the one this pack is in)
    resolution: Optional[int] = None  # pixels (None: the family's own)
    trajectory: TrajectorySettings = field(default_factory=TrajectorySettings)  # the data-free runs
    frames: int = 33  # a video family's clip length (ComfyUI's Wan templates' 33 frames); image families ignore it
    # a diffusion model alone (UNETLoader's file) is read with its text encoders, as CLIPLoader / DualCLIPLoader
    text_encoders: tuple = ()
    clip_type: Optional[str] = None  # CLIPLoader's "type" (None: the family's)
    vae: Optional[Path] = None  # VAELoader's file, for --images

    is_checkpoint = True

    def __post_init__(self):
        if (self.prompts is None) == (self.images is None):
            raise ValueError(
                f"--checkpoint {self.checkpoint} is a ComfyUI checkpoint: give the training data with --prompts FILE "
                "(one prompt per line, data-free) or --images DIR (images with name.txt captions), one of them"
            )

    def describe_data(self) -> str:
        return f"prompts {self.prompts}" if self.prompts is not None else f"images {self.images}"


DashSource = Union[ReferenceDash, CheckpointDash]


def open_dash(source: DashSource, run_dir: Path, device="cpu") -> DashSetup:
    """The setup of ``source`` with its UNet (and conditioning tables) on ``device``; a checkpoint's latents and
    text embeddings are cached under ``run_dir``."""
    if not source.is_checkpoint:
        return reference_setup(source.weights, device)
    return comfy_setup(Path(source.checkpoint), run_dir, prompts=source.prompts, images=source.images,
                       resolution=source.resolution, frames=source.frames, text_encoders=source.text_encoders,
                       clip_type=source.clip_type, vae=source.vae, comfyui=source.comfyui,
                       trajectory=source.trajectory,
                       device=str(device))


def is_reference_weights(path: Path) -> bool:
    """The project's own reference-Dash format (safetensors whose metadata holds its UNet's or DiT's config)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return '"unet"' in meta.get("config", "") or '"dit"' in meta.get("config", "")
