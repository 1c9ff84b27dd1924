"""Evaluate every fill against the plain sampler, as the paper measures: ``python -m training.evaluate``.

The protocol (docs/method.md, "Evaluation"; paper section 3.1):

1. **One workload**: n samples from seeded noise, labels cycling 0..9, CFG; every run shares them.
2. **References**: the Dash's converged distribution (three disjoint sets from independent noise, a
   many-step DPM-Solver++(2M) run each: one is the reference, two measure the metric's noise at n),
   the held-out digits, and per deterministic sampler a many-step run from the runs' own noise.
3. **Runs**: the plain sampler at several step counts; every fill (the Dot, the ablation Dot, each
   training-free fill) at each LSD budget with each Dash/fill pattern, planned with its N (measured
   in this run for a fill that calls a network; a free fill costs nothing). Latency in LSD is
   counted from the calls each run made.
4. **Quality** per run with a paired-bootstrap interval: FD to the Dash's distribution and to the
   data, trajectory RMSE, the share labelled as the requested digit.
5. **Speedup** at equal quality per fill and budget (best pattern), only where the metric separates
   the runs from the converged distribution; averaged with an interval.

Modes: the default run (< 20 min on 2 CPU cores; few samples, it prints its own noise floor),
``--full`` (the published run: >= 1000 samples per point, every pattern; resumable: each run's
record is kept under ``runs/evaluate/`` and a rerun with the same settings skips what is done),
``--quick`` (the test-sized run). Writes ``<out-dir>/evaluation.{json,md,png}``.
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
from tqdm import tqdm

from morse_engine import MorseError, Pattern

from .evaluation import report as report_mod
from .evaluation.analysis import Scorer, json_ready, sampler_analysis
from .evaluation.fills import collect_fills, measure_fill_n
from .evaluation.records import RecordStore, RunRecord, export_records, import_records, run_key
from .evaluation.samplers import DETERMINISTIC, SAMPLERS
from .evaluation.workload import (AUTO, CALLS_PER_STEP, DEFAULT_ABLATION_DOT, default_cfg, load_models,
                                  reference_workload, run_morse, run_plain)
from .paths import REPORTS_DIR, RUNS_DIR

CONVERGED_SEED_OFFSETS = (1000, 2000, 3000)  # the converged sets' noise: disjoint from the runs' and each other's

MODES = {
    # sized for < 20 min on 2 CPU cores at 1 thread with room to spare (96 samples took 17-19 min there)
    "default": dict(samplers=("euler", "dpmpp_2m", "euler_ancestral"), budgets=(4, 8, 16), patterns=("D.", "D.."),
                    plain_steps=(4, 6, 8, 12, 16, 24), samples=64, chunk=64, reference_steps=60,
                    converged_steps=30, replicates=200, fills=None, n_repeats=3, ablation_samplers=("euler",)),
    "full": dict(samplers=("euler", "dpmpp_2m", "euler_ancestral"), budgets=(4, 6, 8, 12, 20, 30, 50),
                 patterns=("D.", "D..", "D..."), plain_steps=(3, 4, 6, 8, 12, 16, 24, 32, 48, 64), samples=1000,
                 chunk=1000, reference_steps=200, converged_steps=100, replicates=300, fills=None, n_repeats=5,
                 ablation_samplers=("euler", "dpmpp_2m", "euler_ancestral")),
    "quick": dict(samplers=("euler",), budgets=(4, 8), patterns=("D.",), plain_steps=(4, 8, 12), samples=32, chunk=32,
                  reference_steps=30, converged_steps=20, replicates=40, fills=None, n_repeats=1, ablation_samplers=("euler",)),
}


def _csv(kind):
    def parse(text):
        values = tuple(kind(v) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError("give at least one value, comma-separated")
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the published run: 1000 samples per point, every pattern")
    mode.add_argument("--quick", action="store_true", help="a test-sized run (about a minute on 2 CPU cores)")
    p.add_argument("--dash", type=Path, default=None, help="reference-format Dash weights (default: the embedded reference model)")
    p.add_argument("--dot", type=Path, default=None, help="Dot adapter (default: models/dot_models/reference_digits.safetensors)")
    p.add_argument("--ablation-dot", type=Path, default=None, help="Dot without trajectory inputs (default: the committed one)")
    p.add_argument("--no-ablation", action="store_true", help="leave the ablation Dot out")
    p.add_argument("--fills", type=_csv(str), default=None,
                   help="the fills to compare (default: dot, ablation, reuse, extrapolate; the feature fills "
                        "inherit_k1, inherit_k2, forecast_k1, forecast_k2, forecast2_k2 and propagate on request)")
    p.add_argument("--samplers", type=_csv(str), default=None)
    p.add_argument("--budgets", type=_csv(float), default=None, help="LSD budgets of the fills")
    p.add_argument("--patterns", type=_csv(str), default=None,
                   help="Dash/fill patterns ('D' Dash, '.' a fill); 'auto' is the budget planner's own choice per "
                        "budget (the Dot file's measured table, else the rule), measured next to the fixed ones")
    p.add_argument("--final-dash", type=int, default=0,
                   help="every fill's schedule runs its last n steps on Dash (the schedule node's final_dash; default 0). "
                        "The last step's estimate is the sample, so whether a run ends on a fill or on Dash moves its "
                        "error more than most fills differ")
    p.add_argument("--plain-steps", type=_csv(int), default=None, help="step counts of the plain sampler")
    p.add_argument("--samples", type=int, default=None, help="samples per run (labels cycle 0..9)")
    p.add_argument("--chunk", type=int, default=None, help="samples per sampling call (batch = 2 x chunk with CFG)")
    p.add_argument("--reference-steps", type=int, default=None, help="steps of the trajectory reference run")
    p.add_argument("--converged-steps", type=int, default=None, help="DPM-Solver++(2M) steps of the converged sets")
    p.add_argument("--replicates", type=int, default=None, help="bootstrap replicates of each interval")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the Dash file's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPORTS_DIR)
    p.add_argument("--runs", type=Path, default=RUNS_DIR / "evaluate", help="where run records are kept (resume)")
    p.add_argument("--fresh", action="store_true", help="ignore records of an earlier run with the same settings")
    p.add_argument("--export", type=Path, default=None,
                   help="also pack the run records into this folder (one file per sampler, features in float16), to "
                        "analyse them on another machine with --import-records")
    p.add_argument("--import-records", type=Path, nargs="+", default=None,
                   help="packs written by --export with the same settings: their runs are not sampled again")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a small shared CPU machine any other busy process slows a "
                        "2-thread torch job down many times over; 0 = torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device of the runs: cpu, cuda, ...")
    p.add_argument("--n-device", default=None,
                   help="where each network fill's N is measured, in this run (default: --device). The reference model "
                        "is tiny: on a GPU its calls are bound by kernel launches, not by arithmetic, so its GPU N says "
                        "little about an SD-sized Dash; --n-device cpu prices fills by their CPU cost (on the runs' batch "
                        "up to 96 samples)")
    return p


def settings_from(args) -> dict:
    mode = "full" if args.full else "quick" if args.quick else "default"
    st = dict(MODES[mode], mode=mode, level=0.9)
    for key in ("samplers", "budgets", "patterns", "plain_steps", "samples", "chunk", "reference_steps", "converged_steps",
                "replicates", "fills"):
        if getattr(args, key) is not None:
            st[key] = getattr(args, key)
    st["chunk"] = min(st["chunk"], st["samples"])
    if args.final_dash < 0:
        raise SystemExit("error: --final-dash must be >= 0 (the last n steps of every fill's schedule on Dash)")
    if args.final_dash:  # only then: records of runs without it keep their settings' key
        st["final_dash"] = args.final_dash
    for name in st["samplers"]:
        if name not in SAMPLERS:
            raise SystemExit(f"error: --samplers: {name!r} is not one of {sorted(SAMPLERS)}")
    if min(st["budgets"]) < 1:
        raise SystemExit("error: --budgets must all be >= 1 LSD (one Dash step)")
    if min(st["plain_steps"]) < 1 or st["samples"] < 8:
        raise SystemExit("error: --plain-steps must be >= 1 and --samples >= 8")
    for pattern in st["patterns"]:
        if pattern == AUTO:
            continue
        try:
            Pattern(pattern)
        except MorseError as exc:
            raise SystemExit(f"error: --patterns: {exc}") from None
    return st


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


class Recorder:
    """Turns a run's samples into its record: classifier features and labels, error to the reference."""

    def __init__(self, classifier):
        self.classifier = classifier
        self.references = {}

    @torch.no_grad()
    def record(self, sampler, x, compare: bool = True, keep_images: bool = False, **meta) -> RunRecord:
        """``compare``: also the per-sample error to the sampler's trajectory reference (runs from the same noise)."""
        from .reference.classifier import batched

        x = x.clamp(-1, 1).float()
        feats = batched(self.classifier.features, x)
        predicted = batched(self.classifier.logits, x).argmax(1)
        ref = self.references.get(sampler) if compare else None
        sq = None if ref is None else (x[: ref.shape[0]] - ref).pow(2).flatten(1).mean(1)
        return RunRecord(sampler=sampler, features=feats.cpu(), predicted=predicted.cpu(),
                         sq_error=None if sq is None else sq.cpu(), images=x.cpu() if keep_images else None, **meta)


def file_digest(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else "-"


def plan_jobs(st: dict, fills) -> list[tuple]:
    jobs = [("converged", "dpmpp_2m", None, i) for i in range(len(CONVERGED_SEED_OFFSETS))]
    for sampler in st["samplers"]:
        if sampler in DETERMINISTIC:
            jobs.append(("reference", sampler, None, st["reference_steps"]))
        jobs += [("plain", sampler, None, s) for s in st["plain_steps"]]
        jobs += [(f.name, sampler, p, b) for f in fills for p in st["patterns"] for b in st["budgets"]
                 if f.name != "ablation" or sampler in st["ablation_samplers"]]
    return jobs


def job_key(job) -> str:
    kind, sampler, pattern, value = job
    return run_key(sampler, f"converged{value}", None, 0) if kind == "converged" else run_key(sampler, kind, pattern, value)


def run_job(job, work, st, fills_by_name, recorder: Recorder) -> RunRecord:
    kind, sampler, pattern, value = job
    if kind == "converged":  # independent noise: no trajectory error, no labels (the labels still cycle 0..9)
        g = torch.Generator().manual_seed(work.seed + CONVERGED_SEED_OFFSETS[value])
        noise = torch.randn(work.noise.shape, generator=g).to(work.noise.device)
        x, info = run_plain(sampler, work, st["converged_steps"], noise=noise)
        return recorder.record(sampler, x, compare=False, fill=kind, steps=info["steps"], lsd=info["lsd"],
                               seconds=info["seconds"])
    if kind in ("reference", "plain"):
        x, info = run_plain(sampler, work, int(value))
        return recorder.record(sampler, x, compare=kind == "plain", keep_images=kind == "reference", fill=kind,
                               steps=info["steps"], lsd=info["lsd"], seconds=info["seconds"])
    fill = fills_by_name[kind]
    x, point = run_morse(sampler, work, value, pattern, fill.filler, fill.n, fill.pattern_table, st.get("final_dash", 0))
    return recorder.record(sampler, x, fill=kind, steps=point["steps"], lsd=point["lsd"], pattern=pattern, budget=value,
                           dash_steps=point["dash_steps"], fill_steps=point["dot_steps"],
                           fallback_calls=point["fallback_calls"], seconds=point["seconds"],
                           extra={"chosen": point["chosen"]} if point["chosen"] else {})


def measure_n(args, st, fills, work, ablation, cfg) -> dict:
    """N of every fill that calls a network, on --n-device (the runs' own models and workload where that is
    --device; CPU copies on at most 96 samples of the same noise otherwise)."""
    if (args.n_device or args.device) != args.device:
        n_device = torch.device(args.n_device)
        models = load_models(args.dash, args.dot, ablation, n_device)
        fills = collect_fills(models, [f.name for f in fills])
        work = reference_workload(models, min(st["samples"], 96), 96, cfg, args.seed, n_device)
    out = {}
    for fill in fills:
        if not fill.free:
            out[fill.name] = {**measure_fill_n(work, fill.filler, repeats=st["n_repeats"]), "device": str(work.noise.device)}
    return out


def main(argv=None) -> int:
    wall_start = time.perf_counter()
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    st = settings_from(args)
    from .reference.classifier import batched, load_feature_classifier
    from .reference.digits import load_digits_split

    device = torch.device(args.device)
    ablation = None if args.no_ablation else (args.ablation_dot or DEFAULT_ABLATION_DOT)
    try:
        models = load_models(args.dash, args.dot, ablation, device)
        fills = collect_fills(models, st["fills"])
    except (MorseError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = args.cfg if args.cfg is not None else default_cfg(models.dash_meta)
    work = reference_workload(models, st["samples"], st["chunk"], cfg, args.seed, device)
    classifier, _ = load_feature_classifier(device=device)
    # records belong to these exact files: another Dot (or Dash) starts a new store
    identity = {"n_device": args.n_device or args.device, "fills": [f.name for f in fills], "device": args.device,
                "files": [file_digest(p) for p in (models.dash_path, models.dot_info.path if models.dot_info else None,
                                                   models.ablation[1].path if models.ablation else None)]}
    store = RecordStore(args.runs, {**st, "cfg": cfg, "seed": args.seed, **identity})
    print(f"Evaluation ({st['mode']}): {st['samples']} samples per run, CFG {cfg:g}, on {args.device} "
          f"({torch.get_num_threads()} threads); records in {store.dir}", flush=True)

    latency = fill_latency(args, st, fills, work, ablation, cfg, store)
    records = run_jobs(plan_jobs(st, fills), work, st, fills, Recorder(classifier), store, args.fresh, device)
    if args.export:
        for sampler in sorted({job[1] for job, _ in records.values()}):
            keys = [key for key, (job, _) in records.items() if job[1] == sampler]
            print(f"packed {export_records(store, keys, args.export / f'records-{sampler}.safetensors', {'latency': latency})}")

    report = build_report(records, st, work, fills, classifier, load_digits_split, batched, args, cfg)
    report["machine"] = machine_info(args.device)
    report["wall_seconds"] = time.perf_counter() - wall_start
    write_report(report, Path(args.out_dir))
    return 0


def fill_latency(args, st, fills, work, ablation, cfg, store: RecordStore) -> dict:
    """Each fill's N (imported, stored, or measured now and stored), set on the fills and printed."""
    for pack in args.import_records or []:
        store.put_value("latency", import_records(store, pack)["latency"])
    latency = None if args.fresh else store.get_value("latency")
    if latency is None:
        latency = measure_n(args, st, fills, work, ablation, cfg)
        store.put_value("latency", latency)
    for fill in fills:
        if fill.name in latency:
            fill.n, fill.latency = latency[fill.name]["N"], latency[fill.name]
            print(f"  {fill.name}: N = {fill.n:.2f} (Dash {fill.latency['dash_ms']:.1f} ms, fill {fill.latency['fill_ms']:.1f} ms "
                  f"per call, batch {fill.latency['batch']})", flush=True)
    return latency


def run_jobs(jobs, work, st, fills, recorder: Recorder, store: RecordStore, fresh: bool, device) -> dict:
    """{key: (job, record)} of every job, from the store where it holds one (unless ``fresh``), else run now."""
    by_name = {f.name: f for f in fills}
    records = {}
    bar = tqdm(jobs, desc="evaluate", unit="run", file=sys.stdout, dynamic_ncols=True)
    for job in bar:
        key = job_key(job)
        bar.set_postfix_str(key)
        rec = None if fresh else store.get(key)
        if rec is None:
            rec = run_job(job, work, st, by_name, recorder)
            store.put(key, rec)
        if job[0] == "reference":
            recorder.references[job[1]] = rec.images.to(device)
        records[key] = (job, rec)
    bar.close()
    return records


def write_report(report: dict, out_dir: Path) -> None:
    text = report_mod.format_report(report)
    print("\n" + text)
    js = report_mod.write_json(report, out_dir / "evaluation.json")
    (out_dir / "evaluation.md").write_text(text + "\n")
    png = report_mod.plot_report(report, out_dir / "evaluation.png")
    print(f"\nWrote {js}, {out_dir / 'evaluation.md'} and {png}")
    print(f"Wall time: {report['wall_seconds']:.1f} s ({report['wall_seconds'] / 60:.1f} min)")


def build_report(records, st, work, fills, classifier, load_digits_split, batched, args, cfg) -> dict:
    converged = [rec.features for (job, rec) in records.values() if job[0] == "converged"]
    train = batched(classifier.features, load_digits_split("train")[0].to(work.noise.device)).cpu()
    test = batched(classifier.features, load_digits_split("test")[0].to(work.noise.device)).cpu()
    half = min(st["samples"], len(train) // 2)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    labels = (torch.arange(st["samples"]) % 10).numpy()
    scorer = Scorer(converged[0].double().numpy(), test.double().numpy(), labels, st["replicates"], args.seed, st["level"])
    bands = scorer.bands(converged[1].double().numpy(), converged[2].double().numpy(),
                         train[perm[:half]].double().numpy(), train[perm[half:2 * half]].double().numpy())
    bands["fd_data"]["n"] = half
    samplers = {}
    for sampler in st["samplers"]:
        plain = [(rec, scorer.score(rec)) for (job, rec) in records.values() if job[1] == sampler and job[0] == "plain"]
        per_fill = {f.name: [(rec, scorer.score(rec)) for (job, rec) in records.values()
                             if job[1] == sampler and job[0] == f.name] for f in fills}
        per_fill = {name: runs for name, runs in per_fill.items() if runs}
        samplers[sampler] = sampler_analysis(plain, per_fill, bands, sampler in DETERMINISTIC, st["level"])
    return json_ready({
        "title": f"Every fill against the plain sampler on {'the reference Dash' if args.dash is None else Path(args.dash).name}",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in st.items()}, "cfg": cfg, "seed": args.seed,
                     "scheduler": "normal", "converged_sampler": "dpmpp_2m", "calls_per_step": CALLS_PER_STEP},
        "fills": {f.name: {"label": f.label, "free": f.free, "n": f.n, "latency": f.latency} for f in fills},
        "bands": bands,
        "samplers": samplers,
    })


if __name__ == "__main__":
    raise SystemExit(main())
