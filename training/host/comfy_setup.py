"""A Dash from the user's own checkpoint, loaded by ComfyUI's own loader (issue 5).

``python -m training.train_dot --checkpoint model.safetensors --prompts prompts.txt`` (data-free)
or ``--images DIR`` (images with ``name.txt`` captions) builds a :class:`DashSetup` here (through
``training.dash_source.open_dash``):

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

Only this module and the modules of host/ import ``comfy``, and only inside functions; nothing host-free imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from morse_engine import fingerprint_module
from morse_engine.block_replace import takes_block_patches
from morse_engine.parameterization import guidance

from ..trainer.dash_setup import DashSetup
from .checkpoint import ComfyCheckpoint, TrajectorySettings, common_length, schedule_of

from .data import TensorCache, find_images, read_prompts


def comfy_setup(
    checkpoint: Path,
    run_dir: Path,
    *,
    prompts: Optional[Path] = None,
    images: Optional[Path] = None,
    resolution: Optional[int] = None,
    frames: int = 33,
    text_encoders=(),
    clip_type: Optional[str] = None,
    vae: Optional[Path] = None,
    comfyui: Optional[str] = None,
    trajectory: Optional[TrajectorySettings] = None,
    device: str = "cpu",
    log=print,
) -> DashSetup:
    """A DashSetup for ``checkpoint`` with prompts (data-free, on Dash's own trajectories) or captioned images;
    ``frames``: the clip length of a video family's runs (ignored for image families); ``text_encoders``
    (``clip_type``, ``vae``): ``checkpoint`` is a diffusion model alone, read with these (``ComfyCheckpoint``)."""
    if (prompts is None) == (images is None):
        raise ValueError("give exactly one data source for a checkpoint: --prompts FILE (data-free) or --images DIR")
    ck = ComfyCheckpoint(checkpoint, comfyui, device, text_encoders=text_encoders, clip_type=clip_type, vae=vae)
    res, scale = resolution or ck.default_resolution(), ck.downscale()
    if res % scale:
        raise ValueError(f"--resolution {res} is not a multiple of {scale} (the VAE's downscale); use e.g. "
                         f"{res - res % scale or scale}")
    latent_shape = ck.latent_shape(res, frames)
    cache_dir = run_dir / "cache" / ck.id
    texts, x0_all, latent_shape, latent_cache = _training_data(ck, prompts, images, res, latent_shape, cache_dir, log)
    text_cache = TensorCache(cache_dir / "text.safetensors")
    contexts, kw_table, null_index = _condition_tables(ck, texts, latent_shape, text_cache, log)
    # written once the checkpoint is known to be usable (an inpainting model is refused above with nothing on disk)
    for cache in (latent_cache, text_cache):
        if cache is not None:
            cache.save()

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
        sampling=schedule_of(ck.model.model_sampling, ck.prediction),  # as ComfyUI samples it
        encode=encode,
        null_condition=null_condition,
        batches=batches,
        base_family=ck.family,
        fingerprint=fingerprint_module(ck.unet),  # as the nodes compute it: diffusion_model's state dict, before any LoRA
        latent_shape=latent_shape,
        prediction=ck.prediction,
        extra_kwargs=extra_kwargs if kw_table else None,
        trajectory=trajectory_fn,
        guidance_distilled=ck.guidance_distilled,
        inplace_forward=takes_block_patches(ck.unet),
    )


def _training_data(ck: ComfyCheckpoint, prompts, images, res: int, latent_shape: tuple, cache_dir: Path, log):
    """(texts, image latents or None, latent shape, the latents' cache or None): the captioned images encoded with
    the checkpoint's VAE, or the prompts alone (data-free)."""
    if images is None:
        return read_prompts(prompts), None, latent_shape, None
    pairs = find_images(images)
    latent_cache = TensorCache(cache_dir / f"latents-{res}.safetensors")
    raw = ck.encode_images([p for p, _ in pairs], res, latent_cache)
    x0_all = ck.latent_format.process_in(raw)  # the model's latent space (scale factor), as sampling uses it
    log(_cache_line("image latents", len(pairs), latent_cache))
    return [c for _, c in pairs], x0_all, tuple(x0_all.shape[1:]), latent_cache


def _condition_tables(ck: ComfyCheckpoint, texts: list, latent_shape: tuple, text_cache: TensorCache, log):
    """(contexts, backbone kwargs by name, the empty prompt's index) of every text and the empty prompt."""
    table = texts + [""]  # the last entry: the empty prompt, the uncond branch of CFG
    null_index = len(table) - 1
    conds, pooled = ck.encode_text(table, text_cache)
    log(_cache_line("text embeddings", len(table), text_cache))
    contexts, kwargs_rows = [], []
    for i, (c, p) in enumerate(zip(conds, pooled)):
        context, kw = ck.model_conds(c, p, latent_shape, negative=i == null_index)
        contexts.append(context)
        kwargs_rows.append(kw)
    contexts = torch.cat(common_length(contexts)).to(ck.device)
    kw_table = {name: torch.cat([row[name] for row in kwargs_rows]).to(ck.device) for name in sorted(kwargs_rows[0])}
    return contexts, kw_table, null_index


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


def measure_inputs(setup: DashSetup, batch: int, generator: Optional[torch.Generator] = None):
    """(x, context, backbone kwargs) of a CFG batch for measuring N: half prompts, half the empty prompt."""
    half = max(1, batch // 2)
    cond = torch.cat([torch.zeros(batch - half, dtype=torch.long), setup.null_condition(half)])
    x = torch.randn((batch,) + tuple(setup.latent_shape), generator=generator)
    kwargs = setup.extra_kwargs(cond) if setup.extra_kwargs is not None else {}
    return x, setup.encode(cond), kwargs
