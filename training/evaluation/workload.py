"""The evaluation's workload and its sampling runs: plain, and routed through Morse with a fill.

Every run of an evaluation shares one :class:`Workload`: the Dash, its schedule, the noise, the
conditions and CFG, so runs differ only in how the steps are spent. Latency in LSD is counted
from the model calls each run actually made.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from morse_engine import AutoPattern, BudgetSchedule, MorseRouter, Pattern, load_dot, plan_budget
from morse_engine.parameterization import DiscreteSchedule
from morse_engine.schedules import FREE_FILL_N

from ..paths import DOT_DIR
from .samplers import GuidedDenoiser, normal_sigmas, sample

DEFAULT_DOT = DOT_DIR / "reference_digits.safetensors"
DEFAULT_ABLATION_DOT = DOT_DIR / "reference_digits_no_trajectory.safetensors"
TRAINING_FREE_N = FREE_FILL_N  # training-free fills cost ~nothing: planned as (almost) free, as the nodes do
CALLS_PER_STEP = {"heun": 2}  # model calls per step; everything else in evaluation.samplers makes one


@dataclass
class Workload:
    """What every run shares: the Dash, its schedule, the noise, the conditions, CFG."""

    unet: torch.nn.Module
    ms: DiscreteSchedule
    noise: torch.Tensor  # [S, C, H, W]
    cond: torch.Tensor  # context [S, T, D]
    uncond: torch.Tensor  # context [S, T, D]
    cfg: float
    chunk: int
    seed: int
    sync: Optional[Callable] = None

    def chunks(self):
        for i in range(0, self.noise.shape[0], self.chunk):
            yield slice(i, i + self.chunk)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.noise.shape[0] / self.chunk)

    def generator(self) -> torch.Generator:
        """The stochastic samplers' generator: the same seed in every run."""
        return torch.Generator(device=self.noise.device).manual_seed(self.seed + 1)


class CountingDash:
    """The backbone, counting its calls (plain runs: latency in LSD = calls per sample)."""

    def __init__(self, unet):
        self.unet, self.calls = unet, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


@torch.no_grad()
def run_plain(sampler: str, work: Workload, steps: int, noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    noise = work.noise if noise is None else noise
    sigmas = normal_sigmas(work.ms, steps)
    dash = CountingDash(work.unet)
    gen = work.generator()
    out = []
    start = time.perf_counter()
    for sl in work.chunks():
        den = GuidedDenoiser(dash, work.ms, work.cond[sl], work.uncond[sl], work.cfg)
        out.append(sample(sampler, den, noise[sl], sigmas, work.ms, gen))
    seconds = time.perf_counter() - start
    return torch.cat(out), {"steps": steps, "lsd": dash.calls / work.n_chunks, "seconds": seconds}


AUTO = "auto"  # the pattern name of the budget planner's own choice (morse_engine.pattern_choice)


@torch.no_grad()
def run_morse(sampler: str, work: Workload, budget: float, pattern: str, filler, n_speed: Optional[float],
              table: Optional[dict] = None, final_dash: int = 0) -> tuple[torch.Tensor, dict]:
    """One Morse run at an LSD budget; latency from the calls the router actually made. A free fill
    (``filler.free``) costs nothing and is planned so; a fill with a network costs 1/N a call. The pattern
    ``auto`` is the planner's choice for this budget, N, sampler and the fill's measured ``table``, as the
    nodes make it. ``final_dash``: the last n steps run on Dash (the schedule node's option)."""
    cps = CALLS_PER_STEP.get(sampler, 1)
    if filler.free:
        n_speed = TRAINING_FREE_N
    if pattern == AUTO:
        plan = BudgetSchedule(AutoPattern(final_dash=final_dash), max(1.0, budget / cps)).plan(n_speed, sampler, table)
        spec = plan.spec
    else:
        spec = Pattern(pattern, final_dash=final_dash)
        plan = plan_budget(max(1.0, budget / cps), n_speed, spec)
    start = time.perf_counter()
    x, totals = sample_routed(sampler, work, plan.steps, spec, filler)
    seconds = time.perf_counter() - start
    n = work.n_chunks
    dash_per, dot_per = totals["dash_calls"] / n, totals["dot_calls"] / n
    fill_cost = 0.0 if filler.free else dot_per / n_speed
    point = {
        "budget": float(budget),
        "lsd": dash_per + fill_cost,
        "planned_lsd": plan.lsd * cps,
        "steps": plan.steps,
        "dash_steps": plan.schedule.dash_steps,
        "dot_steps": plan.schedule.dot_steps,
        "pattern": plan.schedule.pattern(),
        "chosen": None if plan.choice is None else {"pattern": plan.choice.pattern, "source": plan.choice.source,
                                                     "reason": plan.choice.reason},
        "filler": filler.name,
        "dash_calls_per_run": dash_per,
        "fill_calls_per_run": dot_per,
        "fallback_calls": totals["fallback_calls"],
        "seconds": seconds,
        "_timing": totals,
    }
    return x, point


@torch.no_grad()
def sample_routed(sampler: str, work: Workload, steps: int, spec, filler) -> tuple[torch.Tensor, dict]:
    """Sample ``steps`` steps with every model call going through the Morse router under ``spec``;
    returns the samples and the router's call counts and times summed over the chunks."""
    sigmas = normal_sigmas(work.ms, steps)
    router = MorseRouter(spec, filler, measure=True, sync=work.sync, timestep_of=work.ms.timestep,
                         percent_to_sigma=work.ms.percent_to_sigma)
    gen = work.generator()
    out = []
    totals = dict(dash_calls=0, dot_calls=0, fallback_calls=0, probe_calls=0, dash_seconds=0.0, dot_seconds=0.0)
    for sl in work.chunks():
        with router.run(sigmas) as run:
            den = GuidedDenoiser(work.unet, work.ms, work.cond[sl], work.uncond[sl], work.cfg, run=run)
            out.append(sample(sampler, den, work.noise[sl], sigmas, work.ms, gen))
        s = router.last_summary
        for k in totals:
            totals[k] += getattr(s, k)
    return torch.cat(out), totals


@torch.no_grad()
def sample_denoiser_cached(sampler: str, work: Workload, steps: int, spec) -> tuple[torch.Tensor, dict]:
    """Sample with LazyCache around the whole guided prediction (where ComfyUI's node wraps ``predict_noise``);
    returns the samples and the model calls made (each computed step one call of the cond + uncond batch)."""
    from morse_engine.peers.lazycache import LazyCacheRun

    sigmas = normal_sigmas(work.ms, steps)
    gen = work.generator()
    out, calls, skipped = [], 0, 0
    for sl in work.chunks():
        run = LazyCacheRun(spec, sigmas, work.ms.percent_to_sigma)
        den = GuidedDenoiser(work.unet, work.ms, work.cond[sl], work.uncond[sl], work.cfg)
        out.append(sample(sampler, lambda x, sigma: run(den, x, sigma), work.noise[sl], sigmas, work.ms, gen))
        calls, skipped = calls + run.calls, skipped + run.skipped
    return torch.cat(out), {"dash_calls": calls, "dot_calls": skipped, "fallback_calls": 0, "probe_calls": 0}


def default_cfg(dash_meta: dict) -> float:
    """The CFG scale the Dash file's own quality check used, else 2.5."""
    check = dash_meta.get("quality_check")
    if isinstance(check, dict) and isinstance(check.get("cfg_scale"), (int, float)):
        return float(check["cfg_scale"])
    return 2.5


@dataclass
class Models:
    unet: torch.nn.Module
    conditioner: torch.nn.Module
    dash_meta: dict
    dot: Optional[torch.nn.Module]  # None where the Dash has no Dot yet (the reference DiT)
    dot_info: object
    ablation: Optional[tuple] = None  # (PaperDot, DotFileInfo) of the no-trajectory Dot
    notes: list = field(default_factory=list)
    dash_path: Optional[Path] = None  # the Dash weights file


def is_dit(dash_meta: dict) -> bool:
    return dash_meta.get("kind") == "reference_dit"


def load_reference_backbone(path=None, device="cpu"):
    """(model, conditioner, metadata) of a project weights file: the reference UNet (default) or the reference DiT,
    told apart by the file's own metadata."""
    from ..reference.dit import load_reference_dit
    from ..reference.unet import DEFAULT_DASH_PATH, load_reference_dash
    from ..reference.weights_file import read_weights_with_config

    path = Path(path or DEFAULT_DASH_PATH)
    _, meta = read_weights_with_config(path, "reference Dash weights", "python -m training.train_reference")
    return (load_reference_dit if is_dit(meta) else load_reference_dash)(path, device=device)


def load_models(dash_path=None, dot_path=None, ablation_path=None, device="cpu") -> Models:
    """The Dash (default: the reference model), the Dot and, where ``ablation_path`` is given and exists, the
    ablation Dot; MorseError for a Dot that does not fit. A DiT Dash without ``dot_path`` gets no Dot (the
    committed Dots are the UNet's)."""
    from ..reference.unet import DEFAULT_DASH_PATH

    unet, conditioner, dash_meta = load_reference_backbone(dash_path, device=device)
    if is_dit(dash_meta):
        if dot_path is None:
            models = Models(unet, conditioner, dash_meta, None, None, dash_path=Path(dash_path))
            models.notes.append(f"{Path(dash_path).name} is a DiT: no Dot is compared (give one with --dot)")
            return models
        if ablation_path == DEFAULT_ABLATION_DOT:  # the committed ablation Dot is the UNet's
            ablation_path = None
    dot_path = dot_path or DEFAULT_DOT
    if not Path(dot_path).is_file():
        raise FileNotFoundError(f"no Dot at {dot_path}; train one with `python -m training.train_dot` or pass --dot PATH")
    dot, dot_info = load_dot(dot_path, unet, device=device)
    models = Models(unet, conditioner, dash_meta, dot, dot_info, dash_path=Path(dash_path or DEFAULT_DASH_PATH))
    if not dot_info.training:
        models.notes.append(f"the Dot {dot_path} has no training summary: it is probably UNTRAINED (eta = 0, same as reuse)")
    if ablation_path is None:
        return models
    abl_path = ablation_path
    if not Path(abl_path).is_file():
        models.notes.append(f"no ablation Dot at {abl_path} (train one with `python -m training.train_dot --no-trajectory`); "
                            "ablation curve skipped")
        print("note: " + models.notes[-1])
        return models
    models.ablation = load_dot(abl_path, unet, device=device)
    if not models.ablation[1].training:
        models.notes.append(f"the ablation Dot {abl_path} has no training summary: it is probably UNTRAINED")
    if models.ablation[1].config.trajectory:
        models.notes.append(f"ablation Dot {abl_path} uses trajectory inputs: it is not the Table 4 ablation")
    return models


def reference_workload(models: "Models", samples: int, chunk: int, cfg: float, seed: int, device) -> Workload:
    """The reference model's workload: seeded noise, labels cycling 0..9, their contexts and the null class's."""
    from morse_engine.parameterization import schedule_from_dict

    from ..reference.unet import NULL_CLASS, sd_alphas_cumprod

    shape = tuple(models.dash_meta.get("image_size") or (models.unet.in_channels, 32, 32))
    noise = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    labels = torch.arange(samples) % 10
    with torch.no_grad():
        cond = models.conditioner(labels.to(device))
        uncond = models.conditioner(torch.full((samples,), NULL_CLASS, device=device))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    ms = (schedule_from_dict(models.dash_meta["schedule"]) if is_dit(models.dash_meta)
          else DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod()))
    return Workload(models.unet, ms, noise, cond, uncond, cfg,
                    min(chunk, samples), seed, sync)
