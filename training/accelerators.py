"""Every accelerator on one table: ``python -m training.accelerators``.

On both reference models (the 0.9M eps UNet with euler and dpmpp_2m, the 0.92M Flux-layout flow DiT with euler)
and one workload per model (n samples from seeded noise, labels cycling, the Dash file's CFG): the plain sampler at
several step counts; each peer at its published default and at the settings around it (EasyCache and LazyCache
from ComfyUI, TeaCache and MagCache calibrated on the model's training split as their authors calibrate theirs,
First Block Cache, TaylorSeer of orders 1 and 2, DeepCache, Faster Diffusion; ``morse_engine.peers``); Morse with
its Dot and its training-free fills on fixed patterns and on adaptive Dash. Every run's LSD is counted from the
calls it made, each fill's N measured in this run. Per budget from 4 to 50 LSD, each accelerator's best run within
it and its speedup over plain at equal trajectory RMSE and at equal FD to the Dash's converged distribution, with
90% paired-bootstrap intervals; the best Morse configuration against every peer, and over the best peer.

Writes ``<out-dir>/accelerators.{json,md,png}``. The default run (16 samples, a thinned grid) is sized for < 20 min
on 2 CPU cores; the committed report is ``--samples 32 --grid full``; ``--samples 1000 --grid full`` is the
published size (``scripts/gpu_full_run.sh``), ``--quick`` the test-sized one.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from morse_engine import AdaptiveDash
from morse_engine.adaptive import MORSE_WINDOW

from .evaluation import accelerator_report
from .evaluation.accelerator_set import DENOISER, MORSE, morse_rows, peer_rows, thinned
from .evaluation.analysis import Scorer, json_ready
from .evaluation.calibration import calibrate_magcache, calibrate_teacache
from .evaluation.fills import collect_fills, measure_fill_n
from .evaluation.frontier import accelerator_table, morse_against_peers
from .evaluation.workload import default_cfg, load_models, reference_workload, run_plain, sample_denoiser_cached, sample_routed
from .paths import DOT_DIR, REFERENCE_DIR, REPORTS_DIR

MODELS = {
    "unet": dict(dash=None, dot=DOT_DIR / "reference_digits.safetensors", samplers=("euler", "dpmpp_2m")),
    "dit": dict(dash=REFERENCE_DIR / "reference_dit.safetensors", dot=DOT_DIR / "reference_dit_digits.safetensors",
                samplers=("euler",)),
}
MORSE_FILLS = ("dot", "extrapolate", "forecast_k1")
PLAIN_STEPS = (3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONVERGED_SEED_OFFSETS = (1000, 2000, 3000)  # as the evaluation's: disjoint from the runs' noise and each other's
QUICK = dict(samples=8, plain=(4, 8, 16), steps=(8,), settings=1, replicates=20, reference_steps=20,
             converged_steps=8)
# the default run's grid (--grid default): 3 settings a row, fewer step counts; --grid full: every row as built
DEFAULT_GRID = dict(settings=3, peer_steps=(8, 16, 48), fixed_steps=(4, 8, 16, 48))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.accelerators", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="unet,dit", help="which reference models: unet, dit or both")
    p.add_argument("--samples", type=int, default=16, help="samples per run (labels cycle 0..9)")
    p.add_argument("--grid", choices=("default", "full"), default="default",
                   help="default: 3 settings per accelerator and fewer step counts (< 20 min on 2 CPU cores); full: "
                        "every setting at every step count (the committed report, and the GPU run)")
    p.add_argument("--reference-steps", type=int, default=200, help="euler / dpmpp_2m steps of the trajectory reference")
    p.add_argument("--converged-steps", type=int, default=60, help="dpmpp_2m steps of the converged sets (FD)")
    p.add_argument("--replicates", type=int, default=200, help="bootstrap replicates of each interval")
    p.add_argument("--quick", action="store_true", help="a test-sized run (a few settings, 16 samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, default=REPORTS_DIR)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = set(kinds) - set(MODELS)
    if unknown or not kinds:
        print(f"error: --models: {sorted(unknown) or 'none given'}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.samples < 8:
        print("error: --samples must be >= 8 (the intervals need a few samples)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = {"title": "Every accelerator against plain sampling and against each other",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": {"samples": QUICK["samples"] if args.quick else args.samples, "seed": args.seed,
                           "replicates": QUICK["replicates"] if args.quick else args.replicates, "level": 0.9,
                           "quick": args.quick, "grid": "quick" if args.quick else args.grid,
                           "threads": torch.get_num_threads(), "device": args.device,
                           "morse_window": dict(MORSE_WINDOW)},
              "models": {}}
    for kind in kinds:
        report["models"][kind] = evaluate_model(kind, args)
    report["wall_seconds"] = time.perf_counter() - start
    paths = accelerator_report.write(json_ready(report), args.out_dir)
    print("\n" + paths["md"].read_text())
    print(f"Wrote {', '.join(str(p) for p in paths.values())} in {report['wall_seconds'] / 60:.1f} min")
    return 0


def evaluate_model(kind: str, args) -> dict:
    from morse_engine.block_replace import PatchedDiTBlocks, takes_block_patches

    from .evaluate import Recorder
    from .reference.blocks import ReferenceBlocks
    from .reference.classifier import batched, load_feature_classifier
    from .reference.digits import load_digits_split

    spec = MODELS[kind]
    quick = QUICK if args.quick else None
    samples = quick["samples"] if quick else args.samples
    models = load_models(spec["dash"], spec["dot"], None, args.device)
    cfg = default_cfg(models.dash_meta)
    work = reference_workload(models, samples, samples, cfg, args.seed, args.device)
    blocks = PatchedDiTBlocks(models.unet) if takes_block_patches(models.unet) else ReferenceBlocks(models.unet)
    calibration = {}
    if kind == "dit":
        print(f"[{kind}] calibrating TeaCache's polynomial and MagCache's ratios on the training split", flush=True)
        calibration["teacache"] = calibrate_teacache(work, blocks, **(dict(samples=2, steps=10) if quick else {}))
        tokens = (work.noise.shape[-1] // models.unet.patch_size) * (work.noise.shape[-2] // models.unet.patch_size)
        calibration["magcache"] = calibrate_magcache(work, blocks, tokens)
    morse_fills = {f.name: f.filler for f in collect_fills(models, list(MORSE_FILLS))}
    rows = peer_rows(kind, blocks, calibration) + morse_rows(
        morse_fills, lambda t: AdaptiveDash(threshold=t, **MORSE_WINDOW))
    if quick:
        thinned(rows, quick["settings"], quick["steps"], quick["steps"])
    elif args.grid == "default":
        thinned(rows, **DEFAULT_GRID)

    # N of every fill with a cost, on this workload, before any run (each row's fill, once)
    n_of = {}
    for row in rows:
        if row.level == DENOISER:
            continue
        filler = row.make(row.default if row.default is not None else row.settings[0])[1]
        key = row.fill_name or row.name
        if not filler.free and key not in n_of:
            n_of[key] = measure_fill_n(work, filler, repeats=1 if quick else 3)["N"]
            print(f"[{kind}] {key}: N = {n_of[key]:.2f}", flush=True)

    classifier, _ = load_feature_classifier(device=args.device)
    recorder = Recorder(classifier)
    converged = []
    for offset in CONVERGED_SEED_OFFSETS:
        g = torch.Generator().manual_seed(args.seed + offset)
        noise = torch.randn(work.noise.shape, generator=g).to(work.noise.device)
        x, _ = run_plain("dpmpp_2m", work, quick["converged_steps"] if quick else args.converged_steps, noise=noise)
        converged.append(recorder.record("dpmpp_2m", x, compare=False, fill="converged", steps=0, lsd=0).features)
    train = batched(classifier.features, load_digits_split("train")[0].to(args.device)).cpu()
    test = batched(classifier.features, load_digits_split("test")[0].to(args.device)).cpu()
    replicates = quick["replicates"] if quick else args.replicates
    scorer = Scorer(converged[0].double().numpy(), test.double().numpy(),
                    (torch.arange(samples) % 10).numpy(), replicates, args.seed, 0.9)
    half = min(samples, len(train) // 2)
    bands = scorer.bands(converged[1].double().numpy(), converged[2].double().numpy(),
                         train[:half].double().numpy(), train[half:2 * half].double().numpy())

    out = {"dash": str(spec["dash"] or "reference_dash.safetensors"), "dot": str(spec["dot"]), "cfg": cfg,
           "calibration": calibration, "n": n_of, "bands": {m: bands[m] for m in ("fd_dash", "rmse")},
           "rows": {r.name: {"label": r.label, "family": r.family, "level": r.level, "source": r.source,
                             "default": r.default, "settings": r.settings, "steps": list(r.steps), **r.extra}
                    for r in rows},
           "samplers": {}}
    for sampler in spec["samplers"]:
        ref, _ = run_plain(sampler, work, quick["reference_steps"] if quick else args.reference_steps)
        recorder.references[sampler] = ref
        plain = []
        for steps in (quick["plain"] if quick else PLAIN_STEPS):
            x, info = run_plain(sampler, work, steps)
            plain.append(_scored(scorer, recorder.record(sampler, x, fill="plain", steps=steps, lsd=info["lsd"]),
                                 "plain", None, steps))
        runs = {}
        jobs = [(row, setting, steps) for row in rows for setting in row.settings for steps in row.steps]
        for row, setting, steps in tqdm(jobs, desc=f"{kind} {sampler}", unit="run", file=sys.stdout,
                                        dynamic_ncols=True):
            runs.setdefault(row.name, []).append(_run(row, setting, steps, sampler, work, n_of, recorder, scorer))
        families = {r.name: r.family for r in rows}
        tables = {m: accelerator_table(plain, runs, bands[m]["band"], m) for m in ("rmse", "fd_dash")}
        best_peer = _best_peer(tables["rmse"], families)
        out["samplers"][sampler] = {
            "plain": [_public(p) for p in plain],
            "runs": {name: [_public(r) for r in rs] for name, rs in runs.items()},
            "tables": tables,
            "versus": {m: morse_against_peers(runs, families, bands[m]["band"], m, best_peer=best_peer)
                       for m in ("rmse", "fd_dash")},
        }
    return out


def _run(row, setting, steps, sampler, work, n_of, recorder, scorer) -> dict:
    if row.level == DENOISER:
        x, totals = sample_denoiser_cached(sampler, work, steps, row.make(setting))
        lsd = totals["dash_calls"] / work.n_chunks
        n = None
    else:
        schedule, filler = row.make(setting)
        x, totals = sample_routed(sampler, work, steps, schedule, filler)
        n = None if filler.free else n_of[row.fill_name or row.name]
        lsd = (totals["dash_calls"] + (totals["dot_calls"] / n if n else 0.0)) / work.n_chunks
    rec = recorder.record(sampler, x, fill=row.name, steps=steps, lsd=lsd)
    run = _scored(scorer, rec, row.name, setting, steps)
    run.update(dash_calls=totals["dash_calls"] / work.n_chunks, fill_calls=totals["dot_calls"] / work.n_chunks,
               probe_calls=totals.get("probe_calls", 0) / work.n_chunks, n=n)
    return run


def _scored(scorer, rec, name, setting, steps) -> dict:
    return {"name": name, "setting": setting, "steps": steps, "lsd": rec.lsd, **scorer.score(rec)}


def _public(run: dict) -> dict:
    """A run as the JSON keeps it: its settings, LSD and each metric's value and interval."""
    out = {k: v for k, v in run.items() if not isinstance(v, dict)}
    for metric in ("rmse", "fd_dash", "fd_data", "label"):
        if metric in run:
            out[metric] = {k: run[metric][k] for k in ("value", "lo", "hi")}
    return out


def _best_peer(table: dict, families: dict):
    """The peer with the highest average speedup at equal RMSE (where none is separable: None)."""
    scored = [(v["average"]["speedup"], name) for name, v in table.items()
              if families[name] != MORSE and v["average"] and v["average"]["speedup"] is not None]
    return max(scored)[1] if scored else None


if __name__ == "__main__":
    raise SystemExit(main())
