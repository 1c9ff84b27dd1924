"""Training a feature Dot on where whole sampling runs end (the rollout loss), for any Dash setup.

Per-tuple regression (Algorithm 1) does not see how fill errors compound under the sampler's update, and for the
feature Dot it did not predict how good its fills are (reports/2026-12-01-feature-dot-probe.md). Here every
optimizer step samples one of ``runs`` fixed runs (sampler, step count log-uniform in ``min_steps..max_steps``,
CFG uniform, noise and conditions from the setup) through the Morse router on pattern ``D.`` with the Dot
serving the fill steps, the gradient flowing through every later Dash call (Dash frozen) back to each fill, and
the loss is the squared distance of the run's end to the same run with Dash at every step, over the same for
reusing the anchor (so every step count weighs alike). The targets (plain and reuse runs) are made once and kept
in the run folder (safetensors). A fixed, held-out set of runs is scored every ``fixed_every`` steps: its curve
moves only because the Dot does (``python -m training.loss_curve``). Resumable from ``train-state.safetensors``.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from morse_engine import FeatureDot, FeatureDotConfig, MorseRouter, Pattern
from morse_engine.dot_layouts.feature import fill_for
from morse_engine.adapter_file import save_file_atomic
from morse_engine.fillers import ReuseFiller

from ..evaluation.samplers import GuidedDenoiser, normal_sigmas, sample
from . import distributed
from .dash_setup import DashSetup
from .optim import TrainingDiverged, backward, optimizer_step, set_lr
from .runtime import Runtime
from .state import check_same_settings, resume_state, save_state

ROLLOUT_SAMPLERS = ("euler", "dpmpp_2m")
HISTORY_EVERY = 50  # training steps per point of the file's loss history (as training.loss_curve reads it)


@dataclass(frozen=True)
class RolloutConfig:
    """A feature Dot and how it is trained (``train_dot --layout feature``)."""

    dot: FeatureDotConfig = field(default_factory=FeatureDotConfig)
    steps: int = 400  # optimizer steps, one run each
    runs: int = 120  # fixed training runs (targets made once)
    fixed_runs: int = 8  # held-out runs scored every fixed_every steps (the loss curve)
    fixed_every: int = 50
    batch: int = 8  # samples per run (each a cond + uncond pair under CFG)
    min_steps: int = 4
    max_steps: int = 50
    cfg_min: float = 1.5
    cfg_max: float = 4.0
    samplers: tuple = ROLLOUT_SAMPLERS
    lr: float = 1e-3
    warmup: int = 50
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        object.__setattr__(self, "samplers", tuple(self.samplers))
        if min(self.steps, self.runs, self.batch, self.fixed_every, self.checkpoint_every) < 1:
            raise ValueError("steps, runs, batch, fixed_every and checkpoint_every must be >= 1")
        if not 2 <= self.min_steps <= self.max_steps:
            raise ValueError(f"run lengths {self.min_steps}..{self.max_steps} must satisfy 2 <= min <= max "
                             "(a run needs a Dash step and a fill step)")
        if not 0 < self.cfg_min <= self.cfg_max:
            raise ValueError(f"CFG range {self.cfg_min}..{self.cfg_max} is empty; give 0 < cfg_min <= cfg_max")
        unknown = set(self.samplers) - set(ROLLOUT_SAMPLERS)
        if unknown or not self.samplers:
            raise ValueError(f"rollout samplers {sorted(unknown) or '(none)'}: pick from {ROLLOUT_SAMPLERS}")

    def flat(self) -> dict:
        out = {f"dot_{k}": v for k, v in self.dot.to_dict().items()}
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "dot"})
        return out

    def target_key(self) -> dict:
        """What the targets depend on: a cache made under other settings is made again."""
        return {k: self.flat()[k] for k in ("runs", "fixed_runs", "batch", "min_steps", "max_steps", "cfg_min",
                                              "cfg_max", "samplers", "seed")}


@dataclass
class RolloutResult:
    dot: FeatureDot
    steps: int
    final_loss: float  # mean end error / reuse's over the last fifth of the training steps
    final_reuse_loss: float  # 1.0 by construction: the loss is relative to reuse
    seconds: float
    resumed_from: int = 0
    summary: dict = field(default_factory=dict)


def _copy_activation(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


def _copies_of_saved_activations(wanted: bool):
    """Autograd keeps copies of the activations it saves (the frozen weights as they are), so that a backbone whose
    forward adds to tensors in place (ComfyUI's DiTs: ``x += gate * out``) can be backpropagated through."""
    if not wanted or not torch.is_grad_enabled():
        return nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_copy_activation, lambda t: t)


class Rollouts:
    """Sampling runs of a setup, with or without a fill on pattern D. (the gradient kept where the fill has one)."""

    def __init__(self, setup: DashSetup, device):
        self.setup, self.device = setup, torch.device(device)

    def end(self, run: dict, filler=None) -> torch.Tensor:
        s = self.setup
        cond = run["cond"]
        both = torch.cat([cond, s.null_condition(len(cond))])
        ctx = s.encode(both)
        kwargs = s.extra_kwargs(both) if s.extra_kwargs is not None else {}
        b = len(cond)
        den_args = (s.unet, s.sampling, ctx[:b], ctx[b:], run["cfg"])
        sigmas = normal_sigmas(s.sampling, run["steps"])
        noise = run["noise"].to(self.device)
        if filler is None:
            return sample(run["sampler"], GuidedDenoiser(*den_args, prediction=s.prediction, kwargs=kwargs), noise,
                          sigmas, s.sampling)
        router = MorseRouter(Pattern("D."), filler, measure=False, timestep_of=s.sampling.timestep)
        with router.run(sigmas) as r, _copies_of_saved_activations(s.inplace_forward):
            return sample(run["sampler"], GuidedDenoiser(*den_args, run=r, prediction=s.prediction, kwargs=kwargs),
                          noise, sigmas, s.sampling)


def draw_runs(setup: DashSetup, n: int, config: RolloutConfig, gen: torch.Generator) -> list[dict]:
    """``n`` runs: sampler, step count (log-uniform), CFG (uniform), the setup's conditions and fresh noise."""
    batches = setup.batches(config.batch, gen)
    out = []
    for _ in range(n):
        steps = int(math.exp(torch.empty(()).uniform_(math.log(config.min_steps), math.log(config.max_steps + 1),
                                                      generator=gen)))
        steps = min(max(steps, config.min_steps), config.max_steps)
        cfg = float(torch.empty(()).uniform_(config.cfg_min, config.cfg_max, generator=gen))
        sampler = config.samplers[int(torch.randint(0, len(config.samplers), (), generator=gen))]
        _, cond = next(batches)
        noise = torch.randn((config.batch, *setup.latent_shape), generator=gen)
        out.append(dict(sampler=sampler, steps=steps, cfg=cfg, noise=noise, cond=cond))
    return out


def make_targets(rollouts: Rollouts, runs: list[dict], desc: str, quiet: bool = False) -> list[dict]:
    for run in tqdm(runs, desc=desc, unit="run", mininterval=10, disable=quiet):
        with torch.no_grad():
            plain = rollouts.end(run).float()
            reuse = rollouts.end(run, ReuseFiller()).float()
        run["plain"] = plain.cpu()
        run["reuse_err"] = float((reuse - plain).pow(2).mean())
    return runs


def _save_runs(path: Path, runs: dict[str, list[dict]], key: dict) -> None:
    tensors, meta = {}, {"key": json.dumps(key)}
    for part, rows in runs.items():
        for i, r in enumerate(rows):
            for name in ("noise", "cond", "plain"):
                tensors[f"{part}.{i}.{name}"] = r[name].contiguous()
        meta[part] = json.dumps([{k: r[k] for k in ("sampler", "steps", "cfg", "reuse_err")} for r in rows])
    save_file_atomic(tensors, path, meta)


def _load_runs(path: Path, key: dict) -> Optional[dict[str, list[dict]]]:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if json.loads(meta.get("key", "null")) != key:
            return None
        out = {}
        for part in ("train", "fixed"):
            rows = json.loads(meta[part])
            for i, r in enumerate(rows):
                r.update({name: f.get_tensor(f"{part}.{i}.{name}") for name in ("noise", "cond", "plain")})
            out[part] = rows
    return out


def targets_for(setup: DashSetup, config: RolloutConfig, rollouts: Rollouts, cache: Path, log=print,
                dp: Optional[distributed.DataParallel] = None) -> dict:
    """The training and held-out runs with their plain ends and reuse errors, from ``cache`` where it was made
    with the same settings, else made (and written there). Data-parallel, every rank draws the same runs, makes
    the targets of every world_size-th one and gets the others' from the ranks that made them; rank 0 writes."""
    # the targets are this Dash's runs: another Dash (or weights) under the same run name makes them again
    key = {**config.target_key(), "dash": [setup.base_family, setup.fingerprint.architecture, setup.fingerprint.weights_id]}
    found = _load_runs(cache, key)
    if dp is not None:  # one answer for all ranks: a rank that found the cache must not wait for the others' targets
        found = found if int(dp.mean(torch.tensor(float(found is not None))) == 1.0) else None
    if found is not None:
        log(f"rollout targets: {len(found['train'])} + {len(found['fixed'])} runs from {cache}")
        return found
    gen = torch.Generator().manual_seed(config.seed)
    runs = {"train": draw_runs(setup, config.runs, config, gen), "fixed": draw_runs(setup, config.fixed_runs, config, gen)}
    for part, rows in runs.items():
        mine = rows if dp is None else rows[dp.rank::dp.world_size]
        make_targets(rollouts, mine, f"rollout targets ({part})", quiet=dp is not None and not dp.is_main)
        if dp is not None:
            dp.share_rows(rows, ("plain", "reuse_err"))
    if dp is None or dp.is_main:
        _save_runs(cache, runs, key)
    if dp is not None:
        dp.barrier()
    return runs


def end_error(rollouts: Rollouts, run: dict, filler) -> torch.Tensor:
    """The squared distance of the run's end with ``filler`` serving the fills to its end with Dash at every step."""
    end = rollouts.end(run, filler)
    return (end.float() - run["plain"].to(end.device)).pow(2).mean()


def relative_end_error(rollouts: Rollouts, run: dict, filler) -> torch.Tensor:
    """The run's end error with ``filler`` over reuse's (1: no better than reusing the anchor): the training loss."""
    return end_error(rollouts, run, filler) / max(run["reuse_err"], 1e-12)


def held_out_error(rollouts: Rollouts, runs: list[dict], filler, dp: Optional[distributed.DataParallel] = None) -> float:
    """The runs' summed end error with ``filler`` over reuse's summed end error: the held-out score (1: no better
    than reusing the anchor). A ratio of sums, so that each run weighs by its error rather than a run whose reuse
    error is tiny by its luck. Data-parallel, each rank scores every world_size-th run and the sums are shared."""
    mine = runs if dp is None else runs[dp.rank::dp.world_size]
    with torch.no_grad():
        errors = sum(float(end_error(rollouts, r, filler)) for r in mine)
    if dp is not None:
        errors = float(dp.mean(torch.tensor(errors, dtype=torch.float64))) * dp.world_size
    return errors / max(sum(r["reuse_err"] for r in runs), 1e-12)


def train_feature_dot(setup: DashSetup, blocks, config: RolloutConfig, state_path: Path, resume: bool = False,
                      runtime: Optional[Runtime] = None, log=print,
                      parallel: Optional[distributed.DataParallel] = None) -> RolloutResult:
    """Train a feature Dot for ``setup`` (its UNet's or DiT's ``blocks`` as the fills run them) with the rollout
    loss. A flow model whose timestep is sigma itself (ModelSamplingFlux) gets its times scaled to 0..1000.

    Under a launcher (``torchrun``, ``accelerate launch``; ``training/trainer/distributed.py``) every rank trains on
    a run of its own each step (its own stream of run indices; rank 0's is the single-process run's), the
    gradients are averaged before clipping, so every rank holds the same Dot, the targets and the held-out score
    are split over the ranks, and rank 0 alone logs and writes. ``parallel``: a group the caller already joined."""
    rt = runtime or Runtime(next(setup.unet.parameters()).device)
    dp, own_group = distributed.join(parallel, rt.device)
    quiet = dp is not None and not dp.is_main
    say = (lambda *a, **k: None) if quiet else log
    setup.unet.eval().requires_grad_(False)
    torch.manual_seed(config.seed)  # the same start weights on every rank
    dot_config = config.dot
    if getattr(setup.sampling, "multiplier", 1000.0) == 1.0:
        dot_config = replace(dot_config, time_scale=1000.0)
    dot = FeatureDot.build(setup.unet, dot_config.bound_to(setup.unet, setup.prediction)).to(rt.device)
    dot.train().requires_grad_(True)
    if dp:
        dp.broadcast_(list(dot.state_dict(keep_vars=True).values()))
    filler = fill_for(dot, setup.unet, blocks)
    rollouts = Rollouts(setup, rt.device)
    with rt.autocast():
        runs = targets_for(setup, config, rollouts, state_path.parent / "rollout-targets.safetensors", say, dp)
    opt = torch.optim.AdamW(dot.parameters(), lr=config.lr, weight_decay=0.0)
    scaler = rt.grad_scaler()
    gen = torch.Generator().manual_seed(dp.stream_seed(config.seed + 1) if dp else config.seed + 1)
    history, fixed_history, start = [], [], 0
    world = dp.world_size if dp else 1
    if resume:
        start, extra = resume_state(state_path, dot, opt, gen, rank=dp.rank if dp else None)
        check_same_settings(state_path, extra.get("config"), config.flat())
        if extra.get("world_size", 1) != world:
            raise ValueError(f"the checkpoint at {state_path} was written by a run of {extra.get('world_size', 1)} "
                             f"process(es), this one has {world}; resume with as many or start a new run")
        history, fixed_history = extra["history"], extra["fixed_history"]
        say(f"resumed at step {start} from {state_path}")
    t0 = time.time()

    def score_fixed(step: int) -> None:
        with rt.autocast():
            fixed_history.append([step, held_out_error(rollouts, runs["fixed"], filler, dp), 1.0])  # [step, loss, reuse's]

    if not fixed_history:
        score_fixed(0)  # the untrained Dot: the training-free forecast_k fill
    bar = tqdm(range(start, config.steps), desc="rollout training", unit="step", initial=start, total=config.steps,
               mininterval=10, disable=quiet)
    for step in bar:
        set_lr(opt, step, config)
        run = runs["train"][int(torch.randint(0, len(runs["train"]), (), generator=gen))]
        with rt.autocast():
            ratio = relative_end_error(rollouts, run, filler)
        value = dp.mean(ratio) if dp else ratio.detach()  # a NaN on one rank stops every rank at this step
        if not torch.isfinite(value):
            raise TrainingDiverged(f"the rollout loss is {float(value)} at step {step}; lower --lr (the last checkpoint "
                                   f"at {state_path} is kept)")
        opt.zero_grad()
        if ratio.requires_grad:  # a run with no fill call has nothing to learn from
            backward(ratio, scaler)
        if dp:  # every rank steps on the same mean gradient (a rank without one counts zeros)
            dp.average_gradients(dot.parameters())
        if ratio.requires_grad or dp:
            optimizer_step(opt, dot.parameters(), scaler)
        history.append(float(value))
        done = step + 1
        if done % config.fixed_every == 0 or done == config.steps:
            score_fixed(done)
            bar.set_postfix(fixed=f"{fixed_history[-1][1]:.3f}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            extra = {"config": config.flat(), "history": history, "fixed_history": fixed_history}
            if dp:
                extra["world_size"] = world
            rank_gens = dp.gather_generator_states(gen) if dp else None
            if not quiet:
                save_state(state_path, dot, opt, done, gen, extra, rank_generators=rank_gens)
    if dp:
        dp.barrier()  # no rank leaves before the last checkpoint is written
        if own_group:
            dp.close()
    dot.eval().requires_grad_(False)
    return _result(dot, config, history, fixed_history, time.time() - t0, start)


def _result(dot: FeatureDot, config: RolloutConfig, history: list, fixed_history: list, seconds: float,
            start: int) -> RolloutResult:
    tail = history[-max(1, len(history) // 5):]
    every = [sum(history[i:i + HISTORY_EVERY]) / len(history[i:i + HISTORY_EVERY])
             for i in range(0, len(history) - HISTORY_EVERY + 1, HISTORY_EVERY)]
    return RolloutResult(dot, config.steps, sum(tail) / len(tail), 1.0, seconds, start,
                         {"history": every, "reuse_history": [1.0] * len(every), "fixed_history": fixed_history})


@torch.no_grad()
def rollout_n(setup: DashSetup, filler, samples: int, device, seed: int = 0) -> dict:
    """N of the trained fill on the setup: the router's timing of Dash and fill calls in Euler runs with pattern D.
    (``samples`` under CFG: calls of twice that batch)."""
    from ..evaluation.fills import router_n

    gen = torch.Generator().manual_seed(seed)
    _, cond = next(setup.batches(samples, gen))
    cfg = 2.0  # any scale above 1: both CFG halves in one call, as sampling runs them
    both = torch.cat([cond, setup.null_condition(samples)])
    ctx = setup.encode(both)
    kwargs = setup.extra_kwargs(both) if setup.extra_kwargs is not None else {}
    noise = torch.randn((samples, *setup.latent_shape), generator=gen).to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    return router_n(lambda r: GuidedDenoiser(setup.unet, setup.sampling, ctx[:samples], ctx[samples:], cfg, run=r,
                                             prediction=setup.prediction, kwargs=kwargs),
                    noise, setup.sampling, filler, sync, cfg=cfg)
