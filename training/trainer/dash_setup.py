"""What Dot training needs to know about a Dash model, whatever its origin.

A :class:`DashSetup` bundles the frozen backbone (ComfyUI's diffusion-model call signature),
its noise schedule, how to turn a batch of conditions into cross-attention context (and
the empty condition used for classifier-free guidance), and a source of clean training
latents with their conditions. The reference model is one setup; a ComfyUI checkpoint is
another (issue 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from morse_engine import BackboneFingerprint, fingerprint_module

from morse_engine.parameterization import DiscreteSchedule, FlowSchedule


@dataclass
class DashSetup:
    unet: nn.Module
    sampling: DiscreteSchedule | FlowSchedule
    encode: Callable[[torch.Tensor], torch.Tensor]  # conditions [B] -> context [B, T, D]
    null_condition: Callable[[int], torch.Tensor]  # batch size -> conditions of the empty prompt
    batches: Callable[[int, torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (latents, conditions)
    base_family: str
    fingerprint: BackboneFingerprint
    latent_shape: tuple[int, int, int]
    # The backbone's native output: "eps" or "v" (ComfyUI's EPS / V_PREDICTION). Anchors and
    # targets stay native; only the sampler step that forms x_i converts to eps.
    prediction: str = "eps"
    # conditions [B] -> keyword arguments the backbone needs besides the context (SDXL's ``y``),
    # passed to every Dash call and to the Dot's backbone call. None: the context is all.
    extra_kwargs: Optional[Callable[[torch.Tensor], dict]] = None
    # Data-free training: when set, ``batches`` yields the unit noise a sampling run starts from
    # (not clean latents), and training_tuple calls this as (noise, conditions, generator) ->
    # (x_s, sigma_s [B]) to run Dash's own sampler with CFG to the anchor (under no_grad, LoRA off).
    trajectory: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple]] = None
    # sampled at CFG 1 (Flux dev / schnell: one cond a step); training runs do the same unless told otherwise
    guidance_distilled: bool = False
    # the backbone's forward adds to activations in place (ComfyUI's DiTs): training saves copies of them for backward
    inplace_forward: bool = False


def _translate(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Small random translations (with edge padding): the digits set is tiny."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def reference_setup(path=None, device="cpu") -> DashSetup:
    """The embedded default: the project's digits UNet (or the reference DiT at ``path``) and the digits training split.

    ``device``: where the UNet and the label embedding live; the data stay on the CPU, where
    the trainer draws every batch (so the data do not depend on the device)."""
    from morse_engine.parameterization import schedule_from_dict

    from ..evaluation.workload import is_dit, load_reference_backbone
    from ..reference.digits import load_digits_split
    from ..reference.unet import NULL_CLASS, sd_alphas_cumprod

    unet, conditioner, meta = load_reference_backbone(path, device)
    dit = is_dit(meta)
    images, labels = load_digits_split("train")

    def batches(batch_size: int, generator: torch.Generator):
        # Indices drawn per batch from the generator alone, so a resumed run sees the same data.
        while True:
            idx = torch.randint(0, len(images), (batch_size,), generator=generator)
            yield _translate(images[idx], generator), labels[idx]

    return DashSetup(
        unet=unet,
        sampling=schedule_from_dict(meta["schedule"]) if dit else DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod()),
        encode=lambda cond: conditioner(cond),
        null_condition=lambda b: torch.full((b,), NULL_CLASS, dtype=torch.long),
        batches=batches,
        base_family="reference-digits-dit" if dit else "reference-digits-unet",
        fingerprint=fingerprint_module(unet),
        latent_shape=tuple(images.shape[1:]),
        prediction="flow" if dit else "eps",
    )
