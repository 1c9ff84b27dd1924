"""Evaluate Morse against the plain sampler: ``python -m training.evaluate``.

The protocol (DESIGN.md, "Evaluation protocol"; paper section 3.1):

1. **N is measured in the same run**: median wall time of one Dash call (the backbone on the
   batch the runs use, cond + uncond for CFG) and of one Dot call (same batch, a real anchor
   from a Dash call one step earlier), interleaved so both see the same machine load.
2. **Plain sampler curve**: each sampler at several step counts with ComfyUI's "normal"
   scheduler; latency in LSD = model calls per sample (= steps for one-call samplers).
3. **Morse curves**: at each LSD budget, :func:`morse_engine.plan_budget` with the measured N
   and the Dash/Dot pattern (default ``D.``) gives the steps and schedule; the sampler then
   runs through a :class:`morse_engine.MorseRouter` with the trained Dot. The training-free
   curves (anchor reuse, optionally linear extrapolation) use the same pattern planned with
   N = 1e12 (their fills cost ~nothing, so budget B runs B Dash steps plus fills); the
   ablation Dot (no trajectory inputs, paper Table 4) is planned with its own measured N.
4. **Quality**: Frechet distance between classifier features of the samples and of the
   held-out test split (lower is better, like FID); for deterministic samplers also the
   trajectory error, RMSE of the final samples against a many-step run of the same sampler
   from the same noise (on the first ``--reference-samples`` samples, which bounds the cost of
   the reference run). Every run uses the same noise and labels (seeded; labels cycle 0..9);
   the stochastic sampler gets a generator with the same seed in every run. Because of that
   shared noise, FD *differences* between runs are far steadier than FD itself: the spread
   check reruns two plain step counts with a second seed and reports both, and the noise on
   the difference is the tolerance of the "lossless" check (Morse's best FD vs plain's best).
5. **Speedup** per budget (:func:`morse_engine.speedup_curve`, linear interpolation on the plain
   curve) and its average, for FD and for trajectory error.

Writes ``<out-dir>/evaluation.json`` and ``<out-dir>/evaluation.png`` and prints a table.
Samples are generated in chunks of ``--chunk`` samples (each chunk one sampling run); N is
measured on that same batch, because per-sample cost depends on the batch on a CPU.

Threads default to 1: on a small CPU machine shared with other jobs, a 2-thread torch job
was measured 25x slower than a 1-thread one (60 vs 2.5 ms per sample and Dash call) while
another process kept one core busy. ``--threads 0`` keeps torch's own choice.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from morse_engine import DotFiller, ExtrapolateFiller, MorseError, Pattern, ReuseFiller

from .evaluation import report as report_mod
from .evaluation.latency import measure_latency
from .evaluation.quality import Quality
from .evaluation.samplers import DETERMINISTIC, SAMPLERS
from .evaluation.workload import (CALLS_PER_STEP, DEFAULT_ABLATION_DOT, DEFAULT_DOT, TRAINING_FREE_N, Workload, default_cfg,
                                  load_models, reference_workload, run_morse, run_plain)
from .paths import PACK_DIR, REPORTS_DIR

SPREAD_SEED_OFFSET = 1000  # the second noise seed of the FD spread check

DEFAULTS = dict(
    samplers=("euler", "dpmpp_2m", "euler_ancestral"),
    budgets=(4, 6, 8, 12, 20, 30, 50),
    plain_steps=(3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    samples=96,
    chunk=96,
    reference_steps=200,
    reference_samples=48,
    ablation_samplers=("euler",),
    extrapolate=True,
    spread=True,
    n_repeats=15,
    n_warmup=2,
)
QUICK = dict(  # the test-sized run: only what differs from DEFAULTS
    DEFAULTS,
    samplers=("euler",),
    budgets=(4, 8),
    plain_steps=(4, 8, 12),
    samples=64,
    chunk=64,
    reference_steps=50,
    reference_samples=64,
    spread=False,
    extrapolate=False,
    n_repeats=5,
    n_warmup=1,
)


# --------------------------------------------------------------------------- CLI
def _csv(kind):
    def parse(text):
        values = tuple(kind(v) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError("give at least one value, comma-separated")
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--dash", type=Path, default=None, help="reference-format Dash weights (default: the embedded reference model)")
    p.add_argument("--dot", type=Path, default=None, help=f"Dot adapter (default: {DEFAULT_DOT.relative_to(PACK_DIR)})")
    p.add_argument("--ablation-dot", type=Path, default=None,
                   help=f"Dot without trajectory inputs (default: {DEFAULT_ABLATION_DOT.relative_to(PACK_DIR)} if it exists)")
    p.add_argument("--no-ablation", action="store_true", help="skip the ablation curve")
    p.add_argument("--ablation-samplers", type=_csv(str), default=None, help="samplers with an ablation curve (default: euler)")
    p.add_argument("--samplers", type=_csv(str), default=None, help="comma-separated (default: euler,dpmpp_2m,euler_ancestral)")
    p.add_argument("--budgets", type=_csv(float), default=None, help="Morse LSD budgets, comma-separated")
    p.add_argument("--plain-steps", type=_csv(int), default=None, help="plain sampler step counts, comma-separated")
    p.add_argument("--reference-steps", type=int, default=None, help="steps of the trajectory reference run")
    p.add_argument("--reference-samples", type=int, default=None,
                   help="trajectory error is measured on the first this many samples (the reference run's cost)")
    p.add_argument("--samples", type=int, default=None, help="samples per run (labels cycle 0..9)")
    p.add_argument("--chunk", type=int, default=None, help="samples per sampling run (batch = 2 x chunk with CFG)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the Dash file's, else 2.0)")
    p.add_argument("--pattern", default="D.", help="Dash/Dot pattern for Morse budgets ('D' Dash, '.' Dot); default 'D.'")
    p.add_argument("--extrapolate", action=argparse.BooleanOptionalAction, default=None,
                   help="the training-free extrapolation curve beside reuse (default: on; off with --quick)")
    p.add_argument("--no-spread", action="store_true", help="skip the FD spread check across two noise seeds")
    p.add_argument("--n-repeats", type=int, default=None, help="timed repeats of each call for N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPORTS_DIR)
    p.add_argument("--quick", action="store_true", help="a small run (< 2 min on 2 CPU cores) for tests and smoke checks")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a small shared CPU machine any other busy process slows a "
                        "2-thread torch job down many times over, measured 25x here; 0 = torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device (timings and N are only comparable on the same device)")
    return p


def settings_from(args) -> dict:
    base = dict(QUICK if args.quick else DEFAULTS)
    for key in ("samplers", "budgets", "plain_steps", "samples", "chunk", "reference_steps", "reference_samples", "ablation_samplers",
                "extrapolate", "n_repeats"):
        val = getattr(args, key)
        if val is not None:
            base[key] = val
    if args.no_spread:
        base["spread"] = False
    base["chunk"] = min(base["chunk"], base["samples"])
    base["reference_samples"] = min(base["reference_samples"], base["samples"])
    for name in base["samplers"]:
        if name not in SAMPLERS:
            raise SystemExit(f"error: --samplers: {name!r} is not one of {sorted(SAMPLERS)}")
    if min(base["budgets"]) < 1:
        raise SystemExit("error: --budgets must all be >= 1 LSD (one Dash step)")
    if min(base["plain_steps"]) < 1 or base["samples"] < 2:
        raise SystemExit("error: --plain-steps must be >= 1 and --samples >= 2")
    try:
        Pattern(args.pattern)
    except MorseError as exc:
        raise SystemExit(f"error: --pattern: {exc}") from None
    return base


def spread_steps(plain_steps) -> tuple[int, ...]:
    """Step counts of the seed-spread check: the largest plain count up to 20 and one about half of it."""
    small = [s for s in plain_steps if s <= 20]
    high = max(small) if small else min(plain_steps)
    lower = [s for s in plain_steps if s <= high / 2] or [s for s in plain_steps if s < high]
    return (max(lower), high) if lower else (high,)


def spread_summary(name: str, seeds, plain: list, second: dict) -> dict:
    """How much FD moves with the noise seed: its level, and the difference between two step counts.

    Every run of the evaluation shares one noise seed, so what matters for its comparisons is
    the noise on a *difference* between runs; the level moves far more (measured ~15%).
    """
    first = {p["steps"]: p["fd"] for p in plain}
    steps = sorted(second)
    out = {"sampler": name, "steps": steps, "seeds": list(seeds),
           "fd": {str(seeds[0]): [first[s] for s in steps], str(seeds[1]): [second[s] for s in steps]},
           "level_diff": abs(first[steps[-1]] - second[steps[-1]])}
    if len(steps) == 2:
        d0 = first[steps[1]] - first[steps[0]]
        d1 = second[steps[1]] - second[steps[0]]
        out["difference"] = [d0, d1]
        out["difference_noise"] = abs(d0 - d1)
    return out


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _strip(point: dict) -> dict:
    return {k: v for k, v in point.items() if not k.startswith("_")}


def plan_jobs(st: dict, with_ablation: bool) -> list[tuple[str, str, float]]:
    """Every run as (sampler, kind, steps or budget), so progress and the estimate are honest."""
    jobs = []
    for name in st["samplers"]:
        if name in DETERMINISTIC:
            jobs.append((name, "reference", st["reference_steps"]))
        jobs += [(name, "plain", s) for s in st["plain_steps"]]
        jobs += [(name, "morse", b) for b in st["budgets"]]
        jobs += [(name, "training-free", b) for b in st["budgets"]]
        if st["extrapolate"]:
            jobs += [(name, "training-free-extrapolate", b) for b in st["budgets"]]
        if with_ablation and name in st["ablation_samplers"]:
            jobs += [(name, "ablation", b) for b in st["budgets"]]
    if st["spread"]:
        jobs += [(st["samplers"][0], "spread", v) for v in spread_steps(st["plain_steps"])]
    return jobs


def run_jobs(jobs, work: Workload, quality: Quality, fillers: dict, st: dict, pattern: str, seed: int) -> dict:
    """Run every job; returns the curves per sampler, reference runs, second-seed FDs, in-run timing."""
    from tqdm import tqdm

    curves = {n: {} for n in st["samplers"]}
    references, reference_info, spread_fd = {}, {}, {}
    in_run = {"dash_calls": 0, "dot_calls": 0, "dash_seconds": 0.0, "dot_seconds": 0.0}
    noise2 = None  # the spread check's second noise seed
    bar = tqdm(jobs, desc="evaluate", unit="run", file=sys.stdout, dynamic_ncols=True)
    for name, kind, value in bar:
        bar.set_postfix_str(f"{name} {kind} {value:g}")
        if kind == "reference":
            x, info = run_plain(name, work.subset(st["reference_samples"]), int(value))
            references[name] = x
            reference_info[name] = {**info, "samples": x.shape[0]}
            continue
        if kind == "spread":
            if noise2 is None:
                g = torch.Generator().manual_seed(seed + SPREAD_SEED_OFFSET)
                noise2 = torch.randn(work.noise.shape, generator=g).to(work.noise.device)
            x, _ = run_plain(name, work, int(value), noise=noise2)
            spread_fd[int(value)] = quality.fd(x)
            continue
        if kind == "plain":
            x, point = run_plain(name, work, int(value))
        else:
            filler, n_fill = fillers[kind]
            x, point = run_morse(name, work, value, pattern, filler, n_fill)
            if kind == "morse":
                for k in in_run:
                    in_run[k] += point["_timing"][k]
        point["fd"] = quality.fd(x)
        if name in references:
            point["rmse"] = quality.rmse(x[: references[name].shape[0]], references[name])
        curves[name].setdefault(kind, []).append(_strip(point))
    bar.close()
    return {"curves": curves, "reference_info": reference_info, "spread_fd": spread_fd, "in_run": in_run}


def main(argv=None) -> int:
    wall_start = time.perf_counter()
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    st = settings_from(args)

    from .reference.classifier import load_feature_classifier, real_data_fd_floor
    from .reference.digits import load_digits_split

    device = torch.device(args.device)
    try:
        models = load_models(args.dash, args.dot, None if args.no_ablation else (args.ablation_dot or DEFAULT_ABLATION_DOT),
                             device)
    except (MorseError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unet = models.unet
    cfg = args.cfg if args.cfg is not None else default_cfg(models.dash_meta)
    samples = st["samples"]
    # the same noise and labels for every run
    work = reference_workload(models, samples, st["chunk"], cfg, args.seed, device)

    classifier, _ = load_feature_classifier(device=device)
    quality = Quality(classifier, load_digits_split("test")[0].to(device))
    train_images = load_digits_split("train")[0]
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))[:samples]
    fd_floor_same_n = quality.fd(train_images[pick].to(device))
    fd_floor_full = real_data_fd_floor(classifier)

    print(f"Measuring N on the runs' batch ({work.chunk} samples{'' if cfg == 1.0 else ' x 2 for CFG'}; {args.device}, "
          f"{torch.get_num_threads()} threads)...", flush=True)
    latency = measure_latency(unet, models.dot, work, st["n_repeats"], st["n_warmup"])
    latency_abl = measure_latency(unet, models.ablation[0], work, st["n_repeats"], st["n_warmup"]) if models.ablation else None
    n_speed = latency["N"]
    print(f"  Dash {latency['dash_seconds'] * 1e3:.1f} ms, Dot {latency['dot_seconds'] * 1e3:.1f} ms per call: N = {n_speed:.2f}"
          + (f"; ablation Dot N = {latency_abl['N']:.2f}" if latency_abl else ""), flush=True)

    jobs = plan_jobs(st, models.ablation is not None)
    per_row = latency["dash_seconds"] / latency["batch"]
    sample_steps = sum(CALLS_PER_STEP.get(n, 1) * v * (st["reference_samples"] if kind == "reference" else samples)
                       for n, kind, v in jobs)
    est = sample_steps * (1 if cfg == 1.0 else 2) * per_row
    print(f"{len(jobs)} runs, {sample_steps:g} sample-steps in Dash-call equivalents: estimated {est / 60:.1f} min", flush=True)

    fillers = {
        "morse": (DotFiller(models.dot, unet), n_speed),
        "training-free": (ReuseFiller(), TRAINING_FREE_N),
        "training-free-extrapolate": (ExtrapolateFiller(), TRAINING_FREE_N),
    }
    if models.ablation:
        fillers["ablation"] = (DotFiller(models.ablation[0], unet), latency_abl["N"])
    done = run_jobs(jobs, work, quality, fillers, st, args.pattern, args.seed)

    spread = None
    if done["spread_fd"]:
        name0 = st["samplers"][0]
        spread = spread_summary(name0, (args.seed, args.seed + SPREAD_SEED_OFFSET), done["curves"][name0]["plain"],
                                done["spread_fd"])
    tolerance = (spread or {}).get("difference_noise", 0.0)
    samplers = {
        name: report_mod.sampler_report(name, done["curves"][name], name in DETERMINISTIC, tolerance,
                                        reference=done["reference_info"].get(name))
        for name in st["samplers"]
    }
    t = done["in_run"]
    n_in_run = None
    if t["dash_calls"] and t["dot_calls"] and t["dot_seconds"] > 0:
        n_in_run = (t["dash_seconds"] / t["dash_calls"]) / (t["dot_seconds"] / t["dot_calls"])

    info, abl = models.dot_info, models.ablation
    report = {
        "N": n_speed,
        "N_ablation": latency_abl["N"] if latency_abl else None,
        "N_in_run": n_in_run,
        "latency": latency,
        "latency_ablation": latency_abl,
        "machine": machine_info(args.device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "title": f"Morse on {'the reference Dash' if args.dash is None else Path(args.dash).name}",
        "dash": str(args.dash) if args.dash else "embedded reference model",
        "dot": {"path": info.path, "describe": info.describe(), "file_n": info.measured_n,
                "trained": bool(info.training), "training_steps": (info.training or {}).get("steps")},
        "ablation_dot": ({"path": abl[1].path, "describe": abl[1].describe(), "trained": bool(abl[1].training)}
                         if abl else None),
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in st.items()},
                     "cfg": cfg, "pattern": args.pattern, "seed": args.seed, "scheduler": "normal", "quick": args.quick},
        "fd_floor": fd_floor_same_n,
        "fd_floor_note": f"FD of {samples} real train images vs the test split (a perfect generator with this many samples)",
        "fd_floor_full_train": fd_floor_full,
        "fd_spread": spread,
        "notes": models.notes,
        "samplers": samplers,
        "wall_seconds": None,
    }
    print()
    print(report_mod.format_report(report))
    out_dir = Path(args.out_dir)
    png = report_mod.plot_report(report, out_dir / "evaluation.png")
    report["wall_seconds"] = time.perf_counter() - wall_start
    js = report_mod.write_json(report, out_dir / "evaluation.json")
    for note in report["notes"]:
        print("note: " + note)
    print(f"\nWrote {js} and {png}")
    print(f"Wall time: {report['wall_seconds']:.1f} s ({report['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
