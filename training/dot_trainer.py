"""Train a Dot for a Dash model (Morse, Algorithm 1).

Each training tuple follows the paper: noise clean data to an anchor time t_s, run Dash
there (z_s), take a sampler step with the guided estimate to a later time t_i (x_i), and
regress the Dot's ``z_s + eta(x_s, x_i, z_s, t_s, t_i)`` on Dash's own estimate at (x_i, t_i).
Cond and uncond branches are both targets, so the Dot serves both halves of a CFG batch;
the guidance scale that forms x_i is drawn per sample, as the paper does for SD.

The backbone stays frozen. LoRA is trained with peft, injected into the backbone and
switched off for the Dash passes, then copied into the Dot's own hook-applied LoRA.

Device, mixed precision and gradient checkpointing come from a ``training.runtime.Runtime``;
with ``grad_accum`` K an optimizer step takes K micro-batches (see ``accumulate_gradients``).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .compat import hide_broken_torchaudio

hide_broken_torchaudio()  # before peft: a torchaudio built for another CUDA breaks its import (common in ComfyUI installs)
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from morse_engine import DEFAULT_TARGETS, DotConfig, DotModel, step_deviation
from morse_engine.dot_model import check_base

from . import distributed
from . import memory_estimate as mem
from .dash_setup import DashSetup
from .runtime import Runtime
from .train_state import load_state, save_state

# "dpmpp_2m": DPM-Solver++(2M)'s step, Euler plus a correction from the previous step's estimate (one more Dash
# pass per tuple); "mixed": that for half of each batch and Euler for the other half, so one Dot serves both.
JUMP_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "mixed")
MULTISTEP = ("dpmpp_2m", "mixed")
LOSS_WEIGHTS = ("none", "step", "relative")
LOSS_ON = ("guided", "branches")


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


@dataclass
class DotTrainConfig:
    m: int = 2
    widths: Optional[tuple] = None  # default: derived from the backbone (morse_engine.default_widths)
    lora_rank: int = 8
    lora_alpha: Optional[float] = None  # default: equal to the rank
    lora_targets: tuple = DEFAULT_TARGETS
    trajectory: bool = True
    step_input: str = "deviation"  # "x_s": the anchor's input (the paper); "deviation": the step's departure from z_s
    eta_scale: str = "sigma_step"  # "none": the paper's eta, whose errors do not shrink with the step size
    stem: str = "pixel_shuffle"  # "full_res": the paper's first light block at full resolution (a Dot call costs ~2x)
    # "extrapolate": eta on top of the line through the last two Dash estimates (one more Dash pass per tuple);
    # "anchor": on top of the last one (the paper; the only choice without trajectory inputs)
    base: str = "extrapolate"
    steps: int = 1700  # about 12 min on 2 idle CPU cores for the reference model (the 15-min bar)
    batch_size: int = 32  # per micro-batch (and per process under a launcher)
    grad_accum: int = 1  # micro-batches per optimizer step: the step's batch is batch_size x grad_accum
    lr: float = 1e-3
    warmup: int = 100
    jump_min: int = 10  # jump from t_s to t_i, in timesteps, drawn log-uniformly
    jump_max: int = 300
    cfg_min: float = 1.0  # guidance scale that forms x_i, drawn uniformly
    cfg_max: float = 4.0
    sampler: str = "euler"  # the step that forms x_i: euler (= DDIM), euler_ancestral, dpmpp_2m or mixed
    loss_weight: str = "step"  # weight each tuple by its sigma step (what an eps error does to x); "none": plain MSE
    # "guided": also penalise the error of the guided estimate u + w (c - u) that the sampler steps with. Reusing
    # an estimate errs alike in both CFG branches and the errors cancel there; a Dot trained per branch only errs
    # independently in each, and CFG amplifies that (measured: 0.44x reuse's error per branch, 0.84x guided).
    # "branches": the per-branch MSE alone (the paper).
    loss_on: str = "guided"
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self):
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight {self.loss_weight!r} is not one of {LOSS_WEIGHTS}; pick one of those")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on {self.loss_on!r} is not one of {LOSS_ON}; pick one of those")
        if self.sampler not in JUMP_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {JUMP_SAMPLERS}; pick one of those")
        check_base(self.base, self.trajectory)
        if not 0 < self.cfg_min <= self.cfg_max:
            raise ValueError(f"CFG range {self.cfg_min}..{self.cfg_max} is empty; give 0 < cfg_min <= cfg_max")
        if not 1 <= self.jump_min <= self.jump_max:
            raise ValueError(f"jump range {self.jump_min}..{self.jump_max} is empty; give 1 <= jump_min <= jump_max")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")

    def dot_config(self, backbone, prediction: str = "eps") -> DotConfig:
        return DotConfig.for_backbone(
            backbone,
            m=self.m,
            widths=self.widths,
            lora_rank=self.lora_rank,
            lora_alpha=float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank),
            lora_targets=tuple(self.lora_targets),
            trajectory=self.trajectory,
            step_input=self.step_input,
            stem=self.stem,
            eta_scale=self.eta_scale,
            base=self.base,
            prediction=prediction,  # the Dash's native output (DashSetup.prediction): eps, or v for SD2.x-v
        )


@contextmanager
def peft_adapters(model, enabled: bool):
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(enabled)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _runtime_of(setup: DashSetup, runtime: Optional[Runtime]) -> Runtime:
    """Without a runtime: fp32 on the device the backbone is on (what callers got before runtimes existed)."""
    if runtime is not None:
        return runtime
    return Runtime(next((p.device for p in setup.unet.parameters()), torch.device("cpu")))


def training_tuple(setup: DashSetup, x0, cond, cfg: DotTrainConfig, gen: torch.Generator,
                   runtime: Optional[Runtime] = None) -> dict:
    """One batch of (anchor, current, target) tuples, all in the backbone's scaled input space.

    ``x0`` are clean latents, noised here to t_s; with a data-free setup (``setup.trajectory``)
    they are the noise a sampling run starts from, and the anchor is where Dash's own sampler
    with CFG gets to. Anchor and target outputs stay in the model's native prediction (eps or v).

    Every random draw is made on the CPU from ``gen`` (so a run's data do not depend on the
    device); the tuple lives on ``runtime.device``. Dash runs under the runtime's autocast and
    its outputs are kept in float32, where the sampler step and the loss are computed.
    """
    rt = _runtime_of(setup, runtime)
    dev = rt.device
    sig = setup.sampling.sigmas
    if setup.trajectory is None:
        b = x0.shape[0]
        t_s = torch.randint(1, len(sig), (b,), generator=gen)
    else:
        with rt.autocast():
            x_s, sig_s = setup.trajectory(x0, cond, gen)
        x_s, sig_s = x_s.float(), sig_s.cpu()
        b = x_s.shape[0]
        t_s = setup.sampling.timestep(sig_s).long()  # the nearest discrete timestep, as ComfyUI feeds the model
    log_jump = torch.empty(b).uniform_(math.log(cfg.jump_min), math.log(cfg.jump_max + 1), generator=gen)
    t_i = (t_s - log_jump.exp().floor().long()).clamp(min=0)
    view = (b,) + (1,) * (x0.dim() - 1)
    if setup.trajectory is None:
        sig_s, sig_i = sig[t_s].view(view), sig[t_i].view(view)
        noise = torch.randn(x0.shape, generator=gen)
        x_s = x0.to(dev) + sig_s.to(dev) * noise.to(dev)
    else:  # the run's own sigma, which the sampler's schedule need not put on the table
        sig_s, sig_i = sig_s.reshape(view).to(sig.dtype), sig[t_i].view(view)
    # on the CPU, .to(dev) hands back the same tensors: the reference run is unchanged
    x_s, sig_s, sig_i, t_s, t_i = (v.to(dev) for v in (x_s, sig_s, sig_i, t_s, t_i))
    scale = lambda x, s: x / (s**2 + 1) ** 0.5  # noqa: E731
    context = torch.cat([setup.encode(cond), setup.encode(setup.null_condition(b))]).to(dev)
    kwargs = {} if setup.extra_kwargs is None else setup.extra_kwargs(torch.cat([cond, setup.null_condition(b)]))
    kwargs = {k: v.to(dev) for k, v in kwargs.items()}
    two = lambda v: torch.cat([v, v])  # noqa: E731
    with rt.autocast():
        z_s = setup.unet(two(scale(x_s, sig_s)), two(t_s.float()), context=context, **kwargs).float()
    w = torch.empty(view).uniform_(cfg.cfg_min, cfg.cfg_max, generator=gen).to(dev)
    guided = guided_eps(setup, x_s, sig_s, z_s, w)
    if cfg.sampler in ("euler", *MULTISTEP):
        x_i = x_s + guided * (sig_i - sig_s)
        if cfg.sampler in MULTISTEP:
            x_i = x_i + multistep_correction(setup, rt, x_s, sig_s, sig_i, t_s, t_i, guided, w, context, kwargs, cfg, gen)
    else:
        sig_up = torch.minimum(sig_i, (sig_i**2 * (sig_s**2 - sig_i**2) / sig_s**2).clamp(min=0) ** 0.5)
        sig_down = (sig_i**2 - sig_up**2).clamp(min=0) ** 0.5
        x_i = x_s + guided * (sig_down - sig_s) + torch.randn(x0.shape, generator=gen).to(dev) * sig_up
    with rt.autocast():
        target = setup.unet(two(scale(x_i, sig_i)), two(t_i.float()), context=context, **kwargs).float()
    prev = {}
    if cfg.base == "extrapolate":
        z_p, t_p = previous_dash_estimate(setup, rt, x_s, sig_s, t_s, t_i, guided, context, kwargs, gen)
        prev = {"prev_z": z_p, "prev_t": t_p}
    return {
        **prev,
        "x": two(scale(x_i, sig_i)),
        "t": two(t_i.float()),
        "anchor_x": two(scale(x_s, sig_s)),
        "anchor_z": z_s,
        "anchor_t": two(t_s.float()),
        "context": context,
        "target": target,
        "sigma_step": two(sig_s - sig_i).reshape(-1),
        "guidance": w.reshape(-1),  # per sample; the batch is [cond half, uncond half]
        "sigma": two(sig_i.reshape(-1)),
        "anchor_sigma": two(sig_s.reshape(-1)),
        "backbone_kwargs": kwargs,  # e.g. SDXL's y, for the Dot's backbone call
    }


def multistep_correction(setup: DashSetup, rt: Runtime, x_s, sig_s, sig_i, t_s, t_i, guided, w, context, kwargs,
                         cfg: DotTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """What DPM-Solver++(2M) adds to the Euler step x_s -> x_i: (1 - sigma_i/sigma_s) (D_s - D_p) / 2r.

    Its first-order part is Euler (DDIM) exactly; the rest extrapolates the denoised estimate from
    the previous step's, D_p at sigma_p > sigma_s with r = log(sigma_p/sigma_s) / log(sigma_s/sigma_i).
    Trained on Euler jumps only, the Dot never sees this part of a step and answers it out of
    distribution, which is where its fills did worse than reuse under dpmpp_2m. The previous
    point is taken one Euler step back from x_s along the anchor's guided estimate, which needs no
    clean sample (so it works for the data-free checkpoint setup too); its jump is the current
    one's times e^U(-0.4, 0.4), as schedules change step length slowly.
    """
    b = x_s.shape[0]
    view = sig_s.shape
    sig = setup.sampling.sigmas
    ratio = torch.empty(b).uniform_(-0.4, 0.4, generator=gen).exp().to(t_s.device)
    t_p = (t_s + ((t_s - t_i).float() * ratio).round().long().clamp(min=1)).clamp(max=len(sig) - 1)
    x_p, sig_p, z_p = dash_one_step_back(setup, rt, x_s, sig_s, t_p, guided, context, kwargs)
    guided_p = guided_eps(setup, x_p, sig_p, z_p, w)
    keep = None
    if cfg.sampler == "mixed":
        keep = (torch.rand(b, generator=gen) < 0.5).to(x_s.device).view(view)
    return dpmpp_2m_correction(sig_p, sig_s, sig_i, x_p - sig_p * guided_p, x_s - sig_s * guided, keep)


def guided_eps(setup: DashSetup, x, sig, z, w) -> torch.Tensor:
    """The guided estimate of Dash's outputs ``z`` at (x, sigma) as the eps the sampler steps with."""
    guided = cfg_combine(z, w)
    if setup.prediction == "v":
        # V_PREDICTION's denoised implies eps = (x_scaled * sigma + v) / sqrt(sigma^2 + 1); the map is affine in
        # the output, so guiding v then converting equals guiding eps
        return (x / (sig**2 + 1) ** 0.5 * sig + guided) / (sig**2 + 1) ** 0.5
    if setup.prediction != "eps":
        raise ValueError(f"prediction {setup.prediction!r} is not one of ('eps', 'v'); the Dot trainer supports those")
    return guided


def dash_one_step_back(setup: DashSetup, rt: Runtime, x_s, sig_s, t_p, guided, context, kwargs):
    """Dash's outputs (both CFG branches, native prediction) at timestep t_p >= t_s, at the point one
    Euler step back from x_s along the anchor's guided estimate: where an earlier Dash step of the
    run would have been, to first order, with no clean sample needed (so also for the data-free
    checkpoint setup). Returns (x_p, sigma_p, z_p)."""
    sig_p = setup.sampling.sigmas[t_p.cpu()].to(x_s.device).view(sig_s.shape).to(sig_s.dtype)
    x_p = x_s + guided * (sig_p - sig_s)
    two = lambda v: torch.cat([v, v])  # noqa: E731
    with rt.autocast():
        z_p = setup.unet(two(x_p / (sig_p**2 + 1) ** 0.5), two(t_p.float()), context=context, **kwargs).float()
    return x_p, sig_p, z_p


def previous_dash_estimate(setup: DashSetup, rt: Runtime, x_s, sig_s, t_s, t_i, guided, context, kwargs,
                           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The Dash estimate before the anchor, for a Dot whose base extrapolates from the last two.

    The earlier Dash step lies 1-3 fill jumps before the anchor (2 with the pattern 'D.', 1.5 or 3
    with 'D..'), drawn log-uniformly; one tuple in ten has none (a run's first Dash step), marked
    by t_p = t_s, where the extrapolated change is zero. Returns (z_p, t_p) for both CFG halves.
    """
    b = x_s.shape[0]
    sig = setup.sampling.sigmas
    k = torch.empty(b).uniform_(0.0, math.log(3.0), generator=gen).exp().to(t_s.device)
    t_p = (t_s + ((t_s - t_i).float() * k).round().long()).clamp(max=len(sig) - 1)
    first = (torch.rand(b, generator=gen) < 0.1).to(t_s.device)
    t_p = torch.where(first, t_s, t_p)
    _, _, z_p = dash_one_step_back(setup, rt, x_s, sig_s, t_p, guided, context, kwargs)
    return z_p, torch.cat([t_p, t_p]).float()


def dpmpp_2m_correction(sig_p, sig_s, sig_i, d_p, d_s, keep=None) -> torch.Tensor:
    """DPM-Solver++(2M)'s step from sigma_s to sigma_i minus the Euler step, given the denoised
    estimates at the previous (d_p at sigma_p) and current (d_s) points; zero where ``keep`` is False."""
    h = (sig_s / sig_i.clamp(min=1e-8)).log()
    h_prev = (sig_p / sig_s).log()
    # no previous step (the schedule's first) or a last step to sigma 0: dpmpp_2m takes the first-order step
    usable = (h_prev > 1e-6) & (sig_i > 0) & (h > 1e-6)
    if keep is not None:
        usable = usable & keep
    r = torch.where(usable, h_prev / h.clamp(min=1e-6), torch.ones_like(h))
    correction = (1 - sig_i / sig_s) * (d_s - d_p) / (2 * r)
    return torch.where(usable, correction, torch.zeros_like(correction))


def weighted_mse(pred, target, sigma_step, kind: str, baseline=None):
    """Plain MSE (the paper), weighted by the sigma step (an eps error moves the sampler's x by
    (sigma step) x error, so large-noise jumps count for what they do to the sample), or relative:
    each tuple's error over the error of ``baseline`` (reusing the anchor) on the same tuple, so a
    short jump, whose errors are small in absolute terms, counts as much as a long one."""
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    if kind == "none":
        return per_sample.mean()
    if kind == "relative":
        if baseline is None:
            raise ValueError("loss_weight 'relative' needs the reuse baseline of each tuple")
        base = (baseline - target).pow(2).flatten(1).mean(1).detach()
        # a floor for tuples where reusing is already near exact, so their ratio cannot explode
        return (per_sample / (base + 1e-6 * base.mean() + 1e-12)).mean()
    w = sigma_step.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp(min=1e-12)


def dot_loss(pred, batch: dict, cfg: "DotTrainConfig") -> torch.Tensor:
    """The training loss of estimates ``pred`` (the Dot's, or the anchor's for the reuse baseline)."""
    anchor = batch["anchor_z"] if cfg.loss_weight == "relative" else None
    branches = weighted_mse(pred, batch["target"], batch["sigma_step"], cfg.loss_weight, anchor)
    if cfg.loss_on == "branches":
        return branches
    w = batch["guidance"].reshape(-1, *([1] * (pred.dim() - 1))).to(pred.dtype)
    half = batch["sigma_step"].chunk(2)[0]
    return branches + weighted_mse(cfg_combine(pred, w), cfg_combine(batch["target"], w), half, cfg.loss_weight,
                                   None if anchor is None else cfg_combine(anchor, w))


def cfg_combine(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The guided estimate u + w (c - u) of a [cond half, uncond half] batch: what the sampler steps with."""
    cond, uncond = z.chunk(2)
    return uncond + w * (cond - uncond)


def lr_at(step: int, cfg: DotTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class TrainResult:
    dot: DotModel
    steps: int
    final_loss: float
    final_reuse_loss: float
    seconds: float
    resumed_from: int = 0
    summary: dict = field(default_factory=dict)


def build_trainable(unet, cfg: DotTrainConfig, prediction: str = "eps") -> tuple[DotModel, list]:
    """The untrained Dot on the backbone's device and the peft LoRA injected into ``unet`` (frozen
    otherwise), starting from the Dot's own LoRA; returns (dot, the LoRA parameters, in name order).
    The Dot is built on the CPU, then moved, so its start weights do not depend on the device."""
    dev = next(unet.parameters()).device
    dot = DotModel.build(unet, cfg.dot_config(unet, prediction)).to(dev)
    inject_adapter_in_model(
        LoraConfig(r=cfg.lora_rank, lora_alpha=dot.config.lora_alpha, target_modules=list(cfg.lora_targets), lora_dropout=0.0),
        unet,
    )
    dot.lora.copy_to_peft(unet)  # same initial A (Kaiming) and B (zero) as an untrained Dot
    lora_params = [p for n, p in sorted(unet.named_parameters()) if "lora_" in n]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in lora_params:
        p.requires_grad_(True)
    return dot, lora_params


def micro_batch_shares(batches: list[dict], kind: str) -> Optional[list]:
    """What each micro-batch's loss counts for in the optimizer step's loss, so that K micro-batches
    give the loss and gradient of one batch of all their samples: by sample count for plain MSE,
    by summed sigma step for step weighting (the weights of ``weighted_mse``). None for one
    micro-batch, whose loss is the step's as it is."""
    if len(batches) == 1:
        return None
    if kind in ("none", "relative"):  # per-tuple means
        sizes = [float(b["target"].shape[0]) for b in batches]
        return [n / sum(sizes) for n in sizes]
    sums = [b["sigma_step"].sum() for b in batches]
    total = torch.stack(sums).sum().clamp(min=1e-12)
    return [w / total for w in sums]


def accumulate_gradients(dot: DotModel, unet, batches: list[dict], cfg: DotTrainConfig, runtime: Runtime,
                         scaler: Optional[torch.amp.GradScaler] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the Dot on each micro-batch in turn, gradients summed into ``.grad``.

    Only one micro-batch's activations are alive at a time; the tuples themselves (Dash's
    outputs, a few latents per sample) are all made first, so that each loss can be weighted by
    its share of the whole step. Returns the step's (loss, reuse loss), detached.
    """
    shares = micro_batch_shares(batches, cfg.loss_weight)
    call = runtime.backbone_call(unet)
    total = reuse = None
    for i, batch in enumerate(batches):
        with runtime.autocast():
            pred = dot(
                unet, batch["x"], batch["t"], batch["anchor_x"], batch["anchor_z"], batch["anchor_t"],
                context=batch["context"], backbone_call=call, lora_hooks=False, sigma=batch["sigma"],
                anchor_sigma=batch["anchor_sigma"], prev_z=batch.get("prev_z"), prev_t=batch.get("prev_t"),
                **batch["backbone_kwargs"],
            )
        # in float32: the Dot returns anchor_z + eta in anchor_z's dtype, and Dash's outputs are kept in float32
        loss = dot_loss(pred, batch, cfg)
        # the training-free baseline, weighted like the loss so the two numbers compare
        base = dot_loss(batch["anchor_z"], batch, cfg)
        if shares is not None:
            loss, base = loss * shares[i], base * shares[i]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
        reuse = base if reuse is None else reuse + base
    return total, reuse


def estimate_memory(setup: DashSetup, dot: DotModel, unet, lora_params: list, trainable: list, cfg: DotTrainConfig,
                    runtime: Runtime) -> mem.MemoryEstimate:
    """The memory estimate of this run, from one forward/backward of the Dot on a single CFG pair
    of zeros (no random draws, no ``.grad`` left behind: the run itself is not touched)."""
    dev = runtime.device
    cond = setup.null_condition(2)  # the pair's conditions: any valid ones cost the same
    x = torch.zeros((2,) + tuple(setup.latent_shape), device=dev)
    t = torch.full((2,), 500.0, device=dev)
    context = setup.encode(cond).to(dev)
    kwargs = {k: v.to(dev) for k, v in (setup.extra_kwargs(cond) if setup.extra_kwargs else {}).items()}
    call = runtime.backbone_call(unet)

    def loss():
        with runtime.autocast():
            pred = dot(unet, x, t, x, x, t + 50, context=context, backbone_call=call, lora_hooks=False,
                       sigma=torch.full((2,), 1.0, device=dev), anchor_sigma=torch.full((2,), 1.2, device=dev),
                       prev_z=x, prev_t=t + 150, **kwargs)
        return pred.float().pow(2).mean()

    def dash():  # one of training_tuple's full-resolution Dash passes, for the same single sample
        with peft_adapters(unet, False), runtime.autocast():
            unet(x, t, context=context, **kwargs)

    weights = list(unet.parameters()) + list(dot.parameters())
    per_sample, how = mem.activation_bytes(loss, trainable, dev, no_grad_fns=[dash], exclude=weights)
    lora_ids = {id(p) for p in lora_params}
    return mem.estimate([p for p in unet.parameters() if id(p) not in lora_ids], dot.parameters(), lora_params,
                        trainable, per_sample, cfg.batch_size, how)


def train_dot(
    setup: DashSetup,
    cfg: DotTrainConfig,
    state_path: Path,
    resume: bool = False,
    progress: bool = True,
    parallel: Optional[distributed.DataParallel] = None,
    runtime: Optional[Runtime] = None,
) -> TrainResult:
    """Train and return the Dot. The backbone in ``setup`` gets peft layers; reload it to sample.

    Under a launcher (``WORLD_SIZE`` > 1; see ``training/distributed.py``) each rank trains on
    its own data stream with ``cfg.batch_size`` per rank, gradients are averaged across ranks
    and only rank 0 writes checkpoints; ``parallel`` passes a group the caller already joined.

    ``runtime`` (``training.runtime.resolve``): device, precision, gradient checkpointing; by
    default fp32 on the backbone's device. The backbone is moved to the runtime's device (a
    setup built for that device also keeps its conditioning tables there). Steps, checkpoints
    and the learning-rate schedule count optimizer steps of ``cfg.grad_accum`` micro-batches.
    """
    runtime = _runtime_of(setup, runtime)
    dev = runtime.device
    torch.manual_seed(cfg.seed)  # same on every rank: the same start weights
    dp = parallel
    own_group = False
    if dp is None and distributed.world_size() > 1:
        dp = distributed.from_env(use_cuda=dev.type == "cuda")
        own_group = True
    # Each rank draws its own data; rank 0's stream is the single-process run's.
    gen = torch.Generator().manual_seed(dp.stream_seed(cfg.seed) if dp else cfg.seed)
    unet = setup.unet.requires_grad_(False).to(dev)
    dot, lora_params = build_trainable(unet, cfg, setup.prediction)
    optimizer = torch.optim.AdamW([{"params": dot.light_parameters()}, {"params": lora_params}], lr=cfg.lr, weight_decay=0.0)
    scaler = runtime.grad_scaler()

    start = 0
    history: list[float] = []
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume was given but there is no checkpoint at {state_path}; start without --resume")
        start, extra = load_state(state_path, dot, optimizer, gen, rank=dp.rank if dp else None)
        world = dp.world_size if dp else 1
        if extra.get("world_size", 1) != world:
            raise ValueError(
                f"the checkpoint at {state_path} was written by a run of {extra.get('world_size', 1)} process(es), this one has "
                f"{world}; resume with as many (the data streams and the batch per step depend on it) or start a new run"
            )
        saved_cfg = extra.get("config", {})
        mine = json_safe(asdict(cfg))
        defaults = json_safe(asdict(DotTrainConfig()))  # a field the checkpoint predates had its default then
        differs = [k for k in mine if k not in ("steps", "checkpoint_every") and saved_cfg.get(k, defaults[k]) != mine[k]]
        if differs:
            raise ValueError(
                f"the checkpoint at {state_path} was made with other settings ({', '.join(differs)}); "
                "resume with the same options or start a new run without --resume"
            )
        dot.lora.copy_to_peft(unet)
        history = extra.get("history", [])
        loss_ema, reuse_ema = extra.get("loss_ema"), extra.get("reuse_ema")
        if scaler is not None and extra.get("grad_scaler"):
            scaler.load_state_dict(extra["grad_scaler"])  # the loss scale the run had found

    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    if dp:
        # Seeding makes the start weights equal already; broadcasting guarantees it (CUDA init
        # kernels, a file changed on disk between ranks' reads).
        dp.broadcast_(list(dot.state_dict(keep_vars=True).values()) + lora_params)

    quiet = not progress or (dp is not None and not dp.is_main)
    if not quiet:
        print(estimate_memory(setup, dot, unet, lora_params, trainable, cfg, runtime).line(), flush=True)
    batches = setup.batches(cfg.batch_size, gen)
    last_saved = start
    t0 = time.time()
    if not resume:
        loss_ema = reuse_ema = None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train Dot", disable=quiet, dynamic_ncols=True)
    for step in bar:
        micro = []
        for _ in range(cfg.grad_accum):
            x0, cond = next(batches)
            with torch.no_grad(), peft_adapters(unet, False):
                micro.append(training_tuple(setup, x0, cond, cfg, gen, runtime))
        optimizer.zero_grad(set_to_none=True)
        loss, reuse = accumulate_gradients(dot, unet, micro, cfg, runtime, scaler)
        del micro
        # data-parallel: the mean over ranks, so a NaN on one rank stops all of them at this step
        loss_value = dp.mean(loss) if dp else loss
        if not torch.isfinite(loss_value):
            hint = "" if runtime.precision == "fp32" else f" (or train with --precision fp32; this run uses {runtime.precision})"
            raise TrainingDiverged(
                f"the loss became {loss_value.item()} at step {step + 1}; the last good checkpoint ({state_path}, step {last_saved}) "
                f"is kept. Lower --lr (now {cfg.lr:g}){hint} and run again with --resume"
            )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        if dp:
            # once per optimizer step, on the accumulated (and, in fp16, still scaled) gradients: an
            # overflow on one rank then reaches every rank, and all skip the step together
            dp.average_gradients(trainable)  # before clipping, so every rank clips the same gradient
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if scaler is not None:
            scaler.step(optimizer)  # skipped where the fp16 gradients overflowed; the scale then shrinks
            scaler.update()
        else:
            optimizer.step()
        reuse = (dp.mean(reuse) if dp else reuse).item()
        loss_ema = loss_value.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_value.item()
        reuse_ema = reuse if reuse_ema is None else 0.98 * reuse_ema + 0.02 * reuse
        bar.set_postfix(loss=f"{loss_ema:.4f}", reuse=f"{reuse_ema:.4f}")
        if (step + 1) % 50 == 0:
            history.append(round(loss_ema, 6))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            dot.lora.load_from_peft(unet)
            extra = {"config": json_safe(asdict(cfg)), "history": history, "loss_ema": loss_ema, "reuse_ema": reuse_ema}
            if dp:
                extra["world_size"] = dp.world_size
            if scaler is not None:
                extra["grad_scaler"] = scaler.state_dict()  # plain numbers: the scale and its growth counter
            # every rank takes part in the gather; rank 0 alone writes (weights and optimizer are the same on all)
            rank_gens = dp.gather_generator_states(gen) if dp else None
            if dp is None or dp.is_main:
                save_state(state_path, dot, optimizer, step + 1, gen, extra, rank_generators=rank_gens)
            last_saved = step + 1
    bar.close()
    if dp:
        dp.barrier()  # no rank leaves before the last checkpoint is written
        if own_group:
            dp.close()
    dot.lora.load_from_peft(unet)
    dot.eval().requires_grad_(False)
    seconds = time.time() - t0
    return TrainResult(
        dot=dot,
        steps=cfg.steps,
        final_loss=float(loss_ema if loss_ema is not None else float("nan")),
        final_reuse_loss=float(reuse_ema if reuse_ema is not None else float("nan")),
        seconds=seconds,
        resumed_from=start,
        summary={"history": history},
    )


def json_safe(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
