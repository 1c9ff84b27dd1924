"""What a DiT block fill costs against a Dash call on a real model's shapes: ``python -m training.bench_dit``.

A whole Flux-dev (12B parameters) does not fit this machine, so the call is composed from its parts, each timed
on ComfyUI's own class with the real widths and random weights: a model with a few blocks of each kind is called
with the real input sizes, and ComfyUI's block-replace patches (the ones the fill itself uses) time every block
inside the call; the rest of the call (embedders, RoPE, final layer) is the call's time less its blocks'. Then

    Dash      = rest + D * t_double + S * t_single      (Flux-dev: D = 19, S = 38)
    fill (k)  = rest + k * t_double + k * t_single      (the first k and last k blocks; a skipped block returns
                                                          its input: its time is measured too)
    N (k)     = Dash / fill (k)

Needs ComfyUI (``--comfyui`` or ``COMFYUI_PATH``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .bench_backbones import find_comfyui, randomize

# Flux.1-dev as ComfyUI's model detection reads it from the checkpoint (comfy/model_detection.py)
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "axes_dim": [16, 56, 56], "theta": 10000,
            "patch_size": 2, "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": []}
SHAPES = {
    "flux-dev": dict(config=FLUX_DEV, double=19, single=38, text_tokens=512),
    # seconds-long smoke run (the tests use it)
    "tiny": dict(config={**FLUX_DEV, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "num_heads": 2,
                         "axes_dim": [8, 12, 12]}, double=19, single=38, text_tokens=8),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.bench_dit", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev", choices=sorted(SHAPES))
    p.add_argument("--resolution", type=int, default=1024, help="image size in pixels (default 1024)")
    p.add_argument("--blocks", type=int, default=2, help="blocks of each kind in the timed model (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls (default 2, after one warm-up call)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


def timed_blocks(comfy, shape: dict, blocks: int, resolution: int, repeats: int) -> dict:
    """Median seconds of a double block, a single block, a skipped block and the rest of one batch-1 call."""
    import comfy.supported_models

    config = dict(shape["config"], depth=blocks, depth_single_blocks=blocks)
    model = comfy.supported_models.Flux(config).get_model({}, device=torch.device("cpu")).diffusion_model.eval()
    randomize(model)
    side = resolution // 8
    x = torch.randn(1, config["in_channels"], side, side)
    context = torch.randn(1, shape["text_tokens"], config["context_in_dim"])
    y, guidance, t = torch.randn(1, config["vec_in_dim"]), torch.full((1,), 3.5), torch.full((1,), 0.5)
    times = {"double_block": [], "single_block": [], "call": []}

    def timer(kind):
        def block(args, extra):
            start = time.perf_counter()
            out = extra["original_block"](args)
            times[kind].append(time.perf_counter() - start)
            return out

        return block

    patches = {(kind, i): timer(kind) for kind in ("double_block", "single_block") for i in range(blocks)}
    options = {"patches_replace": {"dit": patches}}
    with torch.no_grad():
        for n in range(repeats + 1):
            if n == 1:  # the first call warms up
                times = {k: [] for k in times}
            start = time.perf_counter()
            model(x, t, context, y, guidance, transformer_options=options)
            times["call"].append(time.perf_counter() - start)
        skip_args = {"img": x, "txt": context}
        skip = [_time(lambda: {name: skip_args[name] for name in ("img", "txt")}) for _ in range(100)]
    per_call = [c - sum(times["double_block"][i * blocks:(i + 1) * blocks]) - sum(times["single_block"][i * blocks:(i + 1) * blocks])
                for i, c in enumerate(times["call"])]
    return {"double_s": statistics.median(times["double_block"]), "single_s": statistics.median(times["single_block"]),
            "rest_s": statistics.median(per_call), "skip_s": statistics.median(skip),
            "samples": {"double": len(times["double_block"]), "single": len(times["single_block"]), "calls": repeats}}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def composed(parts: dict, double: int, single: int) -> dict:
    """Dash's call and each k's fill from the parts, and their ratio N."""
    dash = parts["rest_s"] + double * parts["double_s"] + single * parts["single_s"]
    rows = {}
    for k in (1, 2):
        skipped = double + single - 2 * k
        fill = parts["rest_s"] + k * (parts["double_s"] + parts["single_s"]) + skipped * parts["skip_s"]
        rows[f"k{k}"] = {"fill_s": fill, "N": dash / fill}
    return {"dash_s": dash, **rows}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy_path = find_comfyui(args.comfyui)
    if comfy_path is None:
        raise SystemExit("error: bench_dit times ComfyUI's own DiT classes: pass --comfyui PATH or set COMFYUI_PATH")
    from .host.comfyui import import_comfy

    comfy = import_comfy(Path(comfy_path), "cpu")
    shape = SHAPES[args.model]
    parts = timed_blocks(comfy, shape, args.blocks, args.resolution, args.repeats)
    result = composed(parts, shape["double"], shape["single"])
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32"
    print(f"{args.model} at {args.resolution} px, batch 1, {machine}; medians of {parts['samples']}")
    print(f"  double block {parts['double_s']:.2f} s, single block {parts['single_s']:.2f} s, rest of a call "
          f"{parts['rest_s']:.2f} s, a skipped block {parts['skip_s'] * 1e6:.1f} us")
    print(f"  Dash ({shape['double']} double + {shape['single']} single) {result['dash_s']:.1f} s; "
          + "; ".join(f"k={k[1]} block fill {result[k]['fill_s']:.1f} s, N {result[k]['N']:.1f}" for k in ("k1", "k2")))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "resolution": args.resolution, "machine": machine,
                                         "parts": parts, "composed": result}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
