"""Train a Dot adapter: ``python -m training.train_dot``.

With no arguments it trains a Dot for the embedded reference Dash on the digits training
split and writes ``models/dot_models/reference_digits.safetensors``. A run writes a
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
import datetime
import platform
import sys
from pathlib import Path

import torch

from morse_engine import DEFAULT_TARGETS, save_dot

from . import comfy_setup as comfy_cli
from . import distributed
from . import runtime as runtimes
from .dash_setup import reference_setup
from .dot_trainer import JUMP_SAMPLERS, LOSS_WEIGHTS, DotTrainConfig, TrainingDiverged, train_dot
from .latency import measure_n

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOT_DIR = ROOT / "models" / "dot_models"


def _csv(kind):
    def parse(text):
        return tuple(kind(v) for v in text.split(",") if v.strip())

    return parse


def parser() -> argparse.ArgumentParser:
    d = DotTrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.train_dot", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Dash weights: your checkpoint, loaded by ComfyUI (with --prompts or --images), or reference-format "
                        "weights (default: the embedded reference model)")
    p.add_argument("--data", default="digits", choices=["digits"], help="training data (default: scikit-learn digits, train split)")
    p.add_argument("--name", default=None, help="output name (default: reference_digits, or reference_digits_no_trajectory)")
    p.add_argument("--out", type=Path, default=None, help="output .safetensors (default: models/dot_models/<name>.safetensors)")
    p.add_argument("--m", type=int, default=d.m, help="light down/up-sampling blocks; the backbone runs at 1/2^m per side")
    p.add_argument("--widths", type=_csv(int), default=None, help="light block widths, one per level (default: from the backbone)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", type=_csv(str), default=DEFAULT_TARGETS, help="comma-separated module names")
    p.add_argument("--no-trajectory", action="store_true", help="ablation: the Dot does not see x_s, z_s, t_s (paper Table 4)")
    p.add_argument("--step-input", default=d.step_input, choices=("deviation", "x_s"),
                   help="how the Dot sees the sampler's step since the anchor: the part of it that the anchor's own "
                        "estimate does not explain (default; carries the CFG scale and ancestral noise) or x_s itself "
                        "(the paper)")
    p.add_argument("--stem", default=d.stem, choices=("pixel_shuffle", "full_res"),
                   help="first light level: pixel-unshuffle to 1/2 resolution (default, cheaper) or a block at full resolution (the paper)")
    p.add_argument("--base", default=None, choices=("anchor", "extrapolate"),
                   help="what the Dot's residual is added to: extrapolate (default: the line in t through the last two "
                        "Dash estimates; one more Dash pass per training tuple) or anchor (the paper: the last Dash "
                        "estimate; the default with --no-trajectory)")
    p.add_argument("--eta-scale", default=d.eta_scale, choices=("sigma_step", "none"),
                   help="scale the Dot's correction by the relative sigma step (default) or not (the paper)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="samples per micro-batch (per process under torchrun); each is a cond + uncond pair")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="K",
                   help="micro-batches per optimizer step (default 1): the step's batch is batch-size x K (x processes), "
                        "for the memory of one micro-batch; --steps and --checkpoint-every count optimizer steps")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--jump-min", type=int, default=d.jump_min, help="shortest jump t_s -> t_i in timesteps")
    p.add_argument("--jump-max", type=int, default=d.jump_max, help="longest jump t_s -> t_i in timesteps")
    p.add_argument("--cfg-min", type=float, default=None,
                   help=f"lowest CFG scale that forms x_i, drawn uniformly per sample (default: {d.cfg_min:g} for the "
                        "reference model, the low end of --trajectory-cfg for a checkpoint)")
    p.add_argument("--cfg-max", type=float, default=None,
                   help=f"highest CFG scale that forms x_i; cover the scales you sample with (default: {d.cfg_max:g} for "
                        "the reference model, the high end of --trajectory-cfg for a checkpoint)")
    p.add_argument("--sampler", default=d.sampler, choices=JUMP_SAMPLERS, help="the step that forms x_i from (x_s, z_s): euler (= DDIM), euler_ancestral, dpmpp_2m (Euler plus the "
                        "solver's second-order correction; one more Dash pass per tuple, ~35%% slower), or mixed (half each)")
    p.add_argument("--loss-weight", default=d.loss_weight, choices=LOSS_WEIGHTS,
                   help="step (default): weight each tuple by its sigma step, as the sampler update does; none: plain MSE as in the "
                        "paper; relative: each tuple's error over reusing its anchor's, so short jumps count as much as long ones")
    p.add_argument("--loss-on", default=d.loss_on, choices=("guided", "branches"),
                   help="guided (default): also the error of the CFG-guided estimate the sampler uses; branches: per-branch MSE (the paper)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/train-state.safetensors")
    p.add_argument("--runs", type=Path, default=ROOT / "runs",
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
    if on_checkpoint:
        name = args.name or f"dot_{Path(args.checkpoint or 'checkpoint').stem}" + ("_no_trajectory" if args.no_trajectory else "")
    else:
        name = args.name or ("reference_digits_no_trajectory" if args.no_trajectory else "reference_digits")
    n_batch = args.n_batch or (2 if on_checkpoint else 512)
    out = args.out or (comfy_cli.default_dot_dir(args.comfyui) if on_checkpoint else DEFAULT_DOT_DIR) / f"{name}.safetensors"
    if out.suffix != ".safetensors":
        print(f"error: --out must end in .safetensors (got {out})", file=sys.stderr)
        return 2
    state_path = args.runs / name / "train-state.safetensors"
    # a checkpoint's Dot is trained at the guidance its own trajectories are sampled with
    cfg_lo, cfg_hi = args.trajectory_cfg if on_checkpoint else (DotTrainConfig.cfg_min, DotTrainConfig.cfg_max)
    try:
        cfg = train_config(args, cfg_lo if args.cfg_min is None else args.cfg_min, cfg_hi if args.cfg_max is None else args.cfg_max)
    except ValueError as exc:  # an empty jump or CFG range, a batch or step count below 1
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        rt = runtimes.resolve(args.device, args.precision, args.grad_checkpointing, local_rank=distributed.local_rank())
    except ValueError as exc:  # no CUDA for --device cuda, fp16 on the CPU, bf16 on a GPU without it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(args, cfg, rt, on_checkpoint, name, n_batch, out, state_path)


def train_config(args, cfg_min: float, cfg_max: float) -> DotTrainConfig:
    return DotTrainConfig(
        m=args.m,
        widths=args.widths,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets),
        trajectory=not args.no_trajectory,
        step_input=args.step_input,
        stem=args.stem,
        eta_scale=args.eta_scale,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        jump_min=args.jump_min,
        jump_max=args.jump_max,
        cfg_min=cfg_min,
        cfg_max=cfg_max,
        sampler=args.sampler,
        base=args.base or ("anchor" if args.no_trajectory else DotTrainConfig.base),
        loss_weight=args.loss_weight,
        loss_on=args.loss_on,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )


def run(args, cfg: DotTrainConfig, rt, on_checkpoint: bool, name: str, n_batch: int, out: Path, state_path: Path) -> int:
    # Under torchrun / accelerate launch: join the group before any model is built, so each
    # rank's models land on its own GPU. None in a plain single-process run.
    dp = distributed.from_env(use_cuda=rt.device.type == "cuda")
    main_rank = dp is None or dp.is_main
    try:
        setup = (comfy_cli.setup_from_args(args, state_path.parent, device=str(rt.device)) if on_checkpoint
                 else reference_setup(args.checkpoint, rt.device))
    except (comfy_cli.ComfyUINotFound, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if dp:
            dp.close()
        return 2
    if main_rank:
        accum = f" x {cfg.grad_accum} accumulated" if cfg.grad_accum > 1 else ""
        ranks = f" on {dp.world_size} processes (batch {cfg.batch_size}{accum} each)" if dp else ""
        print(f"Training a Dot for {setup.base_family} ({sum(p.numel() for p in setup.unet.parameters()) / 1e6:.2f}M params), "
              f"{cfg.steps} steps of batch {cfg.batch_size}{accum if not dp else ''}{ranks} on {rt.describe()}; "
              f"checkpoints in {state_path}")
    try:
        result = train_dot(setup, cfg, state_path, resume=args.resume, parallel=dp, runtime=rt)
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
    training = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "final_reuse_loss": result.final_reuse_loss,
        "data": f"prompts {args.prompts}" if args.prompts else f"images {args.images}" if args.images else args.data,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "dot_params": dot_params,
        "dash_params": dash_params,
        "latency": speed,
        "machine": (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
                    else f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()),
        "device": str(rt.device),
        "precision": rt.precision,
        "grad_checkpointing": rt.grad_checkpointing,
        "date": datetime.date.today().isoformat(),
        "loss_history": result.summary["history"],
    }
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
