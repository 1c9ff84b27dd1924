"""Rebuild the committed reference files from scratch.

    python -m training.train_reference              # both files, as committed
    python -m training.train_reference --only unet --out-dir /tmp/ref
    python -m training.train_reference --arch dit   # the reference DiT (a flow-matching miniature of Flux)

Writes ``reference_dash.safetensors`` (the reference Dash UNet, EMA weights, and its class
conditioner) and ``digits_classifier.safetensors`` (the feature classifier) into --out-dir
(default ``models/reference``); ``--arch dit`` writes ``reference_dit.safetensors`` (the reference DiT and its
class conditioner) instead of the UNet. All are trained on the *train* split only; the test split is
used for the classifier's accuracy and the Dash's quality check, which samples 200 digits
(20 per class) with Euler on ComfyUI's "simple" sigmas and classifies them. Everything is
seeded; results are reproducible on the same machine and torch build (CPU kernels may differ
in the last bits elsewhere).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .reference.classifier import (DEFAULT_CLASSIFIER_PATH, DEFAULT_CONFIG, DigitsClassifier, accuracy, batched,
                         frechet_distance, load_feature_classifier)
from .reference.digits import SPLIT_DESCRIPTION, load_digits_split
from morse_engine.parameterization import DiscreteSchedule, FlowSchedule

from .evaluation.samplers import GuidedDenoiser, sample
from .paths import REFERENCE_DIR
from .reference.dit import FluxConfig, ReferenceFlux
from .reference.unet import NULL_CLASS, ClassConditioner, ReferenceUNet, UNetConfig, sd_alphas_cumprod

DEFAULT_OUT_DIR = REFERENCE_DIR
DASH_FILE, CLASSIFIER_FILE, DIT_FILE = "reference_dash.safetensors", "digits_classifier.safetensors", "reference_dit.safetensors"
FORMAT_VERSION = 1

# The committed reference model (measured costs and the choice: models/reference/README.md). Widths are
# far below SD's so that a Dash step stays affordable on 2 CPU cores; model_channels=16 needs
# norm_groups=8 (ComfyUI hard-codes 32 groups, so this exact config cannot be built as ComfyUI's
# UNetModel, but every block and key name matches it: the tests check equivalence at width 32).
REFERENCE_UNET_CONFIG = UNetConfig(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 1, 4),
                                   num_res_blocks=1, attention_resolutions=(2, 4), num_head_channels=16,
                                   context_dim=64, transformer_depth=1, norm_groups=8)
REFERENCE_CONDITIONER = {"context_dim": 64, "n_tokens": 2, "num_classes": 10}
# The reference DiT: Flux's double- then single-stream blocks at width 48 (0.92M parameters, the UNet's size),
# 4 + 16 blocks in Flux-dev's proportions (19 + 38) so that the outer blocks are a small share of a call; 4x4
# patches (64 image tokens) keep a training step under half a second on 2 cores.
REFERENCE_DIT_CONFIG = FluxConfig(hidden_size=48, num_heads=3, depth=4, depth_single_blocks=16, axes_dim=[4, 6, 6],
                                  patch_size=4, context_in_dim=64)
REFERENCE_DIT_MU = 0.5  # ModelSamplingFlux's shift: Flux's base shift, the one it gives its smallest images
DEFAULTS = {
    "unet": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "seed": 0},
    "dit": {"steps": 4000, "batch_size": 64, "lr": 1e-3, "seed": 0},
    "classifier": {"steps": 600, "batch_size": 128, "lr": 2e-3, "seed": 0},
}


# --------------------------------------------------------------------------- helpers
def atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors with JSON-encoded metadata values, written to a temp file then os.replace'd."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value -1."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------- sampling (quality check)
def simple_sigmas(ms: DiscreteSchedule, steps: int) -> torch.Tensor:
    """ComfyUI's "simple" scheduler on the SD discrete sigmas: steps + 1 values ending in 0."""
    ss = len(ms.sigmas) / steps
    return torch.cat([torch.stack([ms.sigmas[-(1 + int(i * ss))] for i in range(steps)]), torch.zeros(1)])


@torch.no_grad()
def sample_euler_cfg(unet, conditioner, labels: torch.Tensor, steps: int = 50, cfg_scale: float = 2.5,
                     seed: int = 0, ms=None) -> torch.Tensor:
    """Euler sampling as ComfyUI does it (default: an eps model with ModelSamplingDiscrete; CFG on denoised)."""
    ms = ms or DiscreteSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    noise = torch.randn(labels.shape[0], unet.in_channels, 32, 32, generator=torch.Generator().manual_seed(seed))
    den = GuidedDenoiser(unet, ms, conditioner(labels), conditioner(torch.full_like(labels, NULL_CLASS)), cfg_scale)
    return sample("euler", den, noise, simple_sigmas(ms, steps), ms)


def quality_check(unet, conditioner, classifier, n_per_class=20, steps=50, cfg_scale=2.5, seed=0, ms=None) -> dict:
    labels = torch.arange(10).repeat_interleave(n_per_class)
    samples = sample_euler_cfg(unet, conditioner, labels, steps=steps, cfg_scale=cfg_scale, seed=seed, ms=ms)
    pred = batched(classifier.logits, samples).argmax(1)
    test_feats = batched(classifier.features, load_digits_split("test")[0])
    train_x = load_digits_split("train")[0]
    real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:len(labels)]]
    return {"n_samples": len(labels), "steps": steps, "cfg_scale": cfg_scale, "sampler": "euler",
            "scheduler": "simple", "seed": seed,
            "class_accuracy": round(float((pred == labels).float().mean()), 4),
            "fd_vs_test": round(frechet_distance(batched(classifier.features, samples), test_feats), 3),
            # the same statistic for as many real (train) images: FD has a large small-sample bias
            "fd_real_train_subset_vs_test": round(frechet_distance(batched(classifier.features, real),
                                                                   test_feats), 3)}


# --------------------------------------------------------------------------- classifier
def train_classifier(out_path: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    model = DigitsClassifier(**DEFAULT_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0, bar = time.time(), tqdm(range(steps), desc="classifier", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=30)
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        loss = F.cross_entropy(model(random_shift(x_train[idx], 2, g)), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "final_loss": round(loss.item(), 5),
               "wall_time_s": round(time.time() - t0, 1), "seed": seed, "augmentation": "random shift <= 2 px",
               "train_accuracy": round(accuracy(model, x_train, y_train), 4)}
    feats = {s: batched(model.features, load_digits_split(s)[0]) for s in ("train", "test")}
    meta = {"format_version": FORMAT_VERSION, "kind": "digits_feature_classifier", "config": model.config,
            "test_accuracy": round(test_acc, 4), "seed": seed, "data_split": SPLIT_DESCRIPTION,
            "training": summary, "fd_train_vs_test": round(frechet_distance(feats["train"], feats["test"]), 3)}
    atomic_save(model.state_dict(), out_path, meta)
    print(f"classifier: test accuracy {test_acc:.4f}, wall {summary['wall_time_s']} s -> {out_path}")
    return meta


# --------------------------------------------------------------------------- UNet
def train_unet(out_path: Path, steps: int, batch_size: int, lr: float, seed: int,
               classifier_path: Path | None = None) -> dict:
    torch.manual_seed(seed)  # the start weights
    unet, cond = ReferenceUNet(REFERENCE_UNET_CONFIG), ClassConditioner(**REFERENCE_CONDITIONER)
    sqrt_ac = sd_alphas_cumprod().float().sqrt()
    sqrt_1m_ac = (1 - sd_alphas_cumprod()).float().sqrt()

    def noised(x0, g):  # DDPM: a discrete timestep, eps the target
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise, t.float(), noise

    summary = fit(unet, cond, noised, steps, batch_size, lr, seed, "reference unet")
    meta = {"format_version": FORMAT_VERSION, "kind": "reference_dash",
            "config": {"unet": REFERENCE_UNET_CONFIG.to_dict(), "conditioner": REFERENCE_CONDITIONER},
            "prediction": "eps", "schedule": {"beta_schedule": "scaled_linear", "linear_start": 0.00085,
                                              "linear_end": 0.012, "timesteps": 1000},
            "null_class": NULL_CLASS, "image_size": [1, 32, 32], "data_split": SPLIT_DESCRIPTION + "; train split",
            "training": summary}
    return check_and_save(unet, cond, meta, classifier_path, out_path, "reference unet")


def fit(model, cond, noised, steps: int, batch_size: int, lr: float, seed: int, desc: str) -> dict:
    """The reference models' training loop: AdamW with warm-up and cosine decay, 10% condition dropout, shifts of
    up to 1 pixel, gradient clipping, EMA weights (copied into the model at the end, which is then frozen).
    ``noised(x0, generator)`` -> (the model's input, its timestep, the target) is the model's own objective; every
    draw comes from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_split("train")
    params = list(model.parameters()) + list(cond.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0, bar, losses = time.time(), tqdm(range(steps), desc=desc, dynamic_ncols=True), []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=100)
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        x0 = random_shift(x_train[idx], 1, g)
        labels = torch.where(torch.rand(batch_size, generator=g) < 0.1, NULL_CLASS, y_train[idx])
        xt, t, target = noised(x0, g)
        loss = F.mse_loss(model(xt, t, cond(labels)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    wall = time.time() - t0
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    model.eval().requires_grad_(False)
    cond.eval().requires_grad_(False)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "optimizer": "AdamW",
            "ema_decay": 0.999, "cond_dropout": 0.1, "augmentation": "random shift <= 1 px",
            "final_loss_mean_last50": round(sum(losses[-50:]) / len(losses[-50:]), 5), "wall_time_s": round(wall, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def check_and_save(model, cond, meta: dict, classifier_path, out_path: Path, desc: str, ms=None) -> dict:
    """The quality check (where a classifier is found) into the metadata, then the weights and metadata saved."""
    classifier = None
    for candidate in (classifier_path, DEFAULT_CLASSIFIER_PATH):
        if candidate is not None and Path(candidate).is_file():
            classifier, _ = load_feature_classifier(candidate)
            break
    if classifier is not None:
        meta["quality_check"] = quality_check(model, cond, classifier, ms=ms)
        print("quality check:", meta["quality_check"])
    tensors = {f"diffusion_model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"conditioner.{k}": v for k, v in cond.state_dict().items()})
    atomic_save(tensors, out_path, meta)
    print(f"{desc}: loss {meta['training']['final_loss_mean_last50']}, wall {meta['training']['wall_time_s']:.0f} s -> {out_path}")
    return meta


# --------------------------------------------------------------------------- DiT
def adaln_zero(dit: ReferenceFlux) -> None:
    """DiT's adaLN-Zero start: every modulation and the output layer at zero, so each block starts as the
    identity and the model at a zero velocity (the DiT paper's initialisation, which it finds trains fastest)."""
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.endswith("mod.lin") or name.endswith("modulation.lin")
                                                    or name.startswith("final_layer.")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def train_dit(out_path: Path, steps: int, batch_size: int, lr: float, seed: int,
              classifier_path: Path | None = None) -> dict:
    """Rectified flow as Flux and SD3 are trained: x_t = (1 - t) x0 + t noise, the target the velocity noise - x0,
    t drawn logit-normal (SD3's choice); EMA weights as the UNet's."""
    torch.manual_seed(seed)  # the start weights
    dit, cond = ReferenceFlux(REFERENCE_DIT_CONFIG), ClassConditioner(**REFERENCE_CONDITIONER)
    adaln_zero(dit)

    def noised(x0, g):  # rectified flow: t logit-normal, the velocity the target
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
        noise = torch.randn(x0.shape, generator=g)
        return (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise, t, noise - x0

    summary = fit(dit, cond, noised, steps, batch_size, lr, seed, "reference dit")
    summary.update({"time_sampling": "logit-normal (0, 1)", "init": "adaLN-Zero"})
    ms = FlowSchedule.flux(REFERENCE_DIT_MU)
    meta = {"format_version": FORMAT_VERSION, "kind": "reference_dit", "arch": "dit",
            "config": {"dit": REFERENCE_DIT_CONFIG.to_dict(), "conditioner": REFERENCE_CONDITIONER},
            "prediction": "flow", "schedule": {**ms.to_dict(), "model_sampling": "ModelSamplingFlux",
                                               "mu": REFERENCE_DIT_MU},
            "null_class": NULL_CLASS, "image_size": [1, 32, 32], "data_split": SPLIT_DESCRIPTION + "; train split",
            "training": summary}
    return check_and_save(dit, cond, meta, classifier_path, out_path, "reference dit", ms=ms)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--only", choices=["unet", "classifier", "both"], default="both")
    p.add_argument("--arch", choices=["unet", "dit"], default="unet",
                   help="the reference Dash to build: the UNet (default) or the DiT (--only is then ignored)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: 3000 unet, 4000 dit, 600 classifier)")
    p.add_argument("--batch-size", type=int, help="default: 64 unet, 128 classifier")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 unet, 2e-3 classifier)")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the committed files were made with 1; results with "
                        "another count differ in the last bits, and 1 stays fast on a busy machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def opts(kind):
        d = DEFAULTS[kind]
        return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in d.items()}

    if args.arch == "dit":
        train_dit(args.out_dir / DIT_FILE, **opts("dit"), classifier_path=args.out_dir / CLASSIFIER_FILE)
        return
    if args.only in ("classifier", "both"):
        train_classifier(args.out_dir / CLASSIFIER_FILE, **opts("classifier"))
    if args.only in ("unet", "both"):
        train_unet(args.out_dir / DASH_FILE, **opts("unet"), classifier_path=args.out_dir / CLASSIFIER_FILE)


if __name__ == "__main__":
    main()
