"""Dash-step overhead of Morse KSampler against KSampler, in a real ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python -m training.bench_comfy_overhead

Builds an SD1.x-family UNet from ComfyUI's own classes (random weights; the cost is what
matters), then times KSampler and Morse KSampler with every step on Dash, interleaved,
and prints the median time per run and the difference. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_comfy(path: str):
    sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import nodes

    asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
    return comfy, mm, nodes


def build_model(comfy, mm, channels: int, context_dim: int):
    unet_config = {
        "context_dim": context_dim, "model_channels": channels, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_checkpoint": False, "image_size": 32,
        "use_spatial_transformer": True, "legacy": False, "in_channels": 4, "out_channels": 4,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [1, 1, 1, 1, 1, 1],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1,
        "use_temporal_resblock": False,
    }
    model = comfy.supported_models.SD15(unet_config).get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (or COMFYUI_PATH)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="latent size (pixels / 8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.comfyui:
        p.error("give --comfyui or set COMFYUI_PATH to a ComfyUI checkout")
    torch.set_num_threads(args.threads)
    comfy, mm, nodes = load_comfy(args.comfyui)
    engine = sys.modules[str(REPO).replace(".", "_x_") + ".morse_engine"]
    model = build_model(comfy, mm, args.channels, 64)
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, 64, generator=g), {}]]
    neg = [[torch.randn(1, 77, 64, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 4, args.size, args.size)}
    morse = nodes.NODE_CLASS_MAPPINGS["MorseKSampler"]

    def plain():
        return nodes.common_ksampler(model, 1, args.steps, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]

    def with_morse():
        return morse.execute(model, 1, args.steps, 7.0, "euler", "normal", pos, neg, latent, 1.0,
                             schedule=engine.EveryK(1)).result[0]["samples"]

    assert torch.equal(plain(), with_morse()), "Dash-only Morse must equal KSampler"
    times = {"KSampler": [], "Morse KSampler (all Dash)": []}
    for _ in range(args.repeats):
        for name, fn in (("KSampler", plain), ("Morse KSampler (all Dash)", with_morse)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["KSampler"])
    print(f"SD1.x-family UNet, model_channels {args.channels}, latent {args.size}x{args.size}, {args.steps} euler steps, "
          f"CFG batch 2, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads, device {mm.get_torch_device()}")
    for name, values in times.items():
        med = statistics.median(values)
        spread = (max(values) - min(values)) / med
        print(f"  {name:28s} median {med * 1e3:8.1f} ms per run ({med / args.steps * 1e3:6.2f} ms per step), "
              f"spread {spread:.1%}, overhead {(med / base - 1):+.2%}")


if __name__ == "__main__":
    main()
