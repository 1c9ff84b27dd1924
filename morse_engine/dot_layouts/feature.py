"""The feature Dot layout (the default): Dash's own outer blocks on the current input, the deep feature forecast
from the Dash calls before, plus a small learned change of that feature (its config, its weights and its fill;
the paper's layout is ``paper``).

    deep_i = f_s + (t_i - t_s)/(t_s - t_p) (f_s - f_p)            (forecast_k, training-free)
           + g(sigma_i, sigma_s) * change(deep_i, h_i - h_s, h_i, t_i, t_s)     (learned)
    z_i    = last k output blocks and head of Dash (deep_i, skips of the first k input blocks at x_i, t_i)

``f_s``/``f_p``: the feature entering Dash's last k output blocks in the anchor's Dash call and the one before
(kept by the router's capture hooks, as feature inheritance keeps them); ``h``: the output of input block k-1,
at the current input and at the anchor; ``g = 1 - sigma_i/sigma_s`` (no change where the fill's input is the
anchor's, where inheriting is exact). The change network's output conv starts at zero, so an untrained feature
Dot is the training-free ``forecast_k`` fill exactly and training can only add. ``trajectory=False`` is the
paper's Table 4 ablation: the change sees neither the anchor's first-block output nor its time.

On a DiT (``backbone="dit"``) the same Dot changes the residual the DiT block fill forecasts across the middle
blocks (``dit_fills``): residual_i = forecast + g * change(residual_i, h_i - h_s, h_i, t_i, t_s), h the state
entering block k laid out token for token as the residual (``block_replace.PatchedDiTBlocks.entry_layout``), the
change a per-token network (linear layers over the hidden width, FiLM by the times), its output layer at zero.

Measured on the reference model (reports/2026-12-05-feature-rollout.md): trained on where whole sampling runs end
(``training.trainer.rollout``) it closes 0.53-0.57/0.64-0.68/0.69-0.73/0.69-0.72 of the reuse-to-Dash gap at
6/12/20/40 euler steps against forecast_k1's 0.38/0.42/0.56/0.58, at N ~6; the paper's layout closed
0.37/0.47/0.39/0.26.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone_shape import latent_channels_of, output_channels
from ..block_replace import block_keys
from ..dit_fills import RESIDUAL, DiTBlockFiller
from ..feature_fills import feature_at
from ..errors import DotInputError, DotMismatchError
from ..feature_fills import FeatureInheritFiller, UNetBlocks
from ..parameterization import PREDICTIONS
from ..trajectory import timestep_features

LAYOUT = "feature"


@dataclass(frozen=True)
class FeatureDotConfig:
    """What a feature Dot is; stored in its file (``layout`` tells it from the paper's :class:`PaperDotConfig`).

    The channel counts stay None until the config is bound to a backbone (:meth:`bound_to`)."""

    k: int = 1  # outer blocks per side rerun at full resolution on the current input
    forecast: int = 1  # order of the deep feature's forecast from earlier Dash calls (0: inherit, 1: line, 2: parabola)
    width: int = 16  # the change network's width
    half: bool = True  # the change network at half the deep feature's resolution (a quarter of its cost)
    gate: bool = True  # scale the change by 1 - sigma_i / sigma_s
    trajectory: bool = True  # False: the paper's Table 4 ablation (no anchor inputs in the change)
    time_dim: int = 64
    latent_channels: Optional[int] = None
    deep_channels: Optional[int] = None
    shallow_channels: Optional[int] = None
    prediction: str = "eps"
    layout: str = LAYOUT
    backbone: str = "unet"  # "dit": the change of a DiT's forecast residual (its hidden width in deep_channels)
    time_scale: float = 1.0  # the times the change sees are the model's timesteps times this (1000 for a flow
    # model whose timestep is sigma itself, so that their features span the same range as a 0..1000 timestep's)

    def __post_init__(self):
        if self.layout != LAYOUT:
            raise ValueError(f"layout {self.layout!r} is not a feature Dot's ('{LAYOUT}')")
        if self.k < 1:
            raise ValueError(f"k={self.k}: the feature Dot reruns at least one block per side (k >= 1)")
        if self.forecast not in (0, 1, 2):
            raise ValueError(f"forecast order {self.forecast!r} must be 0 (inherit), 1 (line) or 2 (parabola)")
        if self.width < 8 or self.width % 8:
            raise ValueError(f"width {self.width} must be a multiple of 8 (its group norm has 8 groups)")
        if self.prediction not in (*PREDICTIONS, "flow"):
            raise ValueError(f"prediction {self.prediction!r} is not one of {(*PREDICTIONS, 'flow')}")
        if self.backbone not in ("unet", "dit"):
            raise ValueError(f"backbone {self.backbone!r} is not 'unet' or 'dit'")

    @property
    def bound(self) -> bool:
        return None not in (self.latent_channels, self.deep_channels, self.shallow_channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureDotConfig":
        return cls(**d)

    def bound_to(self, backbone: nn.Module, prediction: Optional[str] = None) -> "FeatureDotConfig":
        """This config for ``backbone`` (an SD-style UNet, or a DiT with block-replace patches): its latent channels
        and the channels of the two features the change reads, from the blocks that make them."""
        if not hasattr(backbone, "output_blocks") and block_keys(backbone) is not None:
            return self._bound_to_dit(backbone, prediction)
        n = len(getattr(backbone, "output_blocks", ()))
        if not n or not hasattr(backbone, "input_blocks") or len(backbone.input_blocks) != n:
            raise DotInputError("the feature Dot needs a UNet with as many input_blocks as output_blocks and a "
                                "middle_block (SD1.x, SD2.x, SDXL or the reference UNet); train the paper's layout "
                                "(train_dot --layout paper) for another backbone")
        if self.k > n:
            raise DotInputError(f"k={self.k} is more than the backbone's {n} blocks per side")
        deep = n - self.k - 1
        deep_module = backbone.output_blocks[deep] if deep >= 0 else backbone.middle_block
        return replace(self, latent_channels=latent_channels_of(backbone), prediction=prediction or self.prediction,
                       deep_channels=output_channels(deep_module),
                       shallow_channels=output_channels(backbone.input_blocks[self.k - 1]))


    def _bound_to_dit(self, backbone: nn.Module, prediction: Optional[str]) -> "FeatureDotConfig":
        n = len(block_keys(backbone))
        if 2 * self.k >= n:
            raise DotInputError(f"k={self.k} reruns {2 * self.k} of the DiT's {n} blocks and would skip none")
        width = hidden_width(backbone)
        try:
            latent = latent_channels_of(backbone)
        except DotInputError:  # a DiT that embeds its patches with a linear layer (Qwen-Image): its input width
            latent = next(m.in_features for m in backbone.modules() if isinstance(m, nn.Linear))
        return replace(self, backbone="dit", latent_channels=latent,
                       prediction=prediction or self.prediction, deep_channels=width, shallow_channels=width)


def hidden_width(backbone: nn.Module) -> int:
    """A DiT's hidden width (the residual's last dimension), as its class names it."""
    for owner in (backbone, getattr(backbone, "config", None), getattr(backbone, "params", None)):
        for name in ("hidden_size", "dim", "inner_dim"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    raise DotInputError(f"cannot tell the hidden width of {type(backbone).__name__}; the DiT feature Dot needs it")


class TokenChange(nn.Module):
    """A DiT's change of the forecast residual, token by token, from it, the state entering the skipped blocks now
    and at the anchor, and both times."""

    def __init__(self, config: FeatureDotConfig):
        super().__init__()
        c, w, d = config, config.width, config.deep_channels
        self.t_dim, self.trajectory, self.time_scale = c.time_dim, c.trajectory, c.time_scale
        n_times, n_in = (2, 3) if c.trajectory else (1, 2)
        self.time = nn.Sequential(nn.Linear(n_times * c.time_dim, 4 * w), nn.SiLU(), nn.Linear(4 * w, 2 * w))
        self.inp = nn.Linear(n_in * d, w)
        self.norm = nn.LayerNorm(w)
        self.mid = nn.Linear(w, w)
        self.out = nn.Linear(w, d)
        nn.init.zeros_(self.out.weight)  # untrained: no change, the training-free forecast exactly
        nn.init.zeros_(self.out.bias)

    def forward(self, residual, h, anchor_h, t, t_s):
        dtype = self.out.weight.dtype
        if self.trajectory:
            emb = torch.cat([timestep_features(t * self.time_scale, self.t_dim),
                             timestep_features(t_s * self.time_scale, self.t_dim)], dim=-1)
            x = torch.cat([residual, h - anchor_h, h], dim=-1)
        else:
            emb, x = timestep_features(t * self.time_scale, self.t_dim), torch.cat([residual, h], dim=-1)
        scale, shift = self.time(emb.to(dtype))[:, None, :].chunk(2, dim=-1)
        x = F.silu(self.norm(self.inp(x.to(dtype))) * (1 + scale) + shift)
        return self.out(F.silu(self.mid(x)))


class DeepChange(nn.Module):
    """The change of the forecast deep feature, from it, the first blocks' change since the anchor and both times."""

    def __init__(self, config: FeatureDotConfig):
        super().__init__()
        c, w = config, config.width
        self.t_dim, self.half, self.trajectory = c.time_dim, c.half, c.trajectory
        n_times, n_shallow = (2, 2) if c.trajectory else (1, 1)
        self.time = nn.Sequential(nn.Linear(n_times * c.time_dim, 4 * w), nn.SiLU(), nn.Linear(4 * w, 2 * w))
        self.inp = nn.Conv2d(c.deep_channels + n_shallow * c.shallow_channels, w, 3, padding=1)
        self.mid = nn.Conv2d(w, w, 3, padding=1)
        self.norm = nn.GroupNorm(8, w)
        self.out = nn.Conv2d(w, c.deep_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # untrained: no change, the training-free forecast exactly
        nn.init.zeros_(self.out.bias)

    def forward(self, deep, shallow, anchor_shallow, t, t_s):
        dtype = self.out.weight.dtype
        if self.trajectory:
            emb = torch.cat([timestep_features(t, self.t_dim), timestep_features(t_s, self.t_dim)], dim=-1)
            h = torch.cat([deep, shallow - anchor_shallow, shallow], dim=1)
        else:
            emb, h = timestep_features(t, self.t_dim), torch.cat([deep, shallow], dim=1)
        scale, shift = self.time(emb.to(dtype))[:, :, None, None].chunk(2, dim=1)
        h = h.to(dtype)
        if self.half:
            h = F.avg_pool2d(h, 2)
        h = F.silu(self.norm(self.inp(h)) * (1 + scale) + shift)
        out = self.out(F.silu(self.mid(h)))
        return F.interpolate(out, size=deep.shape[-2:], mode="bilinear", align_corners=False) if self.half else out


class FeatureDot(nn.Module):
    """The feature Dot's own weights (the change network); Dash's blocks are handed in by the filler."""

    def __init__(self, config: FeatureDotConfig):
        super().__init__()
        if not config.bound:
            raise ValueError("the feature Dot's config is not bound to a backbone yet; build it with FeatureDot.build")
        self.config = config
        self.change = TokenChange(config) if config.backbone == "dit" else DeepChange(config)

    @classmethod
    def build(cls, backbone: nn.Module, config: FeatureDotConfig) -> "FeatureDot":
        return cls(config if config.bound else config.bound_to(backbone))

    def light_parameters(self):
        return list(self.parameters())


class FeatureDotFiller(FeatureInheritFiller):
    """Serves non-Dash steps with a feature Dot: ``forecast_k`` plus the Dot's learned change of the deep feature.

    Runs under no_grad unless the Dot's weights require a gradient (rollout training)."""

    name = "dot"

    def __init__(self, blocks: UNetBlocks, dot: FeatureDot):
        super().__init__(blocks, k=dot.config.k, forecast=dot.config.forecast)
        self.dot = dot
        self.name = "dot"

    def capture_modules(self):
        return {**super().capture_modules(), "shallow": self.blocks.input_blocks[self.k - 1]}

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        training = any(p.requires_grad for p in self.dot.parameters())
        with nullcontext() if training and torch.is_grad_enabled() else torch.no_grad():
            return self.forward(x, t, anchor, context, kwargs, sigma)

    def forward(self, x, t, anchor, context, kwargs, sigma=None):
        cfg, b = self.dot.config, self.blocks
        if cfg.gate and (sigma is None or anchor.sigma is None):
            raise DotInputError("the feature Dot scales its change by the sigma step and needs the sigmas of the call "
                                "and of the anchor; the Morse router passes them")
        deep = self._deep_at(t, anchor)
        state = b.prepare(x, t, context, kwargs)
        hs = self._first_blocks(x, state)
        h = hs[-1]
        t_now = t.reshape(-1).expand(x.shape[0]) if t.numel() in (1, x.shape[0]) else t
        t_s = anchor.t.reshape(-1).expand(x.shape[0]) if anchor.t.numel() in (1, x.shape[0]) else anchor.t
        change = self.dot.change(deep, h, anchor.features["shallow"], t_now, t_s)
        if cfg.gate:
            ratio = torch.as_tensor(sigma, device=deep.device).float().reshape(-1, 1, 1, 1) \
                / anchor.sigma.to(deep.device).float().reshape(-1, 1, 1, 1).clamp(min=1e-8)
            change = change * (1 - ratio).clamp(0, 1)
        return self._up_to_head(deep + change.to(deep.dtype), hs, state, x)


def build_checked(config: FeatureDotConfig, backbone: nn.Module, file_name: str) -> FeatureDot:
    """The Dot of ``config`` for ``backbone``, refused in one sentence where Dash's blocks make other channels than
    the two feature maps the change network reads."""
    here = replace(config, deep_channels=None, shallow_channels=None).bound_to(backbone, config.prediction)
    if here.backbone != config.backbone:
        raise DotMismatchError(f"'{file_name}' was trained for a {config.backbone.upper()} and this model is a "
                               f"{here.backbone.upper()}; use a Dot trained for this model")
    if (here.deep_channels, here.shallow_channels) != (config.deep_channels, config.shallow_channels):
        raise DotMismatchError(
            f"'{file_name}' reads features of {config.deep_channels} and {config.shallow_channels} channels but this "
            f"model's blocks make {here.deep_channels} and {here.shallow_channels}; use a Dot trained for this model")
    return FeatureDot.build(backbone, config)


def fill_for(dot: FeatureDot, backbone: nn.Module, blocks: Optional[UNetBlocks] = None):
    if blocks is None:
        raise DotInputError("a feature Dot runs Dash's own blocks and needs the host's UNetBlocks adapter")
    if dot.config.backbone == "dit":
        if not hasattr(blocks, "recording"):
            raise DotInputError("this feature Dot was trained for a DiT; load it on that DiT")
        return DiTFeatureDotFiller(blocks, dot)
    if hasattr(blocks, "recording"):
        raise DotInputError("this feature Dot was trained for a UNet; a DiT needs a Dot trained for it")
    return FeatureDotFiller(blocks, dot)


class DiTFeatureDotFiller(DiTBlockFiller):
    """Serves non-Dash steps with a DiT feature Dot: the DiT block fill's forecast residual plus the Dot's change,
    computed when the skip begins from the state entering it. Runs under no_grad unless the Dot trains."""

    def __init__(self, blocks, dot: FeatureDot):
        super().__init__(blocks, k=dot.config.k, forecast=dot.config.forecast)
        self.dot, self.name = dot, "dot"

    def capture_modules(self) -> dict:
        return {RESIDUAL: None, "entry": None}

    def capturing(self, kwargs: dict):
        return self.blocks.recording(kwargs, self.first, self.last, entry=True)

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        cfg = self.dot.config
        if cfg.gate and (sigma is None or anchor.sigma is None):
            raise DotInputError("the feature Dot scales its change by the sigma step and needs the sigmas of the call "
                                "and of the anchor; the Morse router passes them")
        residual = feature_at(t, anchor, RESIDUAL, self.forecast)
        b = residual.shape[0]
        t_now = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
        t_s = anchor.t.reshape(-1).expand(b) if anchor.t.numel() in (1, b) else anchor.t

        def with_change(h):
            change = self.dot.change(residual, h, anchor.features["entry"], t_now.to(h.device), t_s.to(h.device))
            if cfg.gate:
                ratio = torch.as_tensor(sigma, device=h.device).float().reshape(-1, 1, 1) \
                    / anchor.sigma.to(h.device).float().reshape(-1, 1, 1).clamp(min=1e-8)
                change = change * (1 - ratio).clamp(0, 1)
            return residual + change.to(residual.dtype)

        training = any(p.requires_grad for p in self.dot.parameters()) and torch.is_grad_enabled()
        with nullcontext() if training else torch.no_grad(), \
                self.blocks.skipping(kwargs, self.first, self.last, with_change):
            return backbone_call(x, t, context=context, **kwargs)


def describe(config: FeatureDotConfig, base_family: str, n: str) -> str:
    order = {0: "inherited", 1: "forecast", 2: "forecast (2nd order)"}[config.forecast]
    return (f"feature Dot for {base_family} ({config.k} block(s) per side rerun, deep feature {order} plus a learned "
            f"change of width {config.width}, N={n}, trajectory inputs {'on' if config.trajectory else 'off'})")
