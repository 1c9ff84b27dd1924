"""The Dot trainer's loop: Algorithm 1's tuples (``morse_engine.training_tuples``) fed to the Dot's optimizer.

The backbone stays frozen. LoRA is trained with peft, injected into the backbone and switched
off for the Dash passes, then copied into the Dot's own hook-applied LoRA. Device, mixed
precision and gradient checkpointing come from a :class:`~training.trainer.runtime.Runtime`;
with ``grad_accum`` K an optimizer step takes K micro-batches (see ``accumulate_gradients``).
"""
from __future__ import annotations

import math
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

from morse_engine import DotModel
from morse_engine.training_tuples import TrainingTuple, dot_loss, dot_prediction, loss_shares, make_training_tuple

from . import distributed
from . import memory as mem
from .config import DotTrainConfig
from .dash_setup import DashSetup
from .runtime import Runtime
from .state import load_state, save_state


# The fixed tuple set: FIXED_SET_BATCHES micro-batches drawn once from their own generator (the training stream
# is untouched) and scored every FIXED_SET_EVERY optimizer steps. The training loss's running mean mixes the
# batches' luck into the curve; on a fixed set the loss changes only because the Dot does, so its last fifth says
# whether training has converged (``python -m training.loss_curve``).
FIXED_SET_BATCHES = 4
FIXED_SET_EVERY = 100
FIXED_SET_SEED_OFFSET = 1_000_003  # the set's generator: config.seed + this, far from any rank's stream


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


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


def lr_at(step: int, config: DotTrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class TrainResult:
    dot: DotModel
    steps: int
    final_loss: float
    final_reuse_loss: float
    seconds: float
    resumed_from: int = 0
    summary: dict = field(default_factory=dict)


def build_trainable(unet, config: DotTrainConfig, prediction: str = "eps") -> tuple[DotModel, list]:
    """The untrained Dot on the backbone's device and the peft LoRA injected into ``unet`` (frozen
    otherwise), starting from the Dot's own LoRA; returns (dot, the LoRA parameters, in name order).
    The Dot is built on the CPU, then moved, so its start weights do not depend on the device."""
    dev = next(unet.parameters()).device
    dot = DotModel.build(unet, config.dot.bound_to(unet, prediction)).to(dev)
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


def accumulate_gradients(dot: DotModel, unet, batches: list[TrainingTuple], config: DotTrainConfig, runtime: Runtime,
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
        (scaler.scale(loss) if scaler is not None else loss).backward()
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


def fixed_set_loss(dot: DotModel, unet, tuples: list[TrainingTuple], config: DotTrainConfig,
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


def estimate_memory(setup: DashSetup, dot: DotModel, unet, lora_params: list, trainable: list, config: DotTrainConfig,
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
    dev = runtime.device
    torch.manual_seed(config.seed)  # same on every rank: the same start weights
    dp = parallel
    own_group = False
    if dp is None and distributed.world_size() > 1:
        dp = distributed.from_env(use_cuda=dev.type == "cuda")
        own_group = True
    # Each rank draws its own data; rank 0's stream is the single-process run's.
    gen = torch.Generator().manual_seed(dp.stream_seed(config.seed) if dp else config.seed)
    unet = setup.unet.requires_grad_(False).to(dev)
    dot, lora_params = build_trainable(unet, config, setup.prediction)
    optimizer = torch.optim.AdamW([{"params": dot.light_parameters()}, {"params": lora_params}], lr=config.lr, weight_decay=0.0)
    scaler = runtime.grad_scaler()

    start = 0
    history: list[float] = []
    reuse_history: list[float] = []  # the reuse baseline on the same batches: the ratio shows progress without their mix
    fixed_history: list[list] = []  # [step, loss, reuse] on the fixed tuple set
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
        mine = config.flat()
        defaults = DotTrainConfig().flat()  # a field the checkpoint predates had its default then
        differs = [k for k in mine if k not in ("steps", "checkpoint_every") and saved_cfg.get(k, defaults[k]) != mine[k]]
        if differs:
            raise ValueError(
                f"the checkpoint at {state_path} was made with other settings ({', '.join(differs)}); "
                "resume with the same options or start a new run without --resume"
            )
        dot.lora.copy_to_peft(unet)
        history, reuse_history = extra.get("history", []), extra.get("reuse_history", [])
        fixed_history = extra.get("fixed_history", [])
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
        print(estimate_memory(setup, dot, unet, lora_params, trainable, config, runtime).line(), flush=True)
    fixed_set = make_fixed_set(setup, config, runtime)

    def score_fixed_set(at_step: int) -> None:
        fixed_history.append([at_step, *(float(f"{v:.7g}") for v in fixed_set_loss(dot, unet, fixed_set, config, runtime))])

    if not fixed_history:
        score_fixed_set(start)  # the untrained Dot (or, resuming a run from before the set existed, the resumed one)
    batches = setup.batches(config.batch_size, gen)
    last_saved = start
    t0 = time.time()
    if not resume:
        loss_ema = reuse_ema = None
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train Dot", disable=quiet, dynamic_ncols=True)
    for step in bar:
        micro = []
        for _ in range(config.grad_accum):
            x0, cond = next(batches)
            with torch.no_grad(), peft_adapters(unet, False):
                micro.append(training_tuple(setup, x0, cond, config, gen, runtime))
        optimizer.zero_grad(set_to_none=True)
        loss, reuse = accumulate_gradients(dot, unet, micro, config, runtime, scaler)
        del micro
        # data-parallel: the mean over ranks, so a NaN on one rank stops all of them at this step
        loss_value = dp.mean(loss) if dp else loss
        if not torch.isfinite(loss_value):
            hint = "" if runtime.precision == "fp32" else f" (or train with --precision fp32; this run uses {runtime.precision})"
            raise TrainingDiverged(
                f"the loss became {loss_value.item()} at step {step + 1}; the last good checkpoint ({state_path}, step {last_saved}) "
                f"is kept. Lower --lr (now {config.lr:g}){hint} and run again with --resume"
            )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
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
            reuse_history.append(round(reuse_ema, 6))
        if (step + 1) % FIXED_SET_EVERY == 0 or step + 1 == config.steps:
            score_fixed_set(step + 1)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            dot.lora.load_from_peft(unet)
            extra = {"config": config.flat(), "history": history, "reuse_history": reuse_history,
                     "fixed_history": fixed_history, "loss_ema": loss_ema, "reuse_ema": reuse_ema}
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
        steps=config.steps,
        final_loss=float(loss_ema if loss_ema is not None else float("nan")),
        final_reuse_loss=float(reuse_ema if reuse_ema is not None else float("nan")),
        seconds=seconds,
        resumed_from=start,
        summary={"history": history, "reuse_history": reuse_history, "fixed_history": fixed_history},
    )
