"""What a DiT block fill costs against a Dash call on a real model's shapes: ``python -m training.bench_dit``.

A whole Flux-dev (12B parameters), SD3.5-large, Qwen-Image or Wan 2.1 14B does not fit this machine, so a call is
composed from its parts, each timed on ComfyUI's own class with the real config and random weights: the model is
built on the meta device from its full config, its block lists cut to the first few blocks, then materialised
and called at the real input sizes; ComfyUI's block-replace patches (the ones the fill itself uses) time every
block inside the call, and the rest of the call (embedders, RoPE, final layer) is the call's time less its
blocks'. Then, with n_j blocks of kind j (Flux-dev: 19 double-stream, then 38 single-stream),

    Dash      = rest + sum_j n_j * t_j
    fill (k)  = rest + k * t_first + k * t_last + (sum_j n_j - 2k) * t_skip
                  (the first k and the last k blocks run; a skipped block returns its input, its time measured)
    N (k)     = Dash / fill (k)

Needs ComfyUI (``--comfyui`` or ``COMFYUI_PATH``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bench_backbones import find_comfyui, randomize

# The real configs as ComfyUI's model detection reads them from the released checkpoints (comfy/model_detection.py)
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
            "txt_ids_dims": []}
SD35_LARGE = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 38, "input_size": None,
              "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "num_patches": 36864, "pos_embed_max_size": 192,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
              "qk_norm": "rms", "x_block_self_attn_layers": []}
QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2, "num_layers": 60,
              "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584}
WAN21_1_3B = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 1536,
              "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 12, "num_layers": 30,
              "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
WAN21_14B = {**WAN21_1_3B, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}


@dataclass(frozen=True)
class Shape:
    config_class: str  # comfy.supported_models.<this>
    config: dict
    block_lists: tuple  # the model's block-list attributes, in the order its blocks run
    text: tuple  # (tokens, width) of the text embedding
    latent: object  # (C, H, W) as a function of the resolution in pixels, or a fixed (C, T, H, W) for video
    extra: dict = field(default_factory=dict)  # keyword inputs: name -> shape after the batch, or a float
    what: str = ""


def _image(channels, frames=None):
    return lambda px: (channels, px // 8, px // 8) if frames is None else (channels, frames, px // 8, px // 8)


SHAPES = {
    "flux-dev": Shape("Flux", FLUX_DEV, ("double_blocks", "single_blocks"), (512, 4096), _image(16),
                      {"y": (768,), "guidance": 3.5}, "Flux.1-dev"),
    "sd35-large": Shape("SD3", SD35_LARGE, ("joint_blocks",), (333, 4096), _image(16), {"y": (2048,)},
                        "SD3.5-large (77 CLIP + 256 T5 tokens)"),
    "qwen-image": Shape("QwenImage", QWEN_IMAGE, ("transformer_blocks",), (256, 3584), _image(16, 1), {},
                        "Qwen-Image (256 text tokens)"),
    "wan21-1.3b": Shape("WAN21_T2V", WAN21_1_3B, ("blocks",), (512, 4096), (16, 9, 60, 104), {},
                        "Wan 2.1 t2v 1.3B, 832x480, 33 frames"),
    "wan21-14b": Shape("WAN21_T2V", WAN21_14B, ("blocks",), (512, 4096), (16, 9, 60, 104), {},
                       "Wan 2.1 t2v 14B, 832x480, 33 frames"),
    # seconds-long smoke run (the tests use it)
    "tiny": Shape("Flux", {**FLUX_DEV, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "num_heads": 2,
                           "axes_dim": [8, 12, 12]}, ("double_blocks", "single_blocks"), (8, 32), _image(16),
                  {"y": (32,), "guidance": 3.5}, "Flux-dev's block counts at width 64"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.bench_dit", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev", help=f"comma-separated, from {', '.join(sorted(SHAPES))} "
                   "(default flux-dev)")
    p.add_argument("--resolution", type=int, default=1024, help="image size in pixels (default 1024; the video "
                   "shapes are fixed at 832x480, 33 frames)")
    p.add_argument("--blocks", type=int, default=1, help="blocks of each kind in the timed model (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls (default 2, after one warm-up call)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


def build_cut(comfy, shape: Shape, blocks: int):
    """ComfyUI's model for ``shape``'s full config, built on the meta device, its block lists cut to their first
    ``blocks`` blocks, then materialised on the CPU with random weights; and the real block count of each list."""
    import comfy.supported_models

    config = getattr(comfy.supported_models, shape.config_class)(dict(shape.config))
    model = config.get_model({}, device=torch.device("meta")).diffusion_model
    counts = {}
    for name in shape.block_lists:
        full = getattr(model, name)
        counts[name] = len(full)
        setattr(model, name, torch.nn.ModuleList(list(full)[:blocks]))
    model = model.to_empty(device="cpu").eval()
    randomize(model)
    return model, counts


def timed_blocks(comfy, shape: Shape, blocks: int, resolution: int, repeats: int) -> dict:
    """Median seconds of a block of each kind, of a skipped block and of the rest of one batch-1 call."""
    model, counts = build_cut(comfy, shape, blocks)
    latent = shape.latent(resolution) if callable(shape.latent) else shape.latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *latent, generator=g)
    context = torch.randn(1, *shape.text, generator=g)
    extra = {k: torch.full((1,), v) if isinstance(v, float) else torch.randn(1, *v, generator=g)
             for k, v in shape.extra.items()}
    t = torch.full((1,), 0.5 if shape.config_class in ("Flux", "QwenImage") else 500.0)
    kinds = ("double_block", "single_block")[:len(shape.block_lists)]
    times = {kind: [] for kind in kinds}
    calls = []

    def timer(kind):
        def block(args, extra_args):
            start = time.perf_counter()
            out = extra_args["original_block"](args)
            times[kind].append(time.perf_counter() - start)
            return out

        return block

    options = {"patches_replace": {"dit": {(kind, i): timer(kind) for kind in kinds for i in range(blocks)}}}
    with torch.no_grad():
        for n in range(repeats + 1):
            if n == 1:  # the first call warms up
                for kind in kinds:
                    times[kind].clear()
            start = time.perf_counter()
            model(x, t, context=context, transformer_options=options, **extra)
            calls.append(time.perf_counter() - start)
        skip_args = {"img": x, "txt": context}
        skip = [_time(lambda: {name: skip_args[name] for name in ("img", "txt")}) for _ in range(100)]
    calls = calls[1:]
    per_call = [c - sum(sum(times[kind][i * blocks:(i + 1) * blocks]) for kind in kinds) for i, c in enumerate(calls)]
    return {"block_s": {kind: statistics.median(times[kind]) for kind in kinds},
            "counts": {kind: counts[name] for kind, name in zip(kinds, shape.block_lists)},
            "rest_s": statistics.median(per_call), "skip_s": statistics.median(skip),
            "tokens": {"image_latent": list(latent), "text": shape.text[0]},
            "samples": {**{kind: len(times[kind]) for kind in kinds}, "calls": repeats}}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def composed(parts: dict) -> dict:
    """Dash's call and each k's fill from the parts, and their ratio N."""
    t, n = parts["block_s"], parts["counts"]
    kinds = list(t)
    dash = parts["rest_s"] + sum(n[kind] * t[kind] for kind in kinds)
    rows = {}
    for k in (1, 2):
        skipped = sum(n.values()) - 2 * k
        fill = parts["rest_s"] + k * (t[kinds[0]] + t[kinds[-1]]) + skipped * parts["skip_s"]
        rows[f"k{k}"] = {"fill_s": fill, "N": dash / fill}
    return {"dash_s": dash, **rows}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    names = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown or not names:
        raise SystemExit(f"error: --model {args.model!r}: pick from {', '.join(sorted(SHAPES))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy_path = find_comfyui(args.comfyui)
    if comfy_path is None:
        raise SystemExit("error: bench_dit times ComfyUI's own DiT classes: pass --comfyui PATH or set COMFYUI_PATH")
    from .host.comfyui import import_comfy

    comfy = import_comfy(Path(comfy_path), "cpu")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32"
    report = {"resolution": args.resolution, "machine": machine, "models": {}}
    for name in names:
        shape = SHAPES[name]
        parts = timed_blocks(comfy, shape, args.blocks, args.resolution, args.repeats)
        result = composed(parts)
        report["models"][name] = {"what": shape.what, "parts": parts, "composed": result}
        where = "" if not callable(shape.latent) else f" at {args.resolution} px"
        print(f"{name} ({shape.what}){where}, batch 1, {machine}; medians of {parts['samples']}")
        print("  " + ", ".join(f"{kind.replace('_', ' ')} {s:.2f} s (x{parts['counts'][kind]})"
                               for kind, s in parts["block_s"].items())
              + f", rest of a call {parts['rest_s']:.2f} s, a skipped block {parts['skip_s'] * 1e6:.1f} us")
        print(f"  Dash {result['dash_s']:.1f} s; "
              + "; ".join(f"k={k[1]} block fill {result[k]['fill_s']:.1f} s, N {result[k]['N']:.1f}" for k in ("k1", "k2")),
              flush=True)
        if args.json:  # written after each model: a long run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
