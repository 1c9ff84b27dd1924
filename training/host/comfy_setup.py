"""A Dash from the user's own checkpoint, loaded by ComfyUI's own loader (issue 5).

``python -m training.train_dot --checkpoint model.safetensors --prompts prompts.txt`` (data-free)
or ``--images DIR`` (images with ``name.txt`` captions) builds a :class:`DashSetup` here:

* ComfyUI is found through ``--comfyui``, ``COMFYUI_PATH`` or the pack's place in
  ``ComfyUI/custom_nodes/``, and the checkpoint is read with the function ComfyUI's
  CheckpointLoaderSimple calls (``comfy.sd.load_checkpoint_guess_config``), so every format
  and family ComfyUI detects loads the same way it does for sampling.
* Conditioning is what ComfyUI's CLIPTextEncode and the model's ``extra_conds`` make at
  sampling time: the checkpoint's CLIP on the prompt (the empty prompt for the uncond
  branch, as an empty negative prompt gives), plus SDXL's ``y`` vector (pooled text and
  size embeddings) through ``model.extra_conds``.
* The schedule is the model's own ``model_sampling`` (sigmas, eps or v-prediction).
* Latents (VAE) and text embeddings are cached as safetensors under the run directory,
  keyed by the checkpoint file and by each prompt / image file, so a second run (or a
  resumed one) does not encode again.

Only this module and the CLI import ``comfy``; nothing host-free imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from morse_engine import fingerprint_module
from morse_engine.parameterization import DiscreteSchedule, guidance

from ..trainer.dash_setup import DashSetup
from .checkpoint import ComfyCheckpoint, TrajectorySettings, common_length

from .data import TensorCache, find_images, read_prompts


def comfy_setup(
    checkpoint: Path,
    run_dir: Path,
    *,
    prompts: Optional[Path] = None,
    images: Optional[Path] = None,
    resolution: Optional[int] = None,
    comfyui: Optional[str] = None,
    trajectory: Optional[TrajectorySettings] = None,
    device: str = "cpu",
    log=print,
) -> DashSetup:
    """A DashSetup for ``checkpoint`` with prompts (data-free, on Dash's own trajectories) or captioned images."""
    if (prompts is None) == (images is None):
        raise ValueError("give exactly one data source for a checkpoint: --prompts FILE (data-free) or --images DIR")
    ck = ComfyCheckpoint(checkpoint, comfyui, device)
    res = resolution or ck.default_resolution()
    if res % 8:
        raise ValueError(f"--resolution {res} is not a multiple of 8 (the VAE's downscale); use e.g. {res - res % 8 or 8}")
    latent_shape = (ck.latent_channels, res // 8, res // 8)
    cache_dir = run_dir / "cache" / ck.id
    text_cache = TensorCache(cache_dir / "text.safetensors")

    if images is not None:
        pairs = find_images(images)
        captions = [c for _, c in pairs]
        latent_cache = TensorCache(cache_dir / f"latents-{res}.safetensors")
        raw = ck.encode_images([p for p, _ in pairs], res, latent_cache)
        x0_all = ck.latent_format.process_in(raw)  # the model's latent space (scale factor), as sampling uses it
        latent_shape = tuple(x0_all.shape[1:])
        log(_cache_line("image latents", len(pairs), latent_cache))
        texts = captions
    else:
        texts = read_prompts(prompts)
        x0_all = latent_cache = None

    table = texts + [""]  # the last entry: the empty prompt, the uncond branch of CFG
    null_index = len(table) - 1
    conds, pooled = ck.encode_text(table, text_cache)
    log(_cache_line("text embeddings", len(table), text_cache))
    contexts, kwargs_rows = [], []
    for i, (c, p) in enumerate(zip(conds, pooled)):
        context, kw = ck.model_conds(c, p, latent_shape, negative=i == null_index)
        contexts.append(context)
        kwargs_rows.append(kw)
    # written once the checkpoint is known to be usable (an inpainting model is refused above with nothing on disk)
    for cache in (latent_cache, text_cache):
        if cache is not None:
            cache.save()
    contexts = torch.cat(common_length(contexts)).to(ck.device)
    kw_names = sorted(kwargs_rows[0])
    kw_table = {name: torch.cat([row[name] for row in kwargs_rows]).to(ck.device) for name in kw_names}

    def encode(idx: torch.Tensor) -> torch.Tensor:
        return contexts[idx.to(contexts.device)]

    def extra_kwargs(idx: torch.Tensor) -> dict:
        return {name: table_[idx.to(table_.device)] for name, table_ in kw_table.items()}

    def null_condition(b: int) -> torch.Tensor:
        return torch.full((b,), null_index, dtype=torch.long)

    if x0_all is not None:
        def batches(batch_size: int, generator: torch.Generator):
            # indices drawn from the generator alone, so a resumed run sees the same data
            while True:
                idx = torch.randint(0, len(x0_all), (batch_size,), generator=generator)
                yield x0_all[idx], idx
        trajectory_fn = None
    else:
        n_prompts = len(texts)

        def batches(batch_size: int, generator: torch.Generator):
            # the noise each sampling run starts from; training_tuple runs Dash's sampler on it
            while True:
                idx = torch.randint(0, n_prompts, (batch_size,), generator=generator)
                yield torch.randn((batch_size,) + latent_shape, generator=generator), idx
        settings = trajectory or TrajectorySettings()
        trajectory_fn = _trajectory_runner(ck, encode, extra_kwargs, null_condition, settings)
        mean_calls = (settings.steps[0] + settings.steps[1]) / 4  # runs stop at a uniform step of a uniform length
        log(f"data-free: {len(texts)} prompts; each batch first runs {settings.sampler}/{settings.scheduler} with CFG "
            f"{settings.cfg[0]:g}-{settings.cfg[1]:g} for about {mean_calls:.0f} Dash steps (x2 for CFG) to reach its anchor")

    return DashSetup(
        unet=ck.unet,
        sampling=DiscreteSchedule(ck.model.model_sampling.sigmas, ck.prediction),  # the sigmas as ComfyUI has them
        encode=encode,
        null_condition=null_condition,
        batches=batches,
        base_family=ck.family,
        fingerprint=fingerprint_module(ck.unet),  # as the nodes compute it: diffusion_model's state dict, before any LoRA
        latent_shape=latent_shape,
        prediction=ck.prediction,
        extra_kwargs=extra_kwargs if kw_table else None,
        trajectory=trajectory_fn,
    )


def _cache_line(what: str, n: int, cache: TensorCache) -> str:
    if cache.added == 0:
        return f"cache hit: {n} {what} read from {cache.path}"
    return f"cache: encoded {cache.added} tensors of {n} {what}, kept in {cache.path}"


def _trajectory_runner(ck: ComfyCheckpoint, encode, extra_kwargs, null_condition, settings: TrajectorySettings):
    """(noise, conditions, generator) -> (x_s, sigma_s): ComfyUI's own sampler with CFG, stopped at a random step.

    One run per batch: the step count, the step to stop at (0 = pure noise, the first Dash step)
    and the CFG scale are drawn from the generator; the model is called the way ComfyUI's
    sampling calls it (scaled input, discrete timestep, native output turned into denoised by the
    model's own model_sampling, CFG on denoised), with the Dot's LoRA off (training_tuple's context).
    """
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers

    ms = ck.model.model_sampling
    if settings.scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"--trajectory-scheduler {settings.scheduler!r} is not one of ComfyUI's {comfy.samplers.SCHEDULER_NAMES}")
    sample_fn = getattr(kds, f"sample_{settings.sampler}", None)
    if sample_fn is None:
        raise ValueError(f"--trajectory-sampler {settings.sampler!r} is not a ComfyUI k-diffusion sampler; use e.g. euler, euler_ancestral, dpmpp_2m")
    lo, hi = settings.steps
    if not 1 <= lo <= hi:
        raise ValueError(f"--trajectory-steps {lo},{hi} is empty; give 1 <= MIN <= MAX")

    def run(noise: torch.Tensor, cond: torch.Tensor, gen: torch.Generator):
        b = noise.shape[0]
        steps = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        stop = int(torch.randint(0, steps, (1,), generator=gen))
        scale = float(torch.empty(1).uniform_(settings.cfg[0], settings.cfg[1], generator=gen))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        sigmas = comfy.samplers.calculate_sigmas(ms, settings.scheduler, steps).float().cpu()
        both = torch.cat([cond, null_condition(b)])
        context, kwargs = encode(both), extra_kwargs(both)
        x = ms.noise_scaling(sigmas[:1], noise.to(ck.device), torch.zeros_like(noise, device=ck.device), max_denoise=True)

        def denoiser(x_, sigma, **_):
            sigma2 = torch.cat([sigma, sigma]).to(x_.device)
            x2 = torch.cat([x_, x_])
            out = ck.unet(ms.calculate_input(sigma2, x2), ms.timestep(sigma2).float(), context=context, **kwargs)
            c, u = ms.calculate_denoised(sigma2, out.float(), x2).chunk(2)
            return guidance(c, u, scale)  # ComfyUI's cfg_function, on denoised

        if stop > 0:
            x = sample_fn(denoiser, x, sigmas[: stop + 1].to(ck.device), extra_args={"seed": seed}, disable=True)
        run.last = {"steps": steps, "stop": stop, "cfg": scale, "seed": seed}  # what this run drew, for logs and tests
        return x, sigmas[stop].expand(b).clone()

    return run


# ---- the command line (training.train_dot) -------------------------------------------------


def _pair(kind):
    def parse(text):
        values = [kind(v) for v in text.split(",") if v.strip()]
        if len(values) == 1:
            values *= 2
        if len(values) != 2:
            raise ValueError(f"expected MIN,MAX or one value, got {text!r}")
        return tuple(values)

    parse.__name__ = "MIN,MAX"  # argparse names the type in its error message
    return parse


def add_arguments(p) -> None:
    """The options of training on a ComfyUI checkpoint."""
    d = TrajectorySettings()
    g = p.add_argument_group("training for your checkpoint (needs ComfyUI)")
    g.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, else the ComfyUI this pack is installed in)")
    g.add_argument("--prompts", type=Path, default=None,
                   help="data-free: a text file with one prompt per line; anchors are taken on the checkpoint's own sampling runs")
    g.add_argument("--images", type=Path, default=None, help="a folder of images with name.txt captions, encoded with the checkpoint's VAE")
    g.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: 512 SD1.x, 768 SD2.x-v, 1024 SDXL)")
    g.add_argument("--trajectory-sampler", default=d.sampler, help="ComfyUI sampler of the data-free runs (default: euler)")
    g.add_argument("--trajectory-scheduler", default=d.scheduler, help="ComfyUI scheduler of the data-free runs (default: normal)")
    g.add_argument("--trajectory-steps", type=_pair(int), default=d.steps, help="MIN,MAX steps of a data-free run, drawn per batch")
    g.add_argument("--trajectory-cfg", type=_pair(float), default=d.cfg, help="MIN,MAX CFG scale of a data-free run, drawn per batch")


def is_reference_weights(path: Path) -> bool:
    """The project's own reference-Dash format (safetensors whose metadata holds its UNet config)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return '"unet"' in meta.get("config", "")


def wants_comfy(args) -> bool:
    """A ComfyUI checkpoint run: a data source for it was given, or --checkpoint is not a reference-Dash file."""
    if args.prompts is not None or args.images is not None:
        return True
    return args.checkpoint is not None and not is_reference_weights(Path(args.checkpoint))


def setup_from_args(args, run_dir: Path, device: str = "cpu") -> DashSetup:
    """``device``: where the UNet and the conditioning tables live (train_dot's --device)."""
    if args.checkpoint is None:
        raise ValueError("--prompts/--images train a Dot for your checkpoint: give it with --checkpoint PATH")
    if args.prompts is None and args.images is None:
        raise ValueError(
            f"--checkpoint {args.checkpoint} is a ComfyUI checkpoint: give the training data with --prompts FILE "
            "(one prompt per line, data-free) or --images DIR (images with name.txt captions)"
        )
    return comfy_setup(
        Path(args.checkpoint), run_dir, prompts=args.prompts, images=args.images, resolution=args.resolution,
        comfyui=args.comfyui,
        trajectory=TrajectorySettings(args.trajectory_sampler, args.trajectory_scheduler, args.trajectory_steps, args.trajectory_cfg),
        device=str(device),
    )


def measure_inputs(setup: DashSetup, batch: int, generator: Optional[torch.Generator] = None):
    """(x, context, backbone kwargs) of a CFG batch for measuring N: half prompts, half the empty prompt."""
    half = max(1, batch // 2)
    cond = torch.cat([torch.zeros(batch - half, dtype=torch.long), setup.null_condition(half)])
    x = torch.randn((batch,) + tuple(setup.latent_shape), generator=generator)
    kwargs = setup.extra_kwargs(cond) if setup.extra_kwargs is not None else {}
    return x, setup.encode(cond), kwargs
