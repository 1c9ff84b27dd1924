"""A Dash's blocks (UNet or DiT) as the engine's feature fills and feature Dots run them, for the tools."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def blocks_of(backbone, on_comfy: bool):
    """The block-replace adapter for a DiT (the reference DiT or one of ComfyUI's), else the nodes' adapter for
    ComfyUI's UNetModel (loaded from its file: ComfyUI's own ``nodes`` module owns that name), or the reference
    adapter for the project's UNet."""
    from morse_engine.block_replace import PatchedDiTBlocks, takes_block_patches

    if takes_block_patches(backbone):
        return PatchedDiTBlocks(backbone)
    if not on_comfy:
        from ..reference.blocks import ReferenceBlocks

        return ReferenceBlocks(backbone)
    spec = importlib.util.spec_from_file_location("morse_unet_blocks", Path(__file__).parents[2] / "nodes" / "unet_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ComfyUNetBlocks(backbone)
