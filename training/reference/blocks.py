"""The reference UNet's blocks as the engine's feature fills run them (``morse_engine.feature_fills.UNetBlocks``).

Each method is the matching line of ``ReferenceUNet.forward``, so a fill at the anchor's own input and
time reproduces Dash exactly (tested).
"""
from __future__ import annotations

import torch

from .unet import ReferenceUNet, timestep_embedding


class ReferenceBlocks:
    def __init__(self, unet: ReferenceUNet):
        self.unet = unet
        self.input_blocks, self.middle_block, self.output_blocks = unet.input_blocks, unet.middle_block, unet.output_blocks

    def prepare(self, x, t, context, kwargs):
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.unet.time_embed(timestep_embedding(t, self.unet.model_channels).to(x.dtype))
        return emb, context, kwargs.get("transformer_options", {})

    def input(self, i, h, state):
        emb, context, options = state
        return self.input_blocks[i](h, emb, context, options)

    def middle(self, h, state):
        emb, context, options = state
        return self.middle_block(h, emb, context, options)

    def output(self, i, h, skip, state, output_shape):
        emb, context, options = state
        return self.output_blocks[i](torch.cat([h, skip], dim=1), emb, context, options, output_shape)

    def head(self, h, state, x):
        return self.unet.out(h.type(x.dtype))
