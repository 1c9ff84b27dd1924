"""The project's reference Dash model: a miniature of ComfyUI's SD1.x UNet.

Module structure, names and call signature follow ComfyUI's
``comfy/ldm/modules/diffusionmodules/openaimodel.py`` (``UNetModel``, ``ResBlock``,
``Downsample``/``Upsample``, ``TimestepEmbedSequential``) and
``comfy/ldm/modules/attention.py`` (``SpatialTransformer``, ``BasicTransformerBlock``,
``CrossAttention``, ``FeedForward``/``GEGLU``), so state-dict keys such as
``input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight`` exist exactly as in SD1.x and
LoRA targets or patches written for SD apply unchanged. The code is our own and keeps
only what this model uses (2-D, non-linear proj_in/out, no checkpointing, no video).

The model is conditioned only through cross-attention ``context``; class labels become
context tokens through :class:`ClassConditioner`. Noise schedule: SD's 1000-step
"scaled_linear" betas with eps prediction (:func:`sd_alphas_cumprod`).

Weights are stored in safetensors with keys ``diffusion_model.<unet key>`` and
``conditioner.<key>``; the config is JSON in the file's metadata (:func:`load_reference_dash`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..paths import REFERENCE_DIR

NULL_CLASS = 10  # label of the unconditional ("empty prompt") context used for CFG
NUM_CLASSES = 10
DEFAULT_DASH_PATH = REFERENCE_DIR / "reference_dash.safetensors"


# --------------------------------------------------------------------------- schedule
def sd_alphas_cumprod(num_timesteps: int = 1000, linear_start: float = 0.00085,
                      linear_end: float = 0.012) -> torch.Tensor:
    """SD's "scaled_linear" schedule, computed in float64 as ComfyUI does; returns float64 [1000]."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N]: cos half, then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def apply_control(h, control, name):
    """Add the next ControlNet residual for ``name`` (ComfyUI semantics: lists are popped)."""
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            h = h + ctrl
    return h


# --------------------------------------------------------------------------- blocks
class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` / ``context`` / ``output_shape`` to the children that use them."""

    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x, output_shape=None):
        size = (x.shape[2] * 2, x.shape[3] * 2) if output_shape is None else tuple(output_shape[2:4])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.channels = channels
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, out_channels=None, dropout=0.0, groups=32):
        super().__init__()
        self.out_channels = out_channels = out_channels or channels
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, transformer_options={}):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b = q.shape[0]
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class BasicTransformerBlock(nn.Module):
    """Self-attention (attn1), cross-attention to context (attn2), GEGLU feed-forward (ff)."""

    def __init__(self, dim, n_heads, d_head, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None, transformer_options={}):
        x = x + self.attn1(self.norm1(x), transformer_options=transformer_options)
        x = x + self.attn2(self.norm2(x), context=context, transformer_options=transformer_options)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 conv proj_in -> transformer blocks on [B, H*W, C] -> 1x1 conv proj_out, residual."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, dropout=0.0, groups=32):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim, dropout) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None, transformer_options={}):
        b, c, h, w = x.shape
        z = self.proj_in(self.norm(x))
        z = z.movedim(1, 3).flatten(1, 2)
        for block in self.transformer_blocks:
            z = block(z, context=context, transformer_options=transformer_options)
        z = z.reshape(b, h, w, -1).movedim(3, 1)
        return self.proj_out(z) + x


# --------------------------------------------------------------------------- the UNet
@dataclass
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int | tuple = 1  # an int, or one count per level as in ComfyUI
    attention_resolutions: tuple = (2, 4)  # downsampling rates (ds) with a SpatialTransformer
    num_head_channels: int = 16
    context_dim: int = 64
    transformer_depth: int = 1
    norm_groups: int = 32  # GroupNorm groups; ComfyUI hard-codes 32

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class ReferenceUNet(nn.Module):
    """Class-conditional (through context) eps-prediction UNet with ComfyUI's UNetModel layout."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or UNetConfig(**kwargs)
        self.config = cfg
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.model_channels, self.context_dim = cfg.model_channels, cfg.context_dim
        mc, emb_dim, g = cfg.model_channels, cfg.model_channels * 4, cfg.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attention(ch):
            return SpatialTransformer(ch, ch // cfg.num_head_channels, cfg.num_head_channels,
                                      cfg.transformer_depth, cfg.context_dim, groups=g)

        def resblock(ch, out=None):
            return ResBlock(ch, emb_dim, out, groups=g)

        nrb = cfg.num_res_blocks
        nrb = [nrb] * len(cfg.channel_mult) if isinstance(nrb, int) else list(nrb)
        if len(nrb) != len(cfg.channel_mult):
            raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(nrb[level]):
                layers = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(resblock(ch), attention(ch), resblock(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(nrb[level] + 1):
                layers = [resblock(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == nrb[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self._zero_init()

    def _zero_init(self):
        """Residual branches start as identity (as in the original LDM code) for stable training."""
        convs = [m.out_layers[-1] for m in self.modules() if isinstance(m, ResBlock)]
        convs += [m.proj_out for m in self.modules() if isinstance(m, SpatialTransformer)]
        for conv in convs + [self.out[-1]]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        """x [B, C, H, W]; timesteps [B] in 0..999 (float ok); context [B, T, context_dim] -> eps [B, C, H, W]."""
        if context is None:
            raise ValueError("ReferenceUNet needs `context` [B, T, context_dim]; build it with ClassConditioner")
        if timesteps is None:
            raise ValueError("ReferenceUNet needs `timesteps` [B] (0..999)")
        if y is not None:
            raise ValueError("ReferenceUNet takes no `y`: it is conditioned only through `context`")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs, h = [], x
        for module in self.input_blocks:
            h = apply_control(module(h, emb, context, transformer_options), control, "input")
            hs.append(h)
        h = apply_control(self.middle_block(h, emb, context, transformer_options), control, "middle")
        for module in self.output_blocks:
            h = torch.cat([h, apply_control(hs.pop(), control, "output")], dim=1)
            output_shape = hs[-1].shape if hs else None
            h = module(h, emb, context, transformer_options, output_shape)
        return self.out(h.type(x.dtype))


class ClassConditioner(nn.Module):
    """Labels 0..9 (and NULL_CLASS=10 for the unconditional branch) -> context [B, n_tokens, context_dim]."""

    def __init__(self, context_dim: int = 64, n_tokens: int = 2, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.context_dim, self.n_tokens, self.num_classes = context_dim, n_tokens, num_classes
        self.embedding = nn.Embedding(num_classes + 1, n_tokens * context_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes} ({self.num_classes} = null class), "
                             f"got {labels.min().item()}..{labels.max().item()}")
        return self.embedding(labels).view(labels.shape[0], self.n_tokens, self.context_dim)


def load_reference_dash(path=None, device="cpu"):
    """Load the committed reference Dash model: returns (unet, conditioner, metadata dict), eval, frozen."""
    from .weights_file import read_weights_with_config

    path = Path(path) if path is not None else DEFAULT_DASH_PATH
    tensors, meta = read_weights_with_config(
        path, "reference Dash weights", "python -m training.train_reference --only unet", device
    )
    unet = ReferenceUNet(UNetConfig.from_dict(meta["config"]["unet"]))
    cond = ClassConditioner(**meta["config"]["conditioner"])
    unet.load_state_dict({k[len("diffusion_model."):]: v for k, v in tensors.items()
                          if k.startswith("diffusion_model.")})
    cond.load_state_dict({k[len("conditioner."):]: v for k, v in tensors.items() if k.startswith("conditioner.")})
    for module in (unet, cond):
        module.to(device).eval().requires_grad_(False)
    return unet, cond, meta
