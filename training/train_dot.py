"""Train a Dot adapter: ``python -m training.train_dot``.

With no arguments it trains a Dot for the embedded reference Dash on the digits training
split and writes ``models/dot_models/reference_digits_trained.safetensors`` (beside the committed
``reference_digits.safetensors``, a longer run of the same recipe, which it never overwrites). A run writes a
resumable checkpoint every ``--checkpoint-every`` steps to ``runs/<name>/train-state.safetensors``;
``--resume`` continues a killed run from it.

For your own checkpoint (SD1.x, SD2.x incl. v-prediction, SDXL; run with ComfyUI's Python):
``--checkpoint model.safetensors --prompts prompts.txt`` (data-free) or ``--images DIR``
(captions in name.txt); the Dot goes to ComfyUI's models/dot_models (see training/comfy_setup.py).

Cost (training/runtime.py): ``--device`` (default: CUDA where available), ``--precision``
(default: bf16 on CUDA, fp16 where the GPU lacks bf16, fp32 on the CPU), ``--grad-checkpointing``
(default: on for CUDA) and ``--grad-accum K``. A memory estimate is printed before training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from morse_engine import save_dot

from . import train_feature_dot as feature
from .dot_record import run_files, training_record
from .evaluation.latency import measure_n
from .host import comfy_setup as comfy_cli
from .host.comfyui import ComfyUINotFound
from .paths import DOT_DIR, RUNS_DIR
from .train_feature_dot import add_feature_arguments
from .trainer import distributed
from .trainer import runtime as runtimes
from .trainer.config import DotTrainConfig, add_config_arguments, config_from_args
from .trainer.dash_setup import reference_setup
from .trainer.loop import TrainingDiverged, train_dot

LAYOUTS = ("feature", "paper")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train_dot", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Dash weights: your checkpoint, loaded by ComfyUI (with --prompts or --images), or reference-format "
                        "weights (default: the embedded reference model)")
    p.add_argument("--data", default="digits", choices=["digits"], help="training data (default: scikit-learn digits, train split)")
    p.add_argument("--name", default=None, help="output name (default: reference_digits_trained, or reference_digits_no_trajectory_trained; the "
                   "committed reference_digits*.safetensors are longer runs of the same recipe and stay as they are)")
    p.add_argument("--out", type=Path, default=None, help="output .safetensors (default: models/dot_models/<name>.safetensors)")
    p.add_argument("--layout", choices=LAYOUTS, default="feature",
                   help="feature (default): Dash's own outer blocks on the current input, the deep feature forecast "
                        "from the Dash calls before plus a learned change, trained on where whole sampling runs end; "
                        "paper: the paper's Dot (light blocks around the backbone at 1/2^m resolution, LoRA), trained "
                        "on Algorithm 1's tuples")
    add_feature_arguments(p)
    add_config_arguments(p)  # every option of the Dot, its tuples, its loss and the loop, from DotTrainConfig's fields
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/train-state.safetensors")
    p.add_argument("--runs", type=Path, default=RUNS_DIR,
                   help="folder of the run folders (checkpoints, cached latents and text embeddings; default: runs/ in the pack)")
    p.add_argument("--n-batch", type=int, default=None,
                   help="batch on which N (Dot speed-up) is measured (default: 512 for the reference model, 2 = one CFG pair for a checkpoint)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("cost: device, precision, memory")
    g.add_argument("--device", default=None,
                   help="where Dash, the Dot, the LoRA and the batches live: cpu, cuda, cuda:1, ... (default: cuda if "
                        "available, else cpu; under torchrun each process uses cuda:LOCAL_RANK)")
    g.add_argument("--precision", default=None, choices=runtimes.PRECISIONS,
                   help="autocast for Dash's passes and the Dot's forward/backward; trainable weights stay fp32 "
                        "(default: bf16 on CUDA, fp16 with loss scaling where the GPU has no bf16, fp32 on the CPU; "
                        "fp16 needs CUDA)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the backbone call inside the Dot during the backward instead of keeping its "
                        "activations (default: on for CUDA, off on the CPU)")
    comfy_cli.add_arguments(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_checkpoint = comfy_cli.wants_comfy(args)  # a ComfyUI checkpoint rather than the reference Dash
    if args.layout == "feature":
        return feature.main(args, on_checkpoint)
    # a checkpoint's Dot is trained at the guidance its own trajectories are sampled with
    cfg_range = dict(zip(("cfg_min", "cfg_max"), args.trajectory_cfg)) if on_checkpoint else {}
    try:
        config = config_from_args(args, **cfg_range)
    except ValueError as exc:  # an empty jump or CFG range, a batch or step count below 1, a base the Dot cannot have
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_batch = args.n_batch or (2 if on_checkpoint else 512)
    try:
        name, out, state_path = run_files(args, on_checkpoint, config.dot.trajectory, DOT_DIR)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        rt = runtimes.resolve(args.device, args.precision, args.grad_checkpointing, local_rank=distributed.local_rank())
    except ValueError as exc:  # no CUDA for --device cuda, fp16 on the CPU, bf16 on a GPU without it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(args, config, rt, on_checkpoint, name, n_batch, out, state_path)


def run(args, config: DotTrainConfig, rt, on_checkpoint: bool, name: str, n_batch: int, out: Path, state_path: Path) -> int:
    # Under torchrun / accelerate launch: join the group before any model is built, so each
    # rank's models land on its own GPU. None in a plain single-process run.
    dp = distributed.from_env(use_cuda=rt.device.type == "cuda")
    main_rank = dp is None or dp.is_main
    try:
        setup = (comfy_cli.setup_from_args(args, state_path.parent, device=str(rt.device)) if on_checkpoint
                 else reference_setup(args.checkpoint, rt.device))
    except (ComfyUINotFound, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if dp:
            dp.close()
        return 2
    if main_rank:
        accum = f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else ""
        ranks = f" on {dp.world_size} processes (batch {config.batch_size}{accum} each)" if dp else ""
        print(f"Training a Dot for {setup.base_family} ({sum(p.numel() for p in setup.unet.parameters()) / 1e6:.2f}M params), "
              f"{config.steps} steps of batch {config.batch_size}{accum if not dp else ''}{ranks} on {rt.describe()}; "
              f"checkpoints in {state_path}")
    try:
        result = train_dot(setup, config, state_path, resume=args.resume, parallel=dp, runtime=rt)
    except TrainingDiverged as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as exc:  # --resume without a checkpoint, or with other settings / world size
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dp:
            dp.close()
    if not main_rank:
        return 0  # every rank holds the same Dot; rank 0 alone measures N and writes the adapter

    # training injected peft layers into the first copy; N is measured on the training device and precision
    del setup
    with rt.autocast():
        if on_checkpoint:
            clean = comfy_cli.setup_from_args(args, state_path.parent, device=str(rt.device))
            x, context, backbone_kwargs = comfy_cli.measure_inputs(clean, n_batch)
            backbone_kwargs = {k: v.to(rt.device) for k, v in backbone_kwargs.items()}
            speed = measure_n(clean.unet, result.dot, x.to(rt.device), context.to(rt.device), **backbone_kwargs)
        else:
            clean = reference_setup(args.checkpoint, rt.device)
            x = torch.randn(n_batch, *clean.latent_shape).to(rt.device)
            labels = torch.arange(n_batch) % 10
            speed = measure_n(clean.unet, result.dot, x, clean.encode(labels))
    dash_params = sum(p.numel() for p in clean.unet.parameters())
    dot_params = sum(p.numel() for p in result.dot.parameters())
    training = training_record(args, result, config.flat(), dot_params, dash_params, speed, rt,
                               grad_checkpointing=rt.grad_checkpointing)
    save_dot(out, result.dot, base_family=clean.base_family, fingerprint=clean.fingerprint,
             measured_n=speed["N"], training=training)
    print(
        f"Wrote {out}\n"
        f"  loss {result.final_loss:.4f} vs {result.final_reuse_loss:.4f} for reusing the anchor estimate "
        f"({result.final_loss / result.final_reuse_loss:.0%})\n"
        f"  Dot adds {dot_params / 1e6:.3f}M params to Dash's {dash_params / 1e6:.3f}M ({dot_params / dash_params:.1%})\n"
        f"  N = {speed['N']:.2f} (Dash {speed['dash_seconds'] * 1e3:.1f} ms, Dot {speed['dot_seconds'] * 1e3:.1f} ms, "
        f"batch {n_batch})\n  trained in {result.seconds / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
