"""ComfyUI's ``UNetModel`` (SD1.x, SD2.x, SDXL) as the engine's feature fills run its blocks.

Each method is the matching part of ``UNetModel._forward`` (time embedding with ``emb_patch`` and SDXL's
``label_emb``, ``forward_timestep_embed`` per block, ``output_block_patch``), so a fill at the anchor's own
input and time reproduces the model exactly (host-tested). Block outputs are captured before ControlNet
residuals and input-block patches are applied, so a call with either falls back to Dash.
"""
from __future__ import annotations

import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding

# patches that change a skip after the block the fills capture; output-block patches are applied here
UNSERVED_PATCHES = ("input_block_patch", "input_block_patch_after_skip")


class ComfyUNetBlocks:
    def __init__(self, unet):
        self.unet = unet
        self.input_blocks, self.middle_block, self.output_blocks = unet.input_blocks, unet.middle_block, unet.output_blocks

    def accepts(self, kwargs: dict) -> bool:
        patches = (kwargs.get("transformer_options") or {}).get("patches", {})
        return not any(patches.get(name) for name in UNSERVED_PATCHES)

    def can_batch(self, kwargs: dict) -> bool:
        """Whether several steps may share one decoder call (parallel decoding): not where the model carries
        patches or replaced attention, which may split or index the batch by cond/uncond."""
        options = kwargs.get("transformer_options") or {}
        return not any(options.get("patches", {}).values()) and not options.get("patches_replace")

    def prepare(self, x, t, context, kwargs):
        unet = self.unet
        options = dict(kwargs.get("transformer_options") or {})  # a copy: the blocks write "block" into it
        options["original_shape"], options["transformer_index"] = list(x.shape), 0  # as _forward sets them
        patches = options.get("patches", {})
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels, repeat_only=False).to(x.dtype))
        for patch in patches.get("emb_patch", []):
            emb = patch(emb, unet.model_channels, options)
        if unet.num_classes is not None:
            emb = emb + unet.label_emb(kwargs["y"])
        extra = {"time_context": kwargs.get("time_context"),
                 "num_video_frames": kwargs.get("num_video_frames", unet.default_num_video_frames),
                 "image_only_indicator": kwargs.get("image_only_indicator")}
        return emb, context, options, patches, extra

    def input(self, i, h, state):
        emb, context, options, _, extra = state
        options["block"] = ("input", i)
        return forward_timestep_embed(self.input_blocks[i], h, emb, context, options, **extra)

    def middle(self, h, state):
        emb, context, options, _, extra = state
        options["block"] = ("middle", 0)
        return forward_timestep_embed(self.middle_block, h, emb, context, options, **extra)

    def output(self, i, h, skip, state, output_shape):
        emb, context, options, patches, extra = state
        options["block"] = ("output", i)
        for patch in patches.get("output_block_patch", []):
            h, skip = patch(h, skip, options)
        return forward_timestep_embed(self.output_blocks[i], torch.cat([h, skip], dim=1), emb, context, options,
                                      output_shape, **extra)

    def head(self, h, state, x):
        return self.unet.out(h.type(x.dtype))
