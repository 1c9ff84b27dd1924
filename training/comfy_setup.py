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

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from morse_engine import fingerprint_module

from .dash_setup import DashSetup
from .sampling import DiscreteEpsSampling

PACK_DIR = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI: says every way to point at one."""


def find_comfyui(explicit: Optional[str] = None) -> Path:
    """``--comfyui``, else ``COMFYUI_PATH``, else the ComfyUI this pack sits in (custom_nodes/<pack>)."""
    tried = []
    for origin, value in (("--comfyui", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH"))):
        if value:
            path = Path(value).expanduser().resolve()
            if (path / "comfy").is_dir():
                return path
            # a path given on purpose that is not a ComfyUI is an error, not something to skip past
            raise ComfyUINotFound(f"{origin}={value} has no comfy/ package; point it at the ComfyUI folder (the one holding main.py and comfy/)")
        tried.append(origin)
    grand = PACK_DIR.parent.parent
    if PACK_DIR.parent.name == "custom_nodes" and (grand / "comfy").is_dir():
        return grand
    raise ComfyUINotFound(
        "cannot find ComfyUI to load the checkpoint with: pass --comfyui /path/to/ComfyUI, or set COMFYUI_PATH, "
        f"or install this pack in ComfyUI/custom_nodes/ (it is in {PACK_DIR.parent})"
    )


def import_comfy(path: Path, device: Optional[str] = None):
    """Import ComfyUI from ``path`` with the running Python; clear error when that is not possible.

    ComfyUI's model management looks for a GPU at import and fails on a machine without one
    unless told to use the CPU, so that flag is set (before the import) where there is no CUDA
    device or the CPU is asked for.
    """
    path = Path(path)
    if str(path) not in sys.path:
        # after the pack's own folder: the pack's packages (training, morse_engine, nodes) must keep their names
        sys.path.insert(1 if sys.path and sys.path[0] in ("", str(PACK_DIR)) else 0, str(path))
    try:
        import comfy.cli_args

        if device == "cpu" or not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        import comfy.k_diffusion.sampling  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.model_sampling  # noqa: F401
        import comfy.samplers  # noqa: F401
        import comfy.sd  # noqa: F401
        import folder_paths  # noqa: F401
    except Exception as exc:
        raise ComfyUINotFound(
            f"ComfyUI at {path} cannot be imported with this Python ({sys.executable}): {exc!r}. "
            "Run training with ComfyUI's own Python (the one that starts ComfyUI, e.g. its venv or python_embeded) "
            "after `pip install -r requirements-train.txt` there"
        ) from exc
    return comfy


class ComfySampling(DiscreteEpsSampling):
    """A checkpoint's discrete schedule, taken from ComfyUI's ``model_sampling`` (sigmas as ComfyUI has them).

    Subclasses the project's sampling helper for its timestep/sigma lookups; ``prediction`` says
    what the model outputs (eps or v), which the helper itself assumes to be eps.
    """

    def __init__(self, sigmas: torch.Tensor, prediction: str):
        self.sigmas = sigmas.detach().float().cpu()
        self.log_sigmas = self.sigmas.log()
        self.prediction = prediction


def prediction_of(model_sampling) -> str:
    """"eps" or "v" for a discrete-time SD-style schedule; a clear refusal for anything else."""
    import comfy.model_sampling as ms

    kind = type(model_sampling)
    discrete = isinstance(model_sampling, ms.ModelSamplingDiscrete) and kind.timestep is ms.ModelSamplingDiscrete.timestep
    sigma_data = float(getattr(model_sampling, "sigma_data", 1.0))
    if discrete and sigma_data == 1.0 and kind.calculate_input is ms.EPS.calculate_input:
        if kind.calculate_denoised is ms.V_PREDICTION.calculate_denoised:
            return "v"
        if kind.calculate_denoised is ms.EPS.calculate_denoised:
            return "eps"
    raise ValueError(
        f"this checkpoint samples with {kind.__name__}; Dot training supports discrete-time eps and v-prediction "
        "models (SD1.x, SD2.x, SDXL and their fine-tunes). Use a checkpoint of one of those families"
    )


def checkpoint_id(path: Path) -> str:
    """Cache key of a checkpoint file: its name, size and modification time (hashing GBs would cost minutes)."""
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class TensorCache:
    """A safetensors file of named tensors, read once and rewritten (atomically) when entries were added."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        self.path = path
        self.tensors = load_file(str(path)) if path.is_file() else {}
        self.added = 0

    def get(self, key: str) -> Optional[torch.Tensor]:
        return self.tensors.get(key)

    def put(self, key: str, value: torch.Tensor):
        self.tensors[key] = value.detach().to("cpu").contiguous()
        self.added += 1

    def save(self):
        if not self.added:
            return
        from morse_engine.adapter_file import save_file_atomic

        save_file_atomic(self.tensors, self.path, {"format": "morse-train-cache"})


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts; write one prompt per line (lines starting with # are skipped)")
    return prompts


def find_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs; the caption is ``name.txt`` next to ``name.png`` (empty when there is none)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder; give a folder of images with name.txt captions")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the training images there")
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        pairs.append((image, caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""))
    return pairs


def load_image(path: Path, size: int) -> torch.Tensor:
    """[1, size, size, 3] in 0..1 (ComfyUI's IMAGE layout): shorter side scaled to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.LANCZOS)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return (data.float() / 255.0)[None]


def _common_length(contexts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contexts of different token lengths (prompts over 77 tokens) repeated to their lcm, as ComfyUI's CONDCrossAttn does."""
    lengths = {c.shape[1] for c in contexts}
    if len(lengths) == 1:
        return contexts
    lcm = math.lcm(*lengths)
    return [c.repeat(1, lcm // c.shape[1], 1) for c in contexts]


@dataclass
class TrajectorySettings:
    """How data-free anchors are made: ComfyUI sampler and scheduler, step counts and CFG drawn per batch."""

    sampler: str = "euler"
    scheduler: str = "normal"
    steps: tuple[int, int] = (20, 30)
    cfg: tuple[float, float] = (4.0, 8.0)


class ComfyCheckpoint:
    """A checkpoint loaded the way CheckpointLoaderSimple loads it, and what Dot training takes from it."""

    def __init__(self, path: Path, comfyui: Optional[str] = None, device: str = "cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--checkpoint {self.path} does not exist; give the path of a checkpoint file ComfyUI can load")
        self.comfy_path = find_comfyui(comfyui)
        comfy = import_comfy(self.comfy_path, device)
        import folder_paths

        self.comfy = comfy
        self.device = torch.device(device)
        try:
            patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(self.path), output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"),
                # Dot training keeps the frozen weights in float32: LoRA gradients in fp16 weights underflow
                model_options={"dtype": torch.float32},
            )
        except Exception as exc:  # ComfyUI says RuntimeError for an undetected model, other errors for broken files
            raise ValueError(
                f"ComfyUI cannot load --checkpoint {self.path} ({str(exc).strip().splitlines()[0]}); give a checkpoint that "
                "ComfyUI's Load Checkpoint node loads (a full SD1.x, SD2.x or SDXL checkpoint with its text encoder)"
            ) from exc
        if patcher is None:
            raise ValueError(f"ComfyUI found no diffusion model in --checkpoint {self.path}; give a full checkpoint")
        self.patcher, self.clip, self.vae = patcher, clip, vae
        self.model = patcher.model  # comfy.model_base.BaseModel
        self.unet = self.model.diffusion_model.to(self.device).float().eval().requires_grad_(False)
        self.prediction = prediction_of(self.model.model_sampling)
        self.family = type(self.model.model_config).__name__  # ComfyUI's detected family: SD15, SD20, SDXL, ...
        self.latent_format = self.model.latent_format
        self.latent_channels = int(self.latent_format.latent_channels)
        if getattr(self.model, "concat_keys", ()) or int(getattr(self.unet, "in_channels", self.latent_channels)) != self.latent_channels:
            raise ValueError(
                f"{self.path.name} is an inpainting or image-conditioned model (its UNet takes {self.unet.in_channels} "
                f"channels, the latent has {self.latent_channels}); Dot training supports text-to-image checkpoints"
            )
        self.id = checkpoint_id(self.path)

    def default_resolution(self) -> int:
        """The resolution the family was trained at (SDXL 1024, SD2.x-v 768, SD1.x 512)."""
        import comfy.model_base

        if isinstance(self.model, comfy.model_base.SDXL):
            return 1024
        return 768 if self.prediction == "v" else 512

    def encode_text(self, prompts: list[str], cache: TensorCache) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """CLIPTextEncode's (cond, pooled_output) for each prompt, from the cache where present."""
        if self.clip is None:
            raise ValueError(f"{self.path.name} holds no text encoder; use a full checkpoint (UNet, CLIP and VAE in one file)")
        conds, pooled = [], []
        for text in prompts:
            k = _key(text)
            cond = cache.get(f"cond.{k}")
            if cond is None:
                tokens = self.clip.tokenize(text)
                out = self.clip.encode_from_tokens_scheduled(tokens, show_pbar=False)
                cond, extra = out[0][0], out[0][1]
                cache.put(f"cond.{k}", cond.float())
                if extra.get("pooled_output") is not None:
                    cache.put(f"pooled.{k}", extra["pooled_output"].float())
                cond = cond.float()
            conds.append(cond.float())
            p = cache.get(f"pooled.{k}")
            pooled.append(None if p is None else p.float())
        return conds, pooled

    def model_conds(self, cond: torch.Tensor, pooled: Optional[torch.Tensor], latent_shape, negative: bool) -> tuple[torch.Tensor, dict]:
        """(context, extra kwargs) of one prompt as the diffusion model gets them at sampling time."""
        import comfy.conds

        c, h, w = latent_shape
        params = {
            "cross_attn": cond, "device": torch.device("cpu"), "noise": torch.zeros(1, c, h, w),
            "width": w * 8, "height": h * 8, "prompt_type": "negative" if negative else "positive",
        }
        if pooled is not None:
            params["pooled_output"] = pooled
        out = self.model.extra_conds(**params)
        context, kwargs = None, {}
        for name, value in out.items():
            if name == "c_crossattn":
                context = value.cond
            elif name == "c_concat" or isinstance(value, comfy.conds.CONDNoiseShape):
                raise ValueError(
                    f"{self.path.name} is an inpainting or image-conditioned model (it needs '{name}' at every step); "
                    "Dot training supports text-to-image checkpoints"
                )
            elif isinstance(value, comfy.conds.CONDRegular):
                kwargs[name] = value.cond
            else:
                raise ValueError(f"{self.path.name} needs the conditioning '{name}' ({type(value).__name__}), which Dot training does not build")
        if context is None:
            raise ValueError(f"{self.path.name} takes no cross-attention text context; Dot training supports text-conditioned UNets")
        return context.float(), {k: v.float() for k, v in kwargs.items()}

    def encode_images(self, images: list[Path], resolution: int, cache: TensorCache) -> torch.Tensor:
        """VAE latents (ComfyUI's VAEEncode output) of the images, from the cache where present."""
        if self.vae is None or getattr(self.vae, "first_stage_model", None) is None:
            raise ValueError(f"{self.path.name} holds no VAE; use a checkpoint with its VAE to train from --images")
        latents = []
        for image in images:
            st = image.stat()
            k = _key(f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}|{resolution}")
            latent = cache.get(f"latent.{k}")
            if latent is None:
                latent = self.vae.encode(load_image(image, resolution)).float()
                cache.put(f"latent.{k}", latent)
            latents.append(latent.float())
        return torch.cat(latents)


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
    contexts = torch.cat(_common_length(contexts)).to(ck.device)
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
        sampling=ComfySampling(ck.model.model_sampling.sigmas, ck.prediction),
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
            return u + (c - u) * scale  # ComfyUI's cfg_function on denoised

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


def default_dot_dir(comfyui: Optional[str] = None) -> Path:
    """ComfyUI's models/dot_models, where Load Dot Model lists Dots (the pack's own folder if no ComfyUI is found;
    the setup then stops with the message that says how to point at ComfyUI)."""
    try:
        return find_comfyui(comfyui) / "models" / "dot_models"
    except ComfyUINotFound:
        return PACK_DIR / "models" / "dot_models"
