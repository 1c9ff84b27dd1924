"""The Dot trainer's loop: Algorithm 1's tuples (``morse_engine.training_tuples``) fed to the Dot's optimizer.

The backbone stays frozen. LoRA is trained with peft, injected into the backbone and switched
off for the Dash passes, then copied into the Dot's own hook-applied LoRA. Device, mixed
precision and gradient checkpointing come from a :class:`~training.trainer.runtime.Runtime`;
with ``grad_accum`` K an optimizer step takes K micro-batches (see ``accumulate_gradients``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..host.compat import hide_broken_torchaudio

hide_broken_torchaudio()  # before peft: a torchaudio built for another CUDA breaks its import (common in ComfyUI installs)
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from morse_engine import PaperDot
from morse_engine.training_tuples import TrainingTuple, dot_loss, dot_prediction, loss_shares, make_training_tuple

from . import distributed
from . import memory as mem
from .config import DotTrainConfig
from .dash_setup import DashSetup
from .optim import TrainingDiverged, backward, optimizer_step, set_lr
from .runtime import Runtime
from .state import check_same_settings, resume_state, save_state


# The fixed tuple set: FIXED_SET_BATCHES micro-batches drawn once from their own generator (the training stream
# is untouched) and scored every FIXED_SET_EVERY optimizer steps. The training loss's running mean mixes the
# batches' luck into the curve; on a fixed set the loss changes only because the Dot does, so its last fifth says
# whether training has converged (``python -m training.loss_curve``).
FIXED_SET_BATCHES = 4
FIXED_SET_EVERY = 100
FIXED_SET_SEED_OFFSET = 1_000_003  # the set's generator: config.seed + this, far from any rank's stream


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


def training_tuple(setup: DashSetup, x0, cond, config: DotTrainConfig, gen: torch.Generator,
                   runtime: Optional[Runtime] = None) -> TrainingTuple:
    """Algorithm 1's tuples for one micro-batch, on the runtime's device and under its autocast."""
    rt = _runtime_of(setup, runtime)
    return make_training_tuple(setup, x0, cond, config.tuples, config.dot.base == "extrapolate", gen, rt.device, rt.autocast)


@dataclass
class TrainResult:
    dot: PaperDot
    steps: int
    final_loss: float
    final_reuse_loss: float
    seconds: float
    resumed_from: int = 0
    summary: dict = field(default_factory=dict)


def build_trainable(unet, config: DotTrainConfig, prediction: str = "eps") -> tuple[PaperDot, list]:
    """The untrained Dot on the backbone's device and the peft LoRA injected into ``unet`` (frozen
    otherwise), starting from the Dot's own LoRA; returns (dot, the LoRA parameters, in name order).
    The Dot is built on the CPU, then moved, so its start weights do not depend on the device."""
    dev = next(unet.parameters()).device
    dot = PaperDot.build(unet, config.dot.bound_to(unet, prediction)).to(dev)
    inject_adapter_in_model(
        LoraConfig(r=dot.config.lora_rank, lora_alpha=dot.config.lora_alpha, target_modules=list(dot.config.lora_targets),
                   lora_dropout=0.0),
        unet,
    )
    dot.lora.copy_to_peft(unet)  # same initial A (Kaiming) and B (zero) as an untrained Dot
    lora_params = [p for n, p in sorted(unet.named_parameters()) if "lora_" in n]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in lora_params:
        p.requires_grad_(True)
    return dot, lora_params


def accumulate_gradients(dot: PaperDot, unet, batches: list[TrainingTuple], config: DotTrainConfig, runtime: Runtime,
                         scaler: Optional[torch.amp.GradScaler] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the Dot on each micro-batch in turn, gradients summed into ``.grad``.

    Only one micro-batch's activations are alive at a time; the tuples themselves (Dash's
    outputs, a few latents per sample) are all made first, so that each loss can be weighted by
    its share of the whole step. Returns the step's (loss, reuse loss), detached.
    """
    shares = loss_shares(batches, config.loss.loss_weight)
    call = runtime.backbone_call(unet)
    total = reuse = None
    for i, batch in enumerate(batches):
        with runtime.autocast():
            pred = dot_prediction(dot, unet, batch, backbone_call=call, lora_hooks=False)
        # in float32: the Dot returns anchor_z + eta in anchor_z's dtype, and Dash's outputs are kept in float32
        loss = dot_loss(pred, batch, config.loss)
        # the training-free baseline, weighted like the loss so the two numbers compare
        base = dot_loss(batch.anchor_z, batch, config.loss)
        if shares is not None:
            loss, base = loss * shares[i], base * shares[i]
        backward(loss, scaler)
        total = loss.detach() if total is None else total + loss.detach()
        reuse = base if reuse is None else reuse + base
    return total, reuse


def make_fixed_set(setup: DashSetup, config: DotTrainConfig, runtime: Runtime) -> list[TrainingTuple]:
    """The fixed tuple set (see FIXED_SET_BATCHES): the same for every run with this seed, resumed or not."""
    gen = torch.Generator().manual_seed(config.seed + FIXED_SET_SEED_OFFSET)
    batches = setup.batches(config.batch_size, gen)
    tuples = []
    for _ in range(FIXED_SET_BATCHES):
        x0, cond = next(batches)
        with torch.no_grad(), peft_adapters(setup.unet, False):
            tuples.append(training_tuple(setup, x0, cond, config, gen, runtime))
    return tuples


def fixed_set_loss(dot: PaperDot, unet, tuples: list[TrainingTuple], config: DotTrainConfig,
                   runtime: Runtime) -> tuple[float, float]:
    """(the Dot's loss, reusing the anchor's) on the fixed set, weighted as one optimizer step weighs its batches."""
    shares = loss_shares(tuples, config.loss.loss_weight) or [1.0]
    call = runtime.backbone_call(unet)
    loss = reuse = 0.0
    was_training = dot.training
    dot.eval()
    with torch.no_grad():
        for share, batch in zip(shares, tuples):
            with runtime.autocast():
                pred = dot_prediction(dot, unet, batch, backbone_call=call, lora_hooks=False)
            loss += float(share * dot_loss(pred.float(), batch, config.loss))
            reuse += float(share * dot_loss(batch.anchor_z, batch, config.loss))
    dot.train(was_training)
    return loss, reuse


def estimate_memory(setup: DashSetup, dot: PaperDot, unet, lora_params: list, trainable: list, config: DotTrainConfig,
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
                        trainable, per_sample, config.batch_size, how)


@dataclass
class Curves:
    """What a run keeps of its loss: the running means (every 50 steps), the reuse baseline on the same batches
    (their ratio shows progress without the batches' mix) and [step, loss, reuse] on the fixed tuple set."""

    history: list = field(default_factory=list)
    reuse_history: list = field(default_factory=list)
    fixed_history: list = field(default_factory=list)
    loss_ema: Optional[float] = None
    reuse_ema: Optional[float] = None

    @classmethod
    def of(cls, extra: dict) -> "Curves":
        """The curves a checkpoint's ``extra`` kept."""
        return cls(extra.get("history", []), extra.get("reuse_history", []), extra.get("fixed_history", []),
                   extra.get("loss_ema"), extra.get("reuse_ema"))

    def add(self, step: int, loss: float, reuse: float) -> None:
        self.loss_ema = loss if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * loss
        self.reuse_ema = reuse if self.reuse_ema is None else 0.98 * self.reuse_ema + 0.02 * reuse
        if (step + 1) % 50 == 0:
            self.history.append(round(self.loss_ema, 6))
            self.reuse_history.append(round(self.reuse_ema, 6))

    def extra(self) -> dict:
        return {"history": self.history, "reuse_history": self.reuse_history, "fixed_history": self.fixed_history,
                "loss_ema": self.loss_ema, "reuse_ema": self.reuse_ema}


class PaperTraining:
    """One run of the paper's Dot: the backbone with peft's LoRA, the Dot, its optimizer and loss scaler, the data
    stream, and (under a launcher) the process group; ``train_dot`` drives it a step at a time."""

    def __init__(self, setup: DashSetup, config: DotTrainConfig, state_path: Path, runtime: Runtime,
                 dp: Optional[distributed.DataParallel]):
        self.setup, self.config, self.state_path, self.runtime, self.dp = setup, config, state_path, runtime, dp
        # Each rank draws its own data; rank 0's stream is the single-process run's.
        self.gen = torch.Generator().manual_seed(dp.stream_seed(config.seed) if dp else config.seed)
        self.unet = setup.unet.requires_grad_(False).to(runtime.device)
        self.dot, self.lora_params = build_trainable(self.unet, config, setup.prediction)
        self.optimizer = torch.optim.AdamW([{"params": self.dot.light_parameters()}, {"params": self.lora_params}],
                                           lr=config.lr, weight_decay=0.0)
        self.scaler = runtime.grad_scaler()
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    def resume(self) -> tuple[int, Curves]:
        """The step and curves of the run's checkpoint, its weights, moments, generators and loss scale loaded."""
        dp, path = self.dp, self.state_path
        start, extra = resume_state(path, self.dot, self.optimizer, self.gen, rank=dp.rank if dp else None)
        world = dp.world_size if dp else 1
        if extra.get("world_size", 1) != world:
            raise ValueError(
                f"the checkpoint at {path} was written by a run of {extra.get('world_size', 1)} process(es), this one has "
                f"{world}; resume with as many (the data streams and the batch per step depend on it) or start a new run"
            )
        # a field the checkpoint predates had its default then
        check_same_settings(path, extra.get("config", {}), self.config.flat(), may_change=("steps", "checkpoint_every"),
                            defaults=DotTrainConfig().flat())
        self.dot.lora.copy_to_peft(self.unet)
        if self.scaler is not None and extra.get("grad_scaler"):
            self.scaler.load_state_dict(extra["grad_scaler"])  # the loss scale the run had found
        return start, Curves.of(extra)

    def step(self, step: int, batches, last_saved: int) -> tuple[float, float]:
        """One optimizer step of ``grad_accum`` micro-batches; its (loss, reuse loss), averaged over the ranks."""
        config, dp, runtime = self.config, self.dp, self.runtime
        micro = []
        for _ in range(config.grad_accum):
            x0, cond = next(batches)
            with torch.no_grad(), peft_adapters(self.unet, False):
                micro.append(training_tuple(self.setup, x0, cond, config, self.gen, runtime))
        self.optimizer.zero_grad(set_to_none=True)
        loss, reuse = accumulate_gradients(self.dot, self.unet, micro, config, runtime, self.scaler)
        del micro
        # data-parallel: the mean over ranks, so a NaN on one rank stops all of them at this step
        loss_value = dp.mean(loss) if dp else loss
        if not torch.isfinite(loss_value):
            hint = "" if runtime.precision == "fp32" else f" (or train with --precision fp32; this run uses {runtime.precision})"
            raise TrainingDiverged(
                f"the loss became {loss_value.item()} at step {step + 1}; the last good checkpoint ({self.state_path}, step "
                f"{last_saved}) is kept. Lower --lr (now {config.lr:g}){hint} and run again with --resume"
            )
        set_lr(self.optimizer, step, config)
        if dp:
            # once per optimizer step, on the accumulated (and, in fp16, still scaled) gradients: an
            # overflow on one rank then reaches every rank, and all skip the step together
            dp.average_gradients(self.trainable)  # before clipping, so every rank clips the same gradient
        optimizer_step(self.optimizer, self.trainable, self.scaler)
        return loss_value.item(), (dp.mean(reuse) if dp else reuse).item()

    def checkpoint(self, done: int, curves: Curves) -> None:
        """The resumable state after ``done`` steps; every rank takes part, rank 0 alone writes (weights and
        optimizer are the same on all)."""
        dp = self.dp
        self.dot.lora.load_from_peft(self.unet)
        extra = {"config": self.config.flat(), **curves.extra()}
        if dp:
            extra["world_size"] = dp.world_size
        if self.scaler is not None:
            extra["grad_scaler"] = self.scaler.state_dict()  # plain numbers: the scale and its growth counter
        rank_gens = dp.gather_generator_states(self.gen) if dp else None
        if dp is None or dp.is_main:
            save_state(self.state_path, self.dot, self.optimizer, done, self.gen, extra, rank_generators=rank_gens)


def train_dot(
    setup: DashSetup,
    config: DotTrainConfig,
    state_path: Path,
    resume: bool = False,
    progress: bool = True,
    parallel: Optional[distributed.DataParallel] = None,
    runtime: Optional[Runtime] = None,
) -> TrainResult:
    """Train and return the Dot. The backbone in ``setup`` gets peft layers; reload it to sample.

    Under a launcher (``WORLD_SIZE`` > 1; see ``training/distributed.py``) each rank trains on
    its own data stream with ``config.batch_size`` per rank, gradients are averaged across ranks
    and only rank 0 writes checkpoints; ``parallel`` passes a group the caller already joined.

    ``runtime`` (``training.trainer.runtime.resolve``): device, precision, gradient checkpointing; by
    default fp32 on the backbone's device. The backbone is moved to the runtime's device (a
    setup built for that device also keeps its conditioning tables there). Steps, checkpoints
    and the learning-rate schedule count optimizer steps of ``config.grad_accum`` micro-batches.
    """
    runtime = _runtime_of(setup, runtime)
    torch.manual_seed(config.seed)  # same on every rank: the same start weights
    dp, own_group = distributed.join(parallel, runtime.device)
    run = PaperTraining(setup, config, state_path, runtime, dp)
    start, curves = run.resume() if resume else (0, Curves())
    if dp:
        # Seeding makes the start weights equal already; broadcasting guarantees it (CUDA init
        # kernels, a file changed on disk between ranks' reads).
        dp.broadcast_(list(run.dot.state_dict(keep_vars=True).values()) + run.lora_params)
    quiet = not progress or (dp is not None and not dp.is_main)
    if not quiet:
        print(estimate_memory(setup, run.dot, run.unet, run.lora_params, run.trainable, config, runtime).line(), flush=True)
    fixed_set = make_fixed_set(setup, config, runtime)

    def score_fixed_set(at_step: int) -> None:
        losses = fixed_set_loss(run.dot, run.unet, fixed_set, config, runtime)
        curves.fixed_history.append([at_step, *(float(f"{v:.7g}") for v in losses)])

    if not curves.fixed_history:
        score_fixed_set(start)  # the untrained Dot (or, resuming a run from before the set existed, the resumed one)
    batches = setup.batches(config.batch_size, run.gen)
    last_saved, t0 = start, time.time()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train Dot", disable=quiet, dynamic_ncols=True)
    for step in bar:
        curves.add(step, *run.step(step, batches, last_saved))
        bar.set_postfix(loss=f"{curves.loss_ema:.4f}", reuse=f"{curves.reuse_ema:.4f}")
        if (step + 1) % FIXED_SET_EVERY == 0 or step + 1 == config.steps:
            score_fixed_set(step + 1)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            run.checkpoint(step + 1, curves)
            last_saved = step + 1
    bar.close()
    if dp:
        dp.barrier()  # no rank leaves before the last checkpoint is written
        if own_group:
            dp.close()
    return _finish(run, curves, start, time.time() - t0)


def _finish(run: PaperTraining, curves: Curves, start: int, seconds: float) -> TrainResult:
    run.dot.lora.load_from_peft(run.unet)
    run.dot.eval().requires_grad_(False)
    nan = float("nan")
    return TrainResult(
        dot=run.dot,
        steps=run.config.steps,
        final_loss=float(curves.loss_ema if curves.loss_ema is not None else nan),
        final_reuse_loss=float(curves.reuse_ema if curves.reuse_ema is not None else nan),
        seconds=seconds,
        resumed_from=start,
        summary={"history": curves.history, "reuse_history": curves.reuse_history, "fixed_history": curves.fixed_history},
    )
