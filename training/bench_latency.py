"""Dash and Dot latency per CFG step on real architectures, and the N they give.

    python -m training.bench_latency                       # SD1.5 at 512 px, m = 1, 2, 3
    python -m training.bench_latency --arch sd15,sdxl --comfyui /path/to/ComfyUI

Builds the UNet of an architecture with random weights (shapes and cost are what matter),
the default Dot for it with m = 1, 2, 3, and times one CFG step (batch 2: cond + uncond)
of each, interleaved, on the chosen device. Prints the table, the Dot's parameter share,
and for a few Dash/Dot schedules the LSD cost and the speedup they would give if the Dot
steps were as good as Dash steps (an upper bound; `training.evaluate` measures the real one).

With ComfyUI (``--comfyui`` or ``COMFYUI_PATH``) the UNet is ComfyUI's own ``UNetModel``
for SD1.5 / SDXL. Without it, SD1.5 is built from this project's UNet in the same layout
(the same blocks, widths, depths and attention sizes; 40-channel heads everywhere, where
SD1.5 has 8 heads per level); SDXL needs ComfyUI.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from dataclasses import dataclass, replace
from typing import Optional
from pathlib import Path

import torch

from morse_engine import PaperDot, EveryK, Pattern, lsd_cost
from morse_engine.dot_layouts.paper import STEMS

from .evaluation.latency import interleaved_times
from .bench_backbones import ARCHS, build_own, build_with_comfy, find_comfyui, randomize
from .bench_training import bench_training
from .host.unet_blocks import blocks_of

SCHEDULES = (("D.", Pattern("D.")), ("D..", Pattern("D..")), ("D...", Pattern("D...")), ("every 4th", EveryK(4)))
STEPS_FOR_SCHEDULES = 30


@dataclass
class Row:
    arch: str
    resolution: int
    m: int
    widths: tuple
    dash_ms: float
    dot_ms: float
    dot_params: int
    dash_params: int
    stem: str = "pixel_shuffle"

    @property
    def n(self) -> float:
        return self.dash_ms / self.dot_ms

    def to_dict(self) -> dict:
        return {"arch": self.arch, "resolution": self.resolution, "m": self.m, "widths": list(self.widths),
                "dash_ms": self.dash_ms, "dot_ms": self.dot_ms, "N": self.n, "dot_params": self.dot_params,
                "dash_params": self.dash_params, "dot_param_share": self.dot_params / self.dash_params, "stem": self.stem}


def cfg_step_inputs(arch: str, device, dtype, px: int | None = None):
    """One CFG step of ``arch`` (cond + uncond of one image at ``px`` pixels, default the arch's): x, t, the
    anchor's t, context, extra kwargs, sync."""
    spec = ARCHS[arch]
    side = (px or spec["resolution"]) // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    t = torch.full((2,), 500.0, device=device)
    t_s = torch.full((2,), 550.0, device=device)
    context = torch.randn(2, *spec["context"], generator=g).to(device, dtype)
    extra = {"y": torch.randn(2, spec["adm"], generator=g).to(device, dtype)} if spec["adm"] else {}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return x, t, t_s, context, extra, sync


@torch.no_grad()
def bench_arch(arch: str, backbone, ms, device, dtype, repeats: int, warmup: int, progress, stems=None,
               px: int | None = None) -> list[Row]:
    px = px or ARCHS[arch]["resolution"]
    x, t, t_s, context, extra, sync = cfg_step_inputs(arch, device, dtype, px)
    dash_params = sum(p.numel() for p in backbone.parameters())

    dash = lambda: backbone(x, t, context=context, **extra)  # noqa: E731
    z = dash()
    rows = []
    from .trainer.config import RECIPE_DOT

    for m, stem in [(m, stem) for m in ms for stem in (stems or [RECIPE_DOT.stem])]:
        # the Dot train_dot writes by default (its eta scale, step input and stem), unless another stem is asked for
        cfg = replace(RECIPE_DOT, m=m, stem=stem).bound_to(backbone)
        dot = PaperDot.build(backbone, cfg)
        randomize(dot, seed=m)
        dot = dot.to(device, dtype).eval()
        dot_call = lambda: dot(backbone, x, t, x, z, t_s, context=context, sigma=1.0, anchor_sigma=1.1, **extra)  # noqa: E731
        d_t, o_t = interleaved_times(dash, dot_call, repeats, warmup, sync, on_repeat=lambda: progress.update(1))
        rows.append(Row(arch, px, m, cfg.widths, statistics.median(d_t) * 1e3, statistics.median(o_t) * 1e3,
                        sum(p.numel() for p in dot.parameters()), dash_params, stem))
    return rows


FEATURE_DOT = "feature_dot"  # --fills name of the feature Dot (train_dot's default layout), timed beside the free fills


def feature_fill(name: str, backbone, blocks):
    """The fill called ``name``: one of ``FEATURE_FILLS``, or the feature Dot with random weights (its cost does not
    depend on them) bound to ``backbone``."""
    from morse_engine import FeatureDot, FeatureDotConfig, make_fill

    if name != FEATURE_DOT:
        return make_fill(name, blocks=blocks)
    p = next(backbone.parameters())
    dot = FeatureDot.build(backbone, FeatureDotConfig()).to(p.device, p.dtype)
    with torch.no_grad():
        for w in dot.parameters():
            w.normal_(0, 0.02)
    return make_fill("dot", dot=dot.requires_grad_(False), backbone=backbone, blocks=blocks)


@torch.no_grad()
def bench_fills(arch: str, backbone, blocks, names, device, dtype, repeats: int, warmup: int,
                px: int | None = None) -> list[dict]:
    """Dash against each fill that reruns Dash's blocks (``FEATURE_FILLS`` and the feature Dot) with a real anchor:
    the Dash call 50 timesteps earlier, whose block outputs the fill reads (and, for a forecast, two calls before it)."""
    from morse_engine.feature_fills import captured
    from morse_engine.fillers import Anchor, DashCall

    x, t, t_s, context, extra, sync = cfg_step_inputs(arch, device, dtype, px)
    kwargs = {"transformer_options": {}, **extra}
    dash_params = sum(q.numel() for q in backbone.parameters())
    rows = []
    for name in names:
        fill = feature_fill(name, backbone, blocks)
        with captured(fill.capture_modules()) as feats:
            z = backbone(x, t_s, context=context, **extra)
        # the earlier calls a forecast reads (their values do not change its cost: the same features, later times);
        # sigmas feed the feature Dot's gate only
        anchor = Anchor(x=x, z=z, t=t_s, step=2, features=dict(feats), sigma=torch.full((x.shape[0],), 1.2, device=device),
                        earlier=(DashCall(z, t_s + 50, dict(feats)), DashCall(z, t_s + 100, dict(feats))))
        d_t, f_t = interleaved_times(lambda: backbone(x, t, context=context, **extra),  # noqa: B023
                                     lambda: fill(backbone, x, t, anchor, context, kwargs, sigma=1.0),  # noqa: B023
                                     repeats, warmup, sync)
        dash_ms, fill_ms = statistics.median(d_t) * 1e3, statistics.median(f_t) * 1e3
        own = sum(q.numel() for q in fill.dot.parameters()) if name == FEATURE_DOT else 0
        rows.append({"arch": arch, "resolution": x.shape[-1] * 8, "fill": name, "dash_ms": dash_ms, "fill_ms": fill_ms,
                     "N": dash_ms / fill_ms, "params": own, "param_share": own / dash_params})
    return rows


def bench_faster_diffusion(arch, backbone, blocks, device, dtype, args) -> dict:
    from tqdm.auto import tqdm

    from .evaluation.latency import sampling_wall_clock

    x, _, _, context, _, sync = cfg_step_inputs(arch, device, dtype, args.resolution)
    noise = torch.randn(x[:1].shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    runs = 3 if args.fd_sequential else 2
    with tqdm(total=runs * args.fd_steps, desc="whole runs (model calls)", dynamic_ncols=True) as bar:
        return sampling_wall_clock(backbone, blocks, context[:1], context[1:], noise, steps=args.fd_steps, sync=sync,
                                   sequential=args.fd_sequential, progress=bar)


def schedule_table(n: float) -> list[dict]:
    out = []
    for name, spec in SCHEDULES:
        sched = spec.resolve(STEPS_FOR_SCHEDULES)
        lsd = lsd_cost(sched.dash_steps, sched.dot_steps, n)
        out.append({"schedule": name, "steps": STEPS_FOR_SCHEDULES, "dash": sched.dash_steps, "dot": sched.dot_steps,
                    "lsd": lsd, "speedup_bound": STEPS_FOR_SCHEDULES / lsd})
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.bench_latency", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15",
                   help="comma-separated: sd15 (512 px), sdxl (1024 px; needs ComfyUI), tiny (a smoke run)")
    p.add_argument("--m", default="1,2,3", help="Dot down-sampling depths to time, comma-separated")
    p.add_argument("--stem", default=None,
                   help="Dot first level(s) to time, comma-separated: pixel_shuffle, full_res (default: train_dot's)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels for every architecture (default: sd15 512, sdxl 1024); N depends on it")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: COMFYUI_PATH); builds ComfyUI's own UNet")
    p.add_argument("--train-steps", type=int, default=0,
                   help="also time this many Dot training steps on the first architecture (throughput, peak memory)")
    p.add_argument("--train-batch", type=int, default=1, help="images per training step (each is a CFG pair)")
    p.add_argument("--train-m", type=int, default=2)
    p.add_argument("--train-layout", default="paper", choices=("paper", "feature"),
                   help="which Dot --train-steps trains: paper (Algorithm 1's tuples) or feature (whole runs)")
    p.add_argument("--train-run-steps", type=int, default=4, help="with --train-layout feature: steps of each run")
    p.add_argument("--fills", default=None,
                   help="also time fills that rerun Dash's blocks, comma-separated (inherit_k1, inherit_k2, forecast_k1, "
                        "forecast_k2, forecast2_k2, propagate) and feature_dot (the feature Dot, random weights: N and "
                        "its parameter share); "
                        "on ComfyUI's UNet where one is given, else on the project's")
    p.add_argument("--faster-diffusion", action="store_true",
                   help="also time whole 50-step Euler runs with CFG on the first architecture (sd15 or tiny): plain, "
                        "and with Faster Diffusion's key steps, encoder propagation and parallel decoding")
    p.add_argument("--fd-steps", type=int, default=50, help="steps of the --faster-diffusion runs")
    p.add_argument("--fd-sequential", action="store_true",
                   help="with --faster-diffusion: also the run that decodes each step on its own")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


@dataclass
class Plan:
    """What the flags ask to time, checked."""

    archs: list
    ms: list
    stems: Optional[list]
    fill_names: list
    device: torch.device
    dtype: torch.dtype
    comfy_path: Optional[Path]


def plan_of(args) -> Plan:
    """The checked plan of ``args``; SystemExit naming the flag where one is wrong."""
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHS:
            raise SystemExit(f"error: --arch {a!r} is not one of {sorted(ARCHS)}")
    try:
        ms = [int(v) for v in args.m.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --m must be whole numbers separated by commas (got {args.m!r})") from None
    if not ms or min(ms) < 1:
        raise SystemExit("error: --m values must be >= 1")
    stems = [v.strip() for v in (args.stem or "").split(",") if v.strip()] or None
    for stem in stems or []:
        if stem not in STEMS:
            raise SystemExit(f"error: --stem {stem!r} is not one of {STEMS}")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    fill_names = [v.strip() for v in (args.fills or "").split(",") if v.strip()]
    from morse_engine.feature_fills import FEATURE_FILLS

    for name in fill_names:
        if name not in FEATURE_FILLS and name != FEATURE_DOT:
            raise SystemExit(f"error: --fills {name!r} is not one of {sorted(FEATURE_FILLS) + [FEATURE_DOT]}")
    if args.faster_diffusion and archs[0] not in ("sd15", "tiny"):
        raise SystemExit("error: --faster-diffusion times SD1.5-family runs (no y vector); put sd15 first in --arch")
    return Plan(archs, ms, stems, fill_names, device, dtype, find_comfyui(args.comfyui))


def measure(plan: Plan, args) -> dict:
    """Every figure the plan asks for: rows (Dash and the paper's Dot per m and stem), fills, Faster Diffusion's
    wall clock and the training throughput (on the first arch), and where each backbone came from."""
    from tqdm.auto import tqdm

    device, dtype, comfy_path = plan.device, plan.dtype, plan.comfy_path
    out = {"rows": [], "sources": {}, "training": None, "fills": [], "faster_diffusion_wall_clock": None}
    with tqdm(total=len(plan.archs) * len(plan.ms) * len(plan.stems or [0]) * args.repeats, desc="timing",
              dynamic_ncols=True) as bar:
        for arch in plan.archs:
            if comfy_path and arch != "tiny":
                backbone, out["sources"][arch] = build_with_comfy(arch, comfy_path, device), "ComfyUI UNetModel"
            else:
                backbone = build_own(arch)
                out["sources"][arch] = "project UNet" + (" in SD1.5 layout (no ComfyUI given)" if arch == "sd15" else "")
            randomize(backbone)
            backbone = backbone.to(device, dtype).eval()
            out["rows"] += bench_arch(arch, backbone, plan.ms, device, dtype, args.repeats, args.warmup, bar, plan.stems,
                                      args.resolution)
            blocks = blocks_of(backbone, comfy_path is not None and arch != "tiny")
            if plan.fill_names:
                out["fills"] += bench_fills(arch, backbone, blocks, plan.fill_names, device, dtype, args.repeats,
                                            args.warmup, args.resolution)
            if args.faster_diffusion and arch == plan.archs[0]:
                out["faster_diffusion_wall_clock"] = bench_faster_diffusion(arch, backbone, blocks, device, dtype, args)
            if args.train_steps and arch == plan.archs[0]:
                if dtype != torch.float32:
                    backbone = backbone.float()  # the trainer keeps fp32 master weights
                out["training"] = bench_training(arch, ARCHS[arch], backbone, args.train_m, args.train_steps,
                                                 args.train_batch, device, args.train_layout, blocks, args.train_run_steps)
            del backbone
    return out


def print_report(figures: dict, machine: str, dtype: torch.dtype, repeats: int) -> None:
    print(f"\n{machine}, torch {torch.__version__}, {str(dtype).replace('torch.', '')}, "
          f"{datetime.date.today().isoformat()}; one CFG step = batch 2; median of {repeats}")
    print(f"{'arch':6} {'px':>5} {'m':>2} {'stem':>13} {'widths':>10} {'Dash ms':>9} {'Dot ms':>8} {'N':>6} {'Dot params':>11}")
    for r in figures["rows"]:
        print(f"{r.arch:6} {r.resolution:5d} {r.m:2d} {r.stem:>13} {str(list(r.widths)):>10} {r.dash_ms:9.1f} {r.dot_ms:8.1f} "
              f"{r.n:6.2f} {r.dot_params / 1e6:7.2f}M ({r.dot_params / r.dash_params:.1%})")
    print(f"\nLSD cost of {STEPS_FOR_SCHEDULES} steps and the speedup bound (Dot steps as good as Dash steps):")
    for r in figures["rows"]:
        cells = ", ".join(f"{s['schedule']} {s['lsd']:.1f} LSD -> <= {s['speedup_bound']:.2f}x" for s in schedule_table(r.n))
        print(f"  {r.arch} m={r.m} {r.stem} (N {r.n:.2f}): {cells}")
    for f in figures["fills"]:
        share = f" (+{f['params'] / 1e6:.3f}M params, {f['param_share']:.2%} of Dash)" if f["params"] else ""
        print(f"fill {f['fill']:>12} on {f['arch']} at {f['resolution']} px: Dash {f['dash_ms']:.1f} ms, fill "
              f"{f['fill_ms']:.1f} ms, N {f['N']:.2f}{share}")
    w = figures["faster_diffusion_wall_clock"]
    if w:
        print(f"\n{w['steps']} Euler steps with CFG 7.5, one image, wall clock in one run: plain {w['plain_s']:.1f} s; "
              f"Faster Diffusion ({w['schedule'].count('D')} key steps, parallel decoding) {w['faster_diffusion_s']:.1f} s "
              f"= {w['faster_diffusion_speedup']:.2f}x")
        if "faster_diffusion_sequential_s" in w:
            print(f"  decoding each step on its own: {w['faster_diffusion_sequential_s']:.1f} s "
                  f"= {w['faster_diffusion_sequential_speedup']:.2f}x")
    training = figures["training"]
    if training:
        what = (f"m={training['m']}" if training["layout"] == "paper"
                else f"feature Dot, runs of {training['run_steps']} steps")
        print(f"\nDot training on {training['arch']} ({what}, batch {training['batch']}, {training['steps']} steps): "
              f"{training['samples_per_s']:.3f} samples/s, peak memory {training['peak_mb']:.0f} MiB "
              f"({training['peak_mb_before_training']:.0f} MiB before training)")
    for arch, src in figures["sources"].items():
        print(f"note: {arch} built as {src}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = plan_of(args)
    figures = measure(plan, args)
    device, dtype = plan.device, plan.dtype
    machine = (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads"
               if device.type == "cpu" else torch.cuda.get_device_name(device))
    print_report(figures, machine, dtype, args.repeats)
    if args.json:
        report = {"machine": machine, "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                  "date": datetime.date.today().isoformat(), "repeats": args.repeats, "sources": figures["sources"],
                  "rows": [dict(r.to_dict(), schedules=schedule_table(r.n)) for r in figures["rows"]],
                  "training": figures["training"], "fills": figures["fills"],
                  "faster_diffusion_wall_clock": figures["faster_diffusion_wall_clock"]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
