"""The project's reference DiT: a flow-matching miniature of ComfyUI's Flux (``comfy/ldm/flux/model.py``).

Double-stream blocks (image and text streams, joint attention), then single-stream blocks over the two streams
joined text first, RoPE over (index, row, column) ids, QK RMS-norm, adaLN modulation from the time embedding,
exactly as ComfyUI's ``Flux`` with ``vec_in_dim=None`` and ``guidance_embed=False`` (Flux schnell's shape, no
pooled vector): the module names and state-dict keys are ComfyUI's (``double_blocks.0.img_attn.qkv.weight``,
``single_blocks.3.linear1.weight``, ``final_layer.adaLN_modulation.1.weight``), so the same weights load into
ComfyUI's class and give the same outputs (host test). The code is our own and keeps only what this shape uses.

Like ComfyUI's Flux it calls ``transformer_options["patches_replace"]["dit"][("double_block", i)]`` /
``("single_block", i)`` in place of a block where one is set, so the block fills run on it through the same
patches (``morse_engine.block_replace``) as on ComfyUI's DiTs.

Parameterisation: ComfyUI's ``CONST`` with ``ModelSamplingFlux`` (x = (1 - s) x0 + s noise, the model predicting
the velocity noise - x0, the timestep is s itself and the time embedding multiplies it by 1000).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..paths import REFERENCE_DIR

DEFAULT_DIT_PATH = REFERENCE_DIR / "reference_dit.safetensors"


@dataclass
class FluxConfig:
    """ComfyUI's ``FluxParams`` for the fields this miniature uses (the rest fixed as noted in the module doc)."""

    in_channels: int = 1
    out_channels: int = 1
    context_in_dim: int = 64
    hidden_size: int = 64
    mlp_ratio: float = 4.0
    num_heads: int = 4
    depth: int = 4
    depth_single_blocks: int = 16
    axes_dim: list = field(default_factory=lambda: [4, 6, 6])
    theta: int = 10000
    patch_size: int = 4
    qkv_bias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        return cls(**d)

    def comfy_params(self) -> dict:
        """The keyword arguments ComfyUI's ``Flux`` class takes for this model."""
        return {**self.to_dict(), "vec_in_dim": None, "guidance_embed": False, "txt_ids_dims": []}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float32), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q, k, v, pe):
    """Joint attention over [B, H, L, D] with RoPE; returns [B, L, H * D] as ComfyUI's ``optimized_attention``."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.scale.shape, self.scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec[:, None, :])).chunk(self.multiplier, dim=-1)  # (shift, scale, gate) x 1 or 2


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden))


def _qkv(linear_out, heads):
    b, n, _ = linear_out.shape
    return linear_out.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden, heads, qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", _mlp(hidden, mlp_ratio))

    def _qkv(self, stream: str, h, mod):
        shift, scale = mod[0], mod[1]
        q, k, v = _qkv(getattr(self, f"{stream}_attn").qkv(torch.addcmul(shift, getattr(self, f"{stream}_norm1")(h),
                                                                          1 + scale)), self.num_heads)
        q, k = getattr(self, f"{stream}_attn").norm(q, k, v)
        return q, k, v

    def _rest(self, stream: str, h, attn, mod):
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        h = h + gate1 * getattr(self, f"{stream}_attn").proj(attn)
        mlp_in = torch.addcmul(shift2, getattr(self, f"{stream}_norm2")(h), 1 + scale2)
        return h + gate2 * getattr(self, f"{stream}_mlp")(mlp_in)

    def forward(self, img, txt, vec, pe):
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv("img", img, img_mod)
        txt_q, txt_k, txt_v = self._qkv("txt", txt, txt_mod)
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        return self._rest("img", img, img_attn, img_mod), self._rest("txt", txt, txt_attn, txt_mod)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads, self.mlp_hidden = hidden, heads, int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(torch.addcmul(shift, self.pre_norm(x), 1 + scale)),
                               [3 * self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = _qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec[:, None, :]).chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


class ReferenceFlux(nn.Module):
    """``forward(x, timestep, context, transformer_options=...)`` as ComfyUI's ``Flux`` is called: x [B, C, H, W],
    timestep the flow sigma [B], context [B, T, context_in_dim]; returns the velocity, shaped as x. It honours ``transformer_options["patches_replace"]["dit"]`` as
    ComfyUI's DiTs do."""


    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        if sum(c.axes_dim) != c.hidden_size // c.num_heads:
            raise ValueError(f"axes_dim {c.axes_dim} must sum to the head width {c.hidden_size // c.num_heads}")
        self.in_channels, self.patch_size = c.in_channels, c.patch_size
        patch = c.patch_size ** 2
        self.img_in = nn.Linear(c.in_channels * patch, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias)
                                           for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio)
                                           for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.out_channels * patch)

    def _ids(self, b, rows, cols, text_tokens, device):
        img_ids = torch.zeros(rows, cols, 3, device=device)
        img_ids[..., 1] += torch.arange(rows, device=device, dtype=torch.float32)[:, None]
        img_ids[..., 2] += torch.arange(cols, device=device, dtype=torch.float32)[None, :]
        ids = torch.cat([torch.zeros(text_tokens, 3, device=device), img_ids.reshape(-1, 3)])
        pe = torch.cat([rope(ids[:, i], self.config.axes_dim[i], self.config.theta) for i in range(3)], dim=-3)
        return pe[None, None].expand(b, 1, *pe.shape)

    def forward(self, x, timestep, context=None, transformer_options=None, **kwargs):
        if context is None:
            raise ValueError("ReferenceFlux needs `context` [B, T, context_in_dim] (a ClassConditioner's output)")
        replace = ((transformer_options or {}).get("patches_replace") or {}).get("dit", {})
        b, c, h, w = x.shape
        p = self.patch_size
        rows, cols = h // p, w // p
        img = self.img_in(x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, -1))
        timestep = timestep.expand(b) if timestep.ndim == 0 else timestep
        vec = self.time_in(timestep_embedding(timestep, 256).to(img.dtype))
        txt = self.txt_in(context)
        pe = self._ids(b, rows, cols, txt.shape[1], x.device)
        for i, block in enumerate(self.double_blocks):
            args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": transformer_options}
            if ("double_block", i) in replace:
                def original(a, block=block):
                    out_img, out_txt = block(a["img"], a["txt"], a["vec"], a["pe"])
                    return {"img": out_img, "txt": out_txt}

                out = replace[("double_block", i)](args, {"original_block": original})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, vec, pe)
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                args = {"img": img, "vec": vec, "pe": pe, "transformer_options": transformer_options}
                img = replace[("single_block", i)](args, {"original_block": lambda a, block=block: {
                    "img": block(a["img"], a["vec"], a["pe"])}})["img"]
            else:
                img = block(img, vec, pe)
        out = self.final_layer(img[:, txt.shape[1]:], vec)
        return out.reshape(b, rows, cols, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def load_reference_dit(path=None, device="cpu"):
    """The committed reference DiT: (model, conditioner, metadata), eval and frozen."""
    from .unet import ClassConditioner
    from .weights_file import read_weights_with_config

    path = Path(path) if path is not None else DEFAULT_DIT_PATH
    tensors, meta = read_weights_with_config(path, "reference DiT weights",
                                             "python -m training.train_reference --arch dit", device)
    model = ReferenceFlux(FluxConfig.from_dict(meta["config"]["dit"]))
    cond = ClassConditioner(**meta["config"]["conditioner"])
    model.load_state_dict({k[len("diffusion_model."):]: v for k, v in tensors.items() if k.startswith("diffusion_model.")})
    cond.load_state_dict({k[len("conditioner."):]: v for k, v in tensors.items() if k.startswith("conditioner.")})
    for module in (model, cond):
        module.to(device).eval().requires_grad_(False)
    return model, cond, meta
