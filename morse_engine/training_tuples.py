"""Algorithm 1 of the paper: the Dot's training tuples and its loss, over a small Dash protocol.

A tuple follows the paper: noise clean data to an anchor time t_s, run Dash there (z_s), take a
sampler step with the guided estimate to a later time t_i (x_i), and regress the Dot's
``z_s + eta(x_s, x_i, z_s, t_s, t_i)`` on Dash's own estimate at (x_i, t_i). Cond and uncond are
both targets, so the Dot serves both halves of a CFG batch; the guidance scale that forms x_i is
drawn per sample, as the paper does for SD. Every tensor is in the backbone's scaled input space
and native prediction (eps or v); the sampler step converts to eps.

Every random draw is made on the CPU from the caller's generator, so a run's data do not depend
on the device; Dash runs under the caller's autocast and its outputs are kept in float32.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import nn

from .parameterization import DiscreteSchedule, cfg_combine, scale_input, to_eps
from .solver_steps import ancestral_step, euler_step

JUMP_SAMPLERS = ("euler", "euler_ancestral")
LOSS_WEIGHTS = ("none", "step")
LOSS_ON = ("guided", "branches")


class Dash(Protocol):
    """What Algorithm 1 needs of a Dash model, whatever its origin (reference model or checkpoint)."""

    unet: nn.Module  # ComfyUI's diffusion-model call: unet(x_scaled, timestep, context=..., **kwargs)
    sampling: DiscreteSchedule  # the schedule's sigmas and timestep lookups
    prediction: str  # the native output: "eps" or "v"
    encode: Callable[[torch.Tensor], torch.Tensor]  # conditions [B] -> context [B, T, D]
    null_condition: Callable[[int], torch.Tensor]  # batch size -> conditions of the empty prompt
    # conditions [B] -> what else the backbone takes (SDXL's ``y``); None: the context is all
    extra_kwargs: Optional[Callable[[torch.Tensor], dict]]
    # data-free: (noise, conditions, generator) -> (x_s, sigma_s [B]) on Dash's own sampler; None: x0 are clean data
    trajectory: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple]]


@dataclass(frozen=True)
class TupleRecipe:
    """How the tuples are drawn (Algorithm 1's jump, guidance and sampler step)."""

    jump_min: int = field(default=10, metadata={"help": "shortest jump t_s -> t_i, in timesteps (drawn log-uniformly)"})
    jump_max: int = field(default=300, metadata={"help": "longest jump t_s -> t_i, in timesteps"})
    cfg_min: float = field(default=1.0, metadata={"help": "lowest CFG scale that forms x_i, drawn uniformly per sample "
                                                          "(a checkpoint's default: the low end of --trajectory-cfg)"})
    cfg_max: float = field(default=4.0, metadata={"help": "highest CFG scale that forms x_i; cover the scales you sample "
                                                          "with (a checkpoint's default: the high end of --trajectory-cfg)"})
    sampler: str = field(default="euler", metadata={"choices": JUMP_SAMPLERS,
                                                    "help": "the step that forms x_i: euler (= DDIM) or euler_ancestral"})

    def __post_init__(self):
        if self.sampler not in JUMP_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {JUMP_SAMPLERS}; pick one of those")
        if not 0 < self.cfg_min <= self.cfg_max:
            raise ValueError(f"CFG range {self.cfg_min}..{self.cfg_max} is empty; give 0 < cfg_min <= cfg_max")
        if not 1 <= self.jump_min <= self.jump_max:
            raise ValueError(f"jump range {self.jump_min}..{self.jump_max} is empty; give 1 <= jump_min <= jump_max")


@dataclass(frozen=True)
class LossRecipe:
    """What the Dot's loss weighs."""

    # an eps error moves the sampler's x by (sigma step) x error, so large-noise jumps count for what they do
    loss_weight: str = field(default="step", metadata={"choices": LOSS_WEIGHTS, "help": "step: weight each tuple by its "
                                                       "sigma step, as the sampler update does; none: plain MSE (the paper)"})
    # Reusing an estimate errs alike in both CFG branches and the errors cancel in u + w (c - u); a Dot trained
    # per branch only errs independently in each, and CFG amplifies that (measured: 0.44x reuse's error per
    # branch, 0.84x guided).
    loss_on: str = field(default="guided", metadata={"choices": LOSS_ON, "help": "guided: also the error of the "
                                                     "CFG-guided estimate the sampler uses; branches: per-branch MSE (the paper)"})

    def __post_init__(self):
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight {self.loss_weight!r} is not one of {LOSS_WEIGHTS}; pick one of those")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on {self.loss_on!r} is not one of {LOSS_ON}; pick one of those")


@dataclass
class TrainingTuple:
    """A batch of tuples, laid out [cond half, uncond half] like a CFG batch."""

    x: torch.Tensor  # x_i, scaled
    t: torch.Tensor  # t_i
    anchor_x: torch.Tensor  # x_s, scaled
    anchor_z: torch.Tensor  # z_s = Dash(x_s, t_s), native, float32
    anchor_t: torch.Tensor
    context: torch.Tensor
    target: torch.Tensor  # Dash(x_i, t_i), native, float32
    sigma_step: torch.Tensor  # sigma_s - sigma_i per row
    guidance: torch.Tensor  # the CFG scale per sample (one per pair)
    sigma: torch.Tensor  # sigma_i per row
    anchor_sigma: torch.Tensor
    backbone_kwargs: dict  # e.g. SDXL's y, for the Dot's backbone call
    prev_z: Optional[torch.Tensor] = None  # the Dash estimate before the anchor (the extrapolating base)
    prev_t: Optional[torch.Tensor] = None


def _two(v):
    return torch.cat([v, v])


def guided_eps(dash: Dash, x, sig, z, w) -> torch.Tensor:
    """The guided estimate of Dash's outputs ``z`` (a [cond, uncond] batch) at (x, sigma), as eps."""
    return to_eps(scale_input(x, sig), sig, cfg_combine(z, w), dash.prediction)


def make_training_tuple(dash: Dash, x0, cond, recipe: TupleRecipe, with_previous: bool, gen: torch.Generator,
                        device=None, autocast: Callable = nullcontext) -> TrainingTuple:
    """One batch of tuples from clean latents ``x0`` (or, data-free, the noise a sampling run starts from,
    with the anchor where Dash's own sampler gets to) and their conditions ``cond``.

    ``with_previous``: also the Dash estimate before the anchor, for a Dot whose base extrapolates
    from the last two (one more Dash pass per tuple).
    """
    dev = torch.device(device) if device is not None else next(dash.unet.parameters()).device
    sig = dash.sampling.sigmas
    if dash.trajectory is None:
        b = x0.shape[0]
        t_s = torch.randint(1, len(sig), (b,), generator=gen)
    else:
        with autocast():
            x_s, sig_s = dash.trajectory(x0, cond, gen)
        x_s, sig_s = x_s.float(), sig_s.cpu()
        b = x_s.shape[0]
        t_s = dash.sampling.timestep(sig_s).long()  # the nearest discrete timestep, as ComfyUI feeds the model
    log_jump = torch.empty(b).uniform_(math.log(recipe.jump_min), math.log(recipe.jump_max + 1), generator=gen)
    t_i = (t_s - log_jump.exp().floor().long()).clamp(min=0)
    view = (b,) + (1,) * (x0.dim() - 1)
    if dash.trajectory is None:
        sig_s, sig_i = sig[t_s].view(view), sig[t_i].view(view)
        noise = torch.randn(x0.shape, generator=gen)
        x_s = x0.to(dev) + sig_s.to(dev) * noise.to(dev)
    else:  # the run's own sigma, which the sampler's schedule need not put on the table
        sig_s, sig_i = sig_s.reshape(view).to(sig.dtype), sig[t_i].view(view)
    # on the CPU, .to(dev) hands back the same tensors
    x_s, sig_s, sig_i, t_s, t_i = (v.to(dev) for v in (x_s, sig_s, sig_i, t_s, t_i))
    both = torch.cat([cond, dash.null_condition(b)])
    context = torch.cat([dash.encode(cond), dash.encode(dash.null_condition(b))]).to(dev)
    kwargs = {} if dash.extra_kwargs is None else dash.extra_kwargs(both)
    kwargs = {k: v.to(dev) for k, v in kwargs.items()}
    with autocast():
        z_s = dash.unet(_two(scale_input(x_s, sig_s)), _two(t_s.float()), context=context, **kwargs).float()
    w = torch.empty(view).uniform_(recipe.cfg_min, recipe.cfg_max, generator=gen).to(dev)
    guided = guided_eps(dash, x_s, sig_s, z_s, w)
    if recipe.sampler == "euler":
        x_i = euler_step(x_s, guided, sig_s, sig_i)
    else:
        x_i = ancestral_step(x_s, guided, sig_s, sig_i, torch.randn(x0.shape, generator=gen).to(dev))
    with autocast():
        target = dash.unet(_two(scale_input(x_i, sig_i)), _two(t_i.float()), context=context, **kwargs).float()
    prev_z = prev_t = None
    if with_previous:
        prev_z, prev_t = previous_dash_estimate(dash, x_s, sig_s, t_s, t_i, guided, context, kwargs, gen, autocast)
    return TrainingTuple(
        x=_two(scale_input(x_i, sig_i)),
        t=_two(t_i.float()),
        anchor_x=_two(scale_input(x_s, sig_s)),
        anchor_z=z_s,
        anchor_t=_two(t_s.float()),
        context=context,
        target=target,
        sigma_step=_two(sig_s - sig_i).reshape(-1),
        guidance=w.reshape(-1),
        sigma=_two(sig_i.reshape(-1)),
        anchor_sigma=_two(sig_s.reshape(-1)),
        backbone_kwargs=kwargs,
        prev_z=prev_z,
        prev_t=prev_t,
    )


def previous_dash_estimate(dash: Dash, x_s, sig_s, t_s, t_i, guided, context, kwargs, gen: torch.Generator,
                           autocast: Callable = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """The Dash estimate before the anchor, for a Dot whose base extrapolates from the last two.

    The earlier Dash step lies 1-3 fill jumps before the anchor (2 with the pattern 'D.', 1.5 or 3
    with 'D..'), drawn log-uniformly, at the point one Euler step back from x_s along the anchor's
    guided estimate: where that step would have been, to first order, with no clean sample needed
    (so also data-free). One tuple in ten has none (a run's first Dash step), marked by t_p = t_s,
    where the extrapolated change is zero. Returns (z_p, t_p) for both CFG halves.
    """
    b = x_s.shape[0]
    sig = dash.sampling.sigmas
    k = torch.empty(b).uniform_(0.0, math.log(3.0), generator=gen).exp().to(t_s.device)
    t_p = (t_s + ((t_s - t_i).float() * k).round().long()).clamp(max=len(sig) - 1)
    first = (torch.rand(b, generator=gen) < 0.1).to(t_s.device)
    t_p = torch.where(first, t_s, t_p)
    sig_p = sig[t_p.cpu()].to(x_s.device).view(sig_s.shape).to(sig_s.dtype)
    x_p = euler_step(x_s, guided, sig_s, sig_p)
    with autocast():
        z_p = dash.unet(_two(scale_input(x_p, sig_p)), _two(t_p.float()), context=context, **kwargs).float()
    return z_p, _two(t_p).float()


def dot_prediction(dot, backbone, tup: TrainingTuple, backbone_call=None, lora_hooks: bool = True) -> torch.Tensor:
    """The Dot's estimate for a batch of tuples (what the loss compares with the target)."""
    return dot(
        backbone, tup.x, tup.t, tup.anchor_x, tup.anchor_z, tup.anchor_t, context=tup.context,
        backbone_call=backbone_call, lora_hooks=lora_hooks, sigma=tup.sigma, anchor_sigma=tup.anchor_sigma,
        prev_z=tup.prev_z, prev_t=tup.prev_t, **tup.backbone_kwargs,
    )


def weighted_mse(pred, target, sigma_step, kind: str) -> torch.Tensor:
    """Plain MSE (the paper), or weighted by the sigma step (an eps error moves the sampler's x by
    (sigma step) x error, so large-noise jumps count for what they do to the sample)."""
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    if kind == "none":
        return per_sample.mean()
    w = sigma_step.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp(min=1e-12)


def dot_loss(pred, tup: TrainingTuple, loss: LossRecipe) -> torch.Tensor:
    """The training loss of estimates ``pred`` (the Dot's, or the anchor's for the reuse baseline)."""
    branches = weighted_mse(pred, tup.target, tup.sigma_step, loss.loss_weight)
    if loss.loss_on == "branches":
        return branches
    w = tup.guidance.reshape(-1, *([1] * (pred.dim() - 1))).to(pred.dtype)
    half = tup.sigma_step.chunk(2)[0]
    return branches + weighted_mse(cfg_combine(pred, w), cfg_combine(tup.target, w), half, loss.loss_weight)


def loss_shares(tuples: list[TrainingTuple], kind: str) -> Optional[list]:
    """What each micro-batch's loss counts for in one optimizer step's loss, so that K micro-batches give the
    loss and gradient of one batch of all their samples: by sample count for plain MSE, by summed sigma step
    for step weighting (the weights of :func:`weighted_mse`). None for one micro-batch."""
    if len(tuples) == 1:
        return None
    if kind == "none":  # per-tuple means
        sizes = [float(b.target.shape[0]) for b in tuples]
        return [n / sum(sizes) for n in sizes]
    sums = [b.sigma_step.sum() for b in tuples]
    total = torch.stack(sums).sum().clamp(min=1e-12)
    return [w / total for w in sums]
