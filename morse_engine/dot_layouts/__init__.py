"""The Dot layouts, one module each with its config, its weights module and its fill:

* ``feature`` (the default): Dash's own outer blocks on the current input, the deep feature forecast from the Dash
  calls before plus a small learned change of it;
* ``paper``: the paper's light blocks around the backbone at 1/2^m resolution, with LoRA.

What a Dot file, a host or a tool asks of a Dot without knowing its layout goes through :func:`layout_of`: the
layout named by the config's ``layout`` (which the Dot file keeps beside the config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from . import feature, paper
from .feature import FeatureDot, FeatureDotConfig, FeatureDotFiller
from .paper import PaperDot, PaperDotConfig, PaperDotFiller

Dot = Union[PaperDot, FeatureDot]
DotLayoutConfig = Union[PaperDotConfig, FeatureDotConfig]


@dataclass(frozen=True)
class DotLayout:
    name: str
    config: type  # the config class a Dot file stores (``to_dict`` / ``from_dict``)
    weights: type  # the module holding the Dot's own weights (``build(backbone, config)``)
    needs_blocks: bool  # its fill runs Dash's own blocks through the host's UNetBlocks adapter
    build_checked: Callable  # (config, backbone, file name) -> the Dot, refused in one sentence where it cannot fit
    fill: Callable  # (dot, backbone, blocks) -> the fill that serves non-Dash steps with it
    describe: Callable  # (config, base family, N as text) -> one line for the user


LAYOUTS = {
    module.LAYOUT: DotLayout(module.LAYOUT, config, weights, needs, module.build_checked, module.fill_for,
                             module.describe)
    for module, config, weights, needs in ((feature, FeatureDotConfig, FeatureDot, True),
                                           (paper, PaperDotConfig, PaperDot, False))
}
DEFAULT_LAYOUT = feature.LAYOUT


def layout_of(config_or_dot) -> DotLayout:
    """The layout of a Dot config or of a Dot."""
    config = getattr(config_or_dot, "config", config_or_dot)
    return LAYOUTS[config.layout]


def config_from_dict(config: dict) -> DotLayoutConfig:
    """The config a Dot file stores, of the layout its "layout" key names (no key: the paper's, as files before
    format 3 meant)."""
    config = dict(config)
    name = config.pop("layout", paper.LAYOUT)
    if name not in LAYOUTS:
        raise ValueError(f"unknown Dot layout {name!r}")
    return LAYOUTS[name].config.from_dict(config)


def config_to_dict(config: DotLayoutConfig) -> dict:
    return {**config.to_dict(), "layout": config.layout}


__all__ = ["DEFAULT_LAYOUT", "Dot", "DotLayout", "DotLayoutConfig", "FeatureDot", "FeatureDotConfig", "FeatureDotFiller",
           "LAYOUTS", "PaperDot", "PaperDotConfig", "PaperDotFiller", "config_from_dict", "config_to_dict", "layout_of"]
