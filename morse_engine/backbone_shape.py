"""What the engine reads off a backbone's shape: its latent channels and a block's output channels (the Dot
layouts size their own weights from them)."""
from __future__ import annotations

from torch import nn

from .errors import DotInputError


def latent_channels_of(backbone: nn.Module) -> int:
    channels = getattr(backbone, "in_channels", None)
    if channels is None:
        convs = [mod for mod in backbone.modules() if isinstance(mod, nn.Conv2d)]
        if not convs:
            raise DotInputError("cannot tell the backbone's latent channels; give latent_channels explicitly")
        channels = convs[0].in_channels
    return int(channels)


def output_channels(block: nn.Module) -> int:
    """The channels of a UNet block's output: those of its last convolution or linear projection, in the order
    the block registers them (a ResBlock's skip conv or output conv, a transformer's proj_out, an upsampler's
    conv); a block whose output is its input's (an identity skip) ends on a layer of the same width."""
    for mod in reversed(list(block.modules())):
        if isinstance(mod, nn.Conv2d):
            return int(mod.out_channels)
        if isinstance(mod, nn.Linear):
            return int(mod.out_features)
    raise DotInputError(f"cannot tell the output channels of {type(block).__name__}: it has no convolution")
