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
        with router.run(sigmas) as r:
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


def make_targets(rollouts: Rollouts, runs: list[dict], desc: str) -> list[dict]:
    for run in tqdm(runs, desc=desc, unit="run", mininterval=10):
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


def targets_for(setup: DashSetup, config: RolloutConfig, rollouts: Rollouts, cache: Path, log=print) -> dict:
    """The training and held-out runs with their plain ends and reuse errors, from ``cache`` where it was made
    with the same settings, else made (and written there)."""
    # the targets are this Dash's runs: another Dash (or weights) under the same run name makes them again
    key = {**config.target_key(), "dash": [setup.base_family, setup.fingerprint.architecture, setup.fingerprint.weights_id]}
    found = _load_runs(cache, key)
    if found is not None:
        log(f"rollout targets: {len(found['train'])} + {len(found['fixed'])} runs from {cache}")
        return found
    gen = torch.Generator().manual_seed(config.seed)
    runs = {"train": draw_runs(setup, config.runs, config, gen), "fixed": draw_runs(setup, config.fixed_runs, config, gen)}
    for part, rows in runs.items():
        make_targets(rollouts, rows, f"rollout targets ({part})")
    _save_runs(cache, runs, key)
    return runs


def end_error(rollouts: Rollouts, run: dict, filler) -> torch.Tensor:
    """The squared distance of the run's end with ``filler`` serving the fills to its end with Dash at every step."""
    end = rollouts.end(run, filler)
    return (end.float() - run["plain"].to(end.device)).pow(2).mean()


def relative_end_error(rollouts: Rollouts, run: dict, filler) -> torch.Tensor:
    """The run's end error with ``filler`` over reuse's (1: no better than reusing the anchor): the training loss."""
    return end_error(rollouts, run, filler) / max(run["reuse_err"], 1e-12)


def held_out_error(rollouts: Rollouts, runs: list[dict], filler) -> float:
    """The runs' summed end error with ``filler`` over reuse's summed end error: the held-out score (1: no better
    than reusing the anchor). A ratio of sums, so that each run weighs by its error rather than a run whose reuse
    error is tiny by its luck."""
    with torch.no_grad():
        errors = sum(float(end_error(rollouts, r, filler)) for r in runs)
    return errors / max(sum(r["reuse_err"] for r in runs), 1e-12)


def train_feature_dot(setup: DashSetup, blocks, config: RolloutConfig, state_path: Path, resume: bool = False,
                      runtime: Optional[Runtime] = None, log=print) -> RolloutResult:
    """Train a feature Dot for ``setup`` (its UNet's or DiT's ``blocks`` as the fills run them) with the rollout
    loss. A flow model whose timestep is sigma itself (ModelSamplingFlux) gets its times scaled to 0..1000."""
    rt = runtime or Runtime(next(setup.unet.parameters()).device)
    setup.unet.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    dot_config = config.dot
    if getattr(setup.sampling, "multiplier", 1000.0) == 1.0:
        dot_config = replace(dot_config, time_scale=1000.0)
    dot = FeatureDot.build(setup.unet, dot_config.bound_to(setup.unet, setup.prediction)).to(rt.device)
    dot.train().requires_grad_(True)
    filler = fill_for(dot, setup.unet, blocks)
    rollouts = Rollouts(setup, rt.device)
    with rt.autocast():
        runs = targets_for(setup, config, rollouts, state_path.parent / "rollout-targets.safetensors", log)
    opt = torch.optim.AdamW(dot.parameters(), lr=config.lr, weight_decay=0.0)
    scaler = rt.grad_scaler()
    gen = torch.Generator().manual_seed(config.seed + 1)
    history, fixed_history, start = [], [], 0
    if resume:
        start, extra = resume_state(state_path, dot, opt, gen)
        check_same_settings(state_path, extra.get("config"), config.flat())
        history, fixed_history = extra["history"], extra["fixed_history"]
        log(f"resumed at step {start} from {state_path}")
    t0 = time.time()

    def score_fixed(step: int) -> None:
        with rt.autocast():
            fixed_history.append([step, held_out_error(rollouts, runs["fixed"], filler), 1.0])  # [step, loss, reuse's]

    if not fixed_history:
        score_fixed(0)  # the untrained Dot: the training-free forecast_k fill
    bar = tqdm(range(start, config.steps), desc="rollout training", unit="step", initial=start, total=config.steps,
               mininterval=10)
    for step in bar:
        set_lr(opt, step, config)
        run = runs["train"][int(torch.randint(0, len(runs["train"]), (), generator=gen))]
        with rt.autocast():
            ratio = relative_end_error(rollouts, run, filler)
        if not torch.isfinite(ratio):
            raise TrainingDiverged(f"the rollout loss is {float(ratio)} at step {step}; lower --lr (the last checkpoint "
                                   f"at {state_path} is kept)")
        opt.zero_grad()
        if ratio.requires_grad:  # a run with no fill call has nothing to learn from
            backward(ratio, scaler)
            optimizer_step(opt, dot.parameters(), scaler)
        history.append(float(ratio.detach()))
        done = step + 1
        if done % config.fixed_every == 0 or done == config.steps:
            score_fixed(done)
            bar.set_postfix(fixed=f"{fixed_history[-1][1]:.3f}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_state(state_path, dot, opt, done, gen,
                       {"config": config.flat(), "history": history, "fixed_history": fixed_history})
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
