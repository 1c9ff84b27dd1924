"""The paper's Dot layout: light blocks around the shared, frozen Dash backbone, plus LoRA (its config, its
weights and its fill; the default layout is ``feature``).

    z_i = z_s + eta(x_s, x_i, z_s, t_s, t_i)          (Morse, eq. 5)

``eta`` is computed by m light down-sampling blocks, the Dash backbone itself at 1/2^m
resolution per side (with LoRA active only inside this call), and m light up-sampling
blocks with skips from the down path. The Dot holds only its own weights; the backbone is
handed in at call time, so one Dash model in memory serves both.

Initialisation keeps an untrained Dot harmless: the output conv starts at zero (eta = 0,
the Dot returns the anchor estimate exactly) and the backbone first sees the average-pooled
current input (its projection from the light blocks starts at zero too).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone_shape import latent_channels_of
from ..errors import DotInputError
from ..fillers import Filler
from ..lora import DEFAULT_TARGETS, LoRAWeights, find_targets
from ..parameterization import PREDICTIONS, to_eps, unscale_input
from ..trajectory import extrapolated_change, timestep_features

LAYOUT = "paper"

# Keyword arguments of a diffusion-model call that describe full-resolution features and
# cannot be fed to the backbone at 1/2^m resolution (ControlNet residuals). The Dot still
# follows the control: it builds on the anchor estimate, which Dash made with it.
FULL_RESOLUTION_KWARGS = ("control",)


def _round8(x: float) -> int:
    return max(8, int(round(x / 8.0)) * 8)


def default_widths(backbone: nn.Module, m: int) -> tuple[int, ...]:
    """Widths of the light blocks, from the backbone's own base width.

    Level l gets (0.3 + 0.2 l) x the backbone's model_channels: for SD1.x (320) that is
    96 and 160 for m = 2, the widths of the paper's Stable Diffusion Dot.
    """
    base = getattr(backbone, "model_channels", None)
    if base is None:
        convs = [mod for mod in backbone.modules() if isinstance(mod, nn.Conv2d)]
        base = convs[0].out_channels if convs else 64
    return tuple(_round8(base * (0.3 + 0.2 * level)) for level in range(m))


STEP_INPUTS = ("x_s", "deviation")
STEMS = ("full_res", "pixel_shuffle")
ETA_SCALES = ("none", "sigma_step")
BASES = ("anchor", "extrapolate")


def _opt(default, help: str, choices=None, cli: bool = True):
    """A field with what the training command line says of it (its flags are derived from these fields)."""
    meta = {"help": help, "cli": cli}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PaperDotConfig:
    """What a Dot is: its layout and inputs. Stored in every Dot file; ``train_dot``'s flags come from these fields.

    The defaults are the paper's layout (what a file that predates a field meant); the trainer's
    recipe sets the measured improvements (see ``training.trainer.config``). ``latent_channels``
    and ``widths`` may stay None until the config is bound to a backbone (:meth:`bound_to`).
    """

    layout: ClassVar[str] = LAYOUT  # not a field: the Dot file keeps it beside the config (format 3)
    latent_channels: Optional[int] = _opt(None, "the Dash latent's channels (from the backbone)", cli=False)
    m: int = _opt(2, "light down/up-sampling blocks; the backbone runs at 1/2^m per side")
    widths: Optional[tuple[int, ...]] = _opt(None, "light block widths, one per level (default: from the backbone's width)")
    lora_rank: int = _opt(8, "LoRA rank on the backbone's attention projections")
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha (default: the rank)")
    lora_targets: tuple[str, ...] = _opt(DEFAULT_TARGETS, "comma-separated module names that get LoRA")
    trajectory: bool = _opt(True, "the trajectory inputs x_s, z_s, t_s; --no-trajectory is the paper's Table 4 ablation")
    time_dim: int = _opt(64, "sinusoidal timestep features", cli=False)
    pad_multiple: int = _opt(1, "extra factor the backbone needs its input size divisible by", cli=False)
    # "deviation": the part of the step x_s -> x that the anchor's own estimate does not explain (carries the CFG
    # pull and ancestral noise; needs sigmas)
    step_input: str = _opt("x_s", "how the Dot sees the sampler's step since the anchor: deviation (the step's "
                           "departure from z_s) or x_s (the paper)", STEP_INPUTS)
    prediction: str = _opt("eps", "the backbone's output (from the Dash)", PREDICTIONS, cli=False)
    # "pixel_shuffle": pixel-unshuffle the inputs first, so every light block runs at 1/2 resolution or less and a
    # Dot call costs less (N 6 -> 12 on the reference model); the output is pixel-shuffled back
    stem: str = _opt("full_res", "first light level: pixel_shuffle (to 1/2 resolution, cheaper) or full_res (the paper)", STEMS)
    # "sigma_step": eta scaled by the relative sigma step 1 - sigma/anchor_sigma, so the correction vanishes as the
    # jump shrinks (like the true change of the estimate) and its errors do not pile up over many short steps
    eta_scale: str = _opt("none", "sigma_step: scale the Dot's correction by the relative sigma step; none: the paper",
                          ETA_SCALES)
    # "extrapolate": eta on top of the line in t through the last two Dash estimates (the training-free extrapolating
    # fill's guess; the anchor where there is no earlier one); the Dot also reads that line's change
    base: str = _opt("anchor", "what the residual is added to: extrapolate (the line through the last two Dash "
                     "estimates) or anchor (the paper; the only choice with --no-trajectory)", BASES)

    def __post_init__(self):
        if self.m < 1:
            raise ValueError(f"m (down-sampling blocks) must be >= 1 (got {self.m}); the paper uses m = 2")
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
            if len(self.widths) != self.m:
                raise ValueError(f"widths must list one width per level: m={self.m} but widths={self.widths}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        if self.step_input not in STEP_INPUTS:
            raise ValueError(f"step_input {self.step_input!r} is not one of {STEP_INPUTS}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction {self.prediction!r} is not one of {PREDICTIONS} (the Dot supports those model types)")
        if self.eta_scale not in ETA_SCALES:
            raise ValueError(f"eta_scale {self.eta_scale!r} is not one of {ETA_SCALES}")
        if self.stem not in STEMS:
            raise ValueError(f"stem {self.stem!r} is not one of {STEMS}")
        check_base(self.base, self.trajectory)

    @property
    def factor(self) -> int:
        return 2**self.m

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PaperDotConfig":
        return cls(**d)

    def bound_to(self, backbone: nn.Module, prediction: Optional[str] = None) -> "PaperDotConfig":
        """This config for ``backbone``: its latent channels, widths from its base width where none were
        given, and the Dash's native prediction."""
        return replace(
            self,
            latent_channels=latent_channels_of(backbone),
            widths=self.widths or default_widths(backbone, self.m),
            prediction=prediction or self.prediction,
        )

    @classmethod
    def for_backbone(cls, backbone: nn.Module, m: int = 2, widths=None, **kw) -> "PaperDotConfig":
        return cls(m=m, widths=widths, **kw).bound_to(backbone)


def check_base(base: str, trajectory: bool) -> None:
    """Refuse a base the Dot cannot have (shared by the Dot's config and the trainer's, which checks first)."""
    if base not in BASES:
        raise ValueError(f"base {base!r} is not one of {BASES}")
    if base == "extrapolate" and not trajectory:
        raise ValueError("base 'extrapolate' reads the last two Dash estimates, which a Dot without trajectory inputs "
                         "does not see; the no-trajectory ablation takes base 'anchor' (train_dot --base anchor)")


def _bcast(v, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def step_deviation(x, sigma, anchor_x, anchor_sigma, anchor_z, prediction: str = "eps") -> torch.Tensor:
    """How far the sampler's step from the anchor to x departs from the anchor's own estimate.

    Inputs are in the backbone's scaled space (ComfyUI's ``calculate_input``: x / sqrt(sigma^2 + 1)).
    With no guidance and a deterministic first-order step this is zero; with CFG it is the other
    branch's pull ((w - 1)(z_c - z_u) for the cond half), with an ancestral sampler it holds the fresh
    noise. The paper's Dot has to infer this from x_i and x_s through a few light convolutions.
    """
    s_i, s_s = _bcast(sigma, x), _bcast(anchor_sigma, x)
    raw_i, raw_s = unscale_input(x, s_i), unscale_input(anchor_x, s_s)
    step = s_i - s_s
    step = torch.where(step.abs() < 1e-6, torch.full_like(step, -1e-6), step)
    velocity = (raw_i - raw_s) / step  # the eps (or eps-equivalent) the step was taken with
    own = to_eps(anchor_x, s_s, anchor_z, prediction)
    return velocity - own


def _norm(channels: int) -> nn.GroupNorm:
    groups = 8 if channels % 8 == 0 else 1
    return nn.GroupNorm(groups, channels)


class LightResBlock(nn.Module):
    """Conv residual block with a time scale/shift and no attention (the paper's light blocks)."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class PaperDot(nn.Module):
    """The Dot's own weights (light blocks + LoRA); the backbone is passed to each call."""

    def __init__(self, config: PaperDotConfig, lora: LoRAWeights):
        super().__init__()
        if config.latent_channels is None or config.widths is None:
            raise ValueError("the Dot's config is not bound to a backbone yet; build it with PaperDot.build(backbone, config)")
        self.config = config
        c, w, e = config.latent_channels, config.widths, config.time_dim
        n_times = 2 if config.trajectory else 1
        self.time_mlp = nn.Sequential(nn.Linear(n_times * e, 4 * e), nn.SiLU(), nn.Linear(4 * e, 4 * e))
        emb = 4 * e
        # x_i, x_s (or the step's deviation), z_s stacked, and the extrapolated change for that base
        cin = (4 if config.base == "extrapolate" else 3) * c if config.trajectory else c
        self.shuffled = config.stem == "pixel_shuffle"
        if self.shuffled:
            cin *= 4  # the first halving is a pixel-unshuffle: no block runs at full resolution
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, width in enumerate(w):
            self.down.append(LightResBlock(cin if level == 0 else w[level - 1], width, emb))
            first_is_shuffle = self.shuffled and level == 0
            self.downsample.append(nn.Identity() if first_is_shuffle else nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.to_backbone = nn.Conv2d(w[-1], c, 3, padding=1)
        self.from_backbone = nn.Conv2d(c, w[-1], 3, padding=1)
        self.up = nn.ModuleList()
        for level in reversed(range(config.m)):
            cin_up = w[level + 1] if level + 1 < config.m else w[-1]
            self.up.append(LightResBlock(cin_up + w[level], w[level], emb))
        self.out_norm = _norm(w[0])
        self.out = nn.Conv2d(w[0], 4 * c if self.shuffled else c, 3, padding=1)
        nn.init.zeros_(self.to_backbone.weight)
        nn.init.zeros_(self.to_backbone.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.lora = lora

    @classmethod
    def build(cls, backbone: nn.Module, config: PaperDotConfig) -> "PaperDot":
        if config.latent_channels is None or config.widths is None:
            config = config.bound_to(backbone)
        lora = LoRAWeights(find_targets(backbone, config.lora_targets), config.lora_rank, config.lora_alpha)
        return cls(config, lora)

    def light_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("lora.")]

    def _check(self, x: torch.Tensor, name: str):
        if x.dim() != 4 or x.shape[1] != self.config.latent_channels:
            raise DotInputError(
                f"{name} has shape {tuple(x.shape)}; the Dot expects [batch, {self.config.latent_channels}, height, width] "
                "(an image latent with the channels of the model it was trained for)"
            )

    def forward(
        self,
        backbone: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        anchor_x: torch.Tensor,
        anchor_z: torch.Tensor,
        anchor_t: torch.Tensor,
        context=None,
        backbone_call=None,
        lora_hooks: bool = True,
        sigma=None,
        anchor_sigma=None,
        prev_z=None,
        prev_t=None,
        **backbone_kwargs,
    ) -> torch.Tensor:
        """Estimate at (x, t) from the anchor Dash step (anchor_x, anchor_z at anchor_t).

        ``backbone_call`` defaults to ``backbone`` itself; a host passes its own call chain.
        ``lora_hooks=False`` is for training, where peft layers in the backbone carry the LoRA.
        ``sigma``/``anchor_sigma`` (floats or per-sample) are needed when ``step_input`` is "deviation".
        ``prev_z``/``prev_t``: the Dash estimate before the anchor, read when ``base`` is "extrapolate"
        (without them that base is the anchor's estimate).
        """
        cfg = self.config
        for name, tensor in (("x", x), ("anchor_x", anchor_x), ("anchor_z", anchor_z)):
            self._check(tensor, name)
        if anchor_x.shape != x.shape or anchor_z.shape != x.shape:
            raise DotInputError(
                f"anchor shapes {tuple(anchor_x.shape)}/{tuple(anchor_z.shape)} differ from x {tuple(x.shape)}; "
                "the batch or resolution changed since the last Dash step, so run Dash on this step"
            )
        h_in, w_in = x.shape[-2:]
        multiple = cfg.factor * cfg.pad_multiple
        pad_h, pad_w = (-h_in) % multiple, (-w_in) % multiple
        dtype = self.out.weight.dtype

        def prep(v):
            v = v.to(dtype)
            return F.pad(v, (0, pad_w, 0, pad_h), mode="replicate") if (pad_h or pad_w) else v

        needs_sigmas = (cfg.trajectory and cfg.step_input == "deviation") or cfg.eta_scale == "sigma_step"
        if needs_sigmas and (sigma is None or anchor_sigma is None):
            raise DotInputError(
                "this Dot reads the sampler's step since the anchor and needs the sigmas of the call and of the "
                "anchor; pass sigma= and anchor_sigma= (the Morse router does this)"
            )
        if cfg.trajectory and cfg.step_input == "deviation":
            anchor_x = step_deviation(x.float(), sigma, anchor_x.float(), anchor_sigma, anchor_z.float(), cfg.prediction)
        base = anchor_z
        if cfg.base == "extrapolate":
            if prev_z is not None:
                self._check(prev_z, "prev_z")
                if prev_z.shape != anchor_z.shape:
                    raise DotInputError(f"prev_z has shape {tuple(prev_z.shape)}, the anchor {tuple(anchor_z.shape)}; "
                                        "both are Dash estimates of the same batch")
            change = extrapolated_change(anchor_z.float(), anchor_t, None if prev_z is None else prev_z.float(), prev_t, t)
            base = anchor_z + change.to(anchor_z.dtype)
        xi, xs, zs = prep(x), prep(anchor_x), prep(anchor_z)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() in (1, x.shape[0]) else t
        anchor_t = anchor_t.reshape(-1).expand(x.shape[0]) if anchor_t.numel() in (1, x.shape[0]) else anchor_t
        feats = [timestep_features(t, cfg.time_dim)]
        if cfg.trajectory:
            feats.append(timestep_features(anchor_t, cfg.time_dim))
            h = torch.cat([xi, xs, zs] + ([prep(change)] if cfg.base == "extrapolate" else []), dim=1)
        else:
            h = xi
        emb = self.time_mlp(torch.cat(feats, dim=-1).to(dtype))

        if self.shuffled:
            h = F.pixel_unshuffle(h, 2)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        low = F.avg_pool2d(xi, cfg.factor) + self.to_backbone(h)

        call = backbone_call or backbone
        kwargs = {k: v for k, v in backbone_kwargs.items() if k not in FULL_RESOLUTION_KWARGS}
        backbone_dtype = next((p.dtype for p in backbone.parameters()), dtype)
        with self.lora.applied_to(backbone) if lora_hooks else nullcontext():
            b = call(low.to(backbone_dtype), t, context=context, **kwargs)
        h = self.from_backbone(b.to(dtype))

        for block in self.up:
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:  # the shuffled first level has no strided conv to undo
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        eta = self.out(F.silu(self.out_norm(h)))
        if self.shuffled:
            eta = F.pixel_shuffle(eta, 2)
        eta = eta[..., :h_in, :w_in]
        if cfg.eta_scale == "sigma_step":
            ratio = _bcast(sigma, eta).float() / _bcast(anchor_sigma, eta).float().clamp(min=1e-8)
            eta = eta * (1 - ratio).clamp(0, 1).to(eta.dtype)
        return base + eta.to(anchor_z.dtype)


class PaperDotFiller(Filler):
    """Serves non-Dash steps with a paper-layout Dot: the anchor estimate plus its learned residual."""

    name = "dot"
    free = False  # costs 1/N LSD a call, N measured
    history = 1  # the extrapolating base reads the Dash estimate before the anchor

    def __init__(self, dot: PaperDot, backbone: nn.Module):
        self.dot = dot
        self.backbone = backbone

    def __call__(self, backbone_call, x, t, anchor, context, kwargs, sigma=None):
        prev = anchor.before(1)
        with torch.no_grad():
            return self.dot(
                self.backbone, x, t, anchor.x, anchor.z, anchor.t, context=context, backbone_call=backbone_call,
                sigma=sigma, anchor_sigma=anchor.sigma, prev_z=None if prev is None else prev.z,
                prev_t=None if prev is None else prev.t, **kwargs
            )


def build_checked(config: PaperDotConfig, backbone: nn.Module, file_name: str) -> PaperDot:
    """The Dot of ``config`` for ``backbone``, refused in one sentence where its LoRA targets do not fit."""
    dot = PaperDot.build(backbone, config)
    dot.lora.check_backbone(backbone)
    return dot


def fill_for(dot: PaperDot, backbone: nn.Module, blocks=None) -> PaperDotFiller:
    """The paper's Dot calls the backbone at 1/2^m resolution itself: it needs no block adapter."""
    return PaperDotFiller(dot, backbone)


def describe(config: PaperDotConfig, base_family: str, n: str) -> str:
    return (f"Dot for {base_family} (m={config.m}, widths={list(config.widths)}, LoRA rank {config.lora_rank}, N={n}, "
            f"trajectory inputs {'on' if config.trajectory else 'off'})")
