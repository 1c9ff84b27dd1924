"""The backbones the benchmarks time: SD1.5 and SDXL UNets built by ComfyUI's own model classes from the config its
model detection gives a real checkpoint (random weights: no checkpoint is downloaded), or the project's UNet in the
SD1.5 layout where no ComfyUI is given, and a tiny one for the tests' smoke runs."""
from __future__ import annotations

import os
from pathlib import Path

import torch

ARCHS = {
    # resolution in pixels; the latent is 1/8 per side with 4 channels
    "sd15": dict(resolution=512, context=(77, 768), adm=None),
    "sdxl": dict(resolution=1024, context=(77, 2048), adm=2816),
    # a seconds-long smoke run of the whole benchmark (the tests use it); always the project's UNet
    "tiny": dict(resolution=128, context=(4, 32), adm=None),
}


def comfy_unet_config(arch: str) -> dict:
    """The unet_config that ComfyUI's model detection produces for a real checkpoint of ``arch``."""
    common = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
              "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_attention": False,
              "use_temporal_resblock": False}
    if arch == "sd15":
        return {**common, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                # popped from the end by the output blocks, deepest level first
                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False,
                "adm_in_channels": None}
    if arch == "sdxl":
        return {**common, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                "transformer_depth": [0, 0, 2, 2, 10, 10],
                "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                "transformer_depth_middle": 10, "context_dim": 2048, "use_linear_in_transformer": True,
                "adm_in_channels": 2816, "num_classes": "sequential"}
    raise ValueError(f"unknown architecture {arch!r}; pick one of {sorted(ARCHS)}")


def find_comfyui(explicit: str | None) -> str | None:
    """The ComfyUI that train_dot would use; None (the project's own UNet) when none is given or installed around us."""
    from .host.comfyui import ComfyUINotFound, find_comfyui as locate

    try:
        return str(locate(explicit))
    except ComfyUINotFound as exc:
        if explicit or os.environ.get("COMFYUI_PATH"):
            raise SystemExit(f"error: {exc}") from None
        return None


def build_with_comfy(arch: str, comfy_path: str, device) -> torch.nn.Module:
    from .host.comfyui import ComfyUINotFound, import_comfy

    try:
        comfy = import_comfy(Path(comfy_path), device.type, pytorch_attention=True)  # as ComfyUI runs on a GPU
    except ComfyUINotFound as exc:
        raise SystemExit(f"error: {exc}") from None
    import comfy.supported_models

    kind = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]
    model = kind(comfy_unet_config(arch)).get_model({}, device=torch.device("cpu"))
    return model.diffusion_model


def build_own(arch: str) -> torch.nn.Module:
    from .reference.unet import ReferenceUNet, UNetConfig

    if arch == "tiny":
        return ReferenceUNet(UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                                        num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16,
                                        context_dim=32, norm_groups=8))
    if arch != "sd15":
        raise SystemExit(f"error: --arch {arch} needs ComfyUI's UNet; pass --comfyui PATH or set COMFYUI_PATH")
    return ReferenceUNet(UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                                    num_res_blocks=2, attention_resolutions=(1, 2, 4), num_head_channels=40,
                                    context_dim=768, transformer_depth=1, norm_groups=32))


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """ComfyUI builds with uninitialised weights; random ones avoid denormals and NaNs skewing timings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
