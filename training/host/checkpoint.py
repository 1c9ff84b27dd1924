"""A user's checkpoint loaded by ComfyUI's own loader, and what Dot training takes from it."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from morse_engine.parameterization import DiscreteSchedule, FlowSchedule

from .comfyui import find_comfyui, import_comfy
from .data import TensorCache, cache_key, load_image
from .rope_gradients import register_rope_gradients


def prediction_of(model_sampling) -> str:
    """"eps" or "v" for a discrete-time SD-style schedule, "flow" for ComfyUI's flow sampling (CONST with
    ModelSamplingDiscreteFlow or ModelSamplingFlux: SD3, Flux, Chroma, Qwen-Image, Wan, ...); a clear refusal else."""
    import comfy.model_sampling as ms

    kind = type(model_sampling)
    discrete = isinstance(model_sampling, ms.ModelSamplingDiscrete) and kind.timestep is ms.ModelSamplingDiscrete.timestep
    sigma_data = float(getattr(model_sampling, "sigma_data", 1.0))
    if discrete and sigma_data == 1.0 and kind.calculate_input is ms.EPS.calculate_input:
        if kind.calculate_denoised is ms.V_PREDICTION.calculate_denoised:
            return "v"
        if kind.calculate_denoised is ms.EPS.calculate_denoised:
            return "eps"
    flow = (ms.ModelSamplingDiscreteFlow, ms.ModelSamplingFlux)
    if isinstance(model_sampling, flow) and kind.calculate_denoised is ms.CONST.calculate_denoised and \
            kind.calculate_input is ms.CONST.calculate_input and kind.sigma in (f.sigma for f in flow):
        return "flow"
    raise ValueError(
        f"this checkpoint samples with {kind.__name__}; Dot training supports discrete-time eps and v-prediction "
        "models (SD1.x, SD2.x, SDXL and their fine-tunes) and flow models (SD3, Flux, Chroma, Qwen-Image, Wan and the "
        "other CONST families). Use a checkpoint of one of those families"
    )


def schedule_of(model_sampling, prediction: str):
    """The engine's schedule of ComfyUI's ``model_sampling``: the discrete sigmas as ComfyUI has them, or the flow
    schedule's shift and multiplier, checked against ComfyUI's own sigmas (a mismatch would train the Dot on
    another noise schedule than sampling uses)."""
    import comfy.model_sampling as ms

    if prediction != "flow":
        return DiscreteSchedule(model_sampling.sigmas, prediction)
    sigmas = model_sampling.sigmas.float().cpu()
    if isinstance(model_sampling, ms.ModelSamplingFlux):  # its shift is Flux's mu; timestep = sigma
        schedule = FlowSchedule(math.exp(float(model_sampling.shift)), 1.0, len(sigmas))
    else:
        schedule = FlowSchedule(float(model_sampling.shift), float(model_sampling.multiplier), len(sigmas))
    if not torch.allclose(schedule.sigmas, sigmas, rtol=1e-4, atol=1e-6):
        raise ValueError(f"{type(model_sampling).__name__}'s sigmas are not the flow schedule of its shift "
                         f"{float(model_sampling.shift):g}; Dot training cannot mirror this model's sampling")
    return schedule


def checkpoint_id(path: Path, text_encoders=()) -> str:
    """Cache key of a checkpoint file (and the text-encoder files it is read with): names, sizes and modification
    times (hashing GBs would cost minutes)."""
    stamps = []
    for p in (path, *text_encoders):
        st = p.stat()
        stamps.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    digest = hashlib.sha256("||".join(stamps).encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


# CLIPLoader's "type" of each family's text encoders (ComfyUI 0.8.0's model_base classes; subclasses first)
FAMILY_CLIP_TYPES = (("Chroma", "chroma"), ("Flux2", "flux2"), ("Flux", "flux"), ("SD3", "sd3"), ("WAN21", "wan"),
                     ("QwenImage", "qwen_image"), ("HiDream", "hidream"), ("Lumina2", "lumina2"),
                     ("HunyuanVideo", "hunyuan_video"), ("LTXV", "ltxv"), ("SDXL", "stable_diffusion"))


def family_clip_type(model) -> Optional[str]:
    """The text-encoder type CLIPLoader takes for ``model`` (a comfy.model_base.BaseModel), None where unknown."""
    import comfy.model_base

    for name, kind in FAMILY_CLIP_TYPES:
        cls = getattr(comfy.model_base, name, None)
        if cls is not None and isinstance(model, cls):
            return kind
    return None


def common_length(contexts: list[torch.Tensor]) -> list[torch.Tensor]:
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

    def __init__(self, path: Path, comfyui: Optional[str] = None, device: str = "cpu", text_encoders=(),
                 clip_type: Optional[str] = None, vae: Optional[Path] = None):
        """``text_encoders`` given: ``path`` is a diffusion model alone, as UNETLoader reads it, and its text
        encoders are read as CLIPLoader / DualCLIPLoader read them (``clip_type``: their "type", by default the
        family's), its VAE (needed for --images only) as VAELoader reads ``vae``."""
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--checkpoint {self.path} does not exist; give the path of a checkpoint file ComfyUI can load")
        self.text_encoders = tuple(Path(p) for p in text_encoders)
        for flag, file in [("--text-encoder", p) for p in self.text_encoders] + ([("--vae", Path(vae))] if vae else []):
            if not file.is_file():
                raise FileNotFoundError(f"{flag} {file} does not exist; give the path of the file ComfyUI's loader reads")
        if vae and not self.text_encoders:
            raise ValueError("--vae goes with --text-encoder (a diffusion model alone); a full checkpoint has its VAE")
        self.comfy_path = find_comfyui(comfyui)
        comfy = import_comfy(self.comfy_path, device)
        register_rope_gradients()  # the rollout loss backpropagates through a DiT's later Dash calls
        import folder_paths

        self.comfy = comfy
        self.device = torch.device(device)
        # Dot training keeps the frozen weights in float32: LoRA gradients in fp16 weights underflow
        options = {"dtype": torch.float32}
        try:
            if self.text_encoders:
                patcher, clip, vae_model = comfy.sd.load_diffusion_model(str(self.path), model_options=options), None, None
            else:
                patcher, clip, vae_model, _ = comfy.sd.load_checkpoint_guess_config(
                    str(self.path), output_vae=True, output_clip=True,
                    embedding_directory=folder_paths.get_folder_paths("embeddings"), model_options=options)
        except Exception as exc:  # ComfyUI says RuntimeError for an undetected model, other errors for broken files
            what = ("a diffusion model that ComfyUI's Load Diffusion Model node loads" if self.text_encoders else
                    "a checkpoint that ComfyUI's Load Checkpoint node loads (a full SD1.x, SD2.x, SDXL, SD3, Flux or "
                    "other checkpoint with its text encoder; or a diffusion model with --text-encoder)")
            raise ValueError(f"ComfyUI cannot load --checkpoint {self.path} ({str(exc).strip().splitlines()[0]}); "
                             f"give {what}") from exc
        if patcher is None:
            raise ValueError(f"ComfyUI found no diffusion model in --checkpoint {self.path}; give a full checkpoint, or "
                             "a diffusion model with its --text-encoder files")
        if self.text_encoders:
            clip = self._load_text_encoders(comfy, patcher.model, clip_type, folder_paths.get_folder_paths("embeddings"))
            if vae:
                vae_model = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae)))
        self.patcher, self.clip, self.vae = patcher, clip, vae_model
        self.model = patcher.model  # comfy.model_base.BaseModel
        self.unet = self.model.diffusion_model.to(self.device).float().eval().requires_grad_(False)
        self.prediction = prediction_of(self.model.model_sampling)
        self.family = type(self.model.model_config).__name__  # ComfyUI's detected family: SD15, SD20, SDXL, ...
        self.latent_format = self.model.latent_format
        self.latent_channels = int(self.latent_format.latent_channels)
        # a DiT's in_channels counts patch pixels (Flux: 16 x 2 x 2); its image inputs show as c_concat (model_conds)
        unet_inputs = int(getattr(self.unet, "in_channels", self.latent_channels)) if hasattr(self.unet, "input_blocks") \
            else self.latent_channels
        if getattr(self.model, "concat_keys", ()) or unet_inputs != self.latent_channels:
            raise ValueError(
                f"{self.path.name} is an inpainting or image-conditioned model (its UNet takes {self.unet.in_channels} "
                f"channels, the latent has {self.latent_channels}); Dot training supports text-to-image checkpoints"
            )
        self.id = checkpoint_id(self.path, self.text_encoders)

    def _load_text_encoders(self, comfy, model, clip_type: Optional[str], embeddings):
        """The text encoders as CLIPLoader (one file) / DualCLIPLoader (two) load them, with the family's type."""
        names = {t.name.lower(): t for t in comfy.sd.CLIPType}
        kind = clip_type or family_clip_type(model)
        if kind is None or kind.lower() not in names:
            raise ValueError(f"--clip-type {kind!r}: give the type CLIPLoader would take for this "
                             f"{type(model).__name__} model, one of {sorted(names)}" if kind else
                             f"cannot tell which text-encoder type a {type(model).__name__} model takes; give "
                             f"--clip-type (the 'type' of ComfyUI's CLIPLoader, e.g. {', '.join(sorted(names)[:6])})")
        try:
            return comfy.sd.load_clip([str(p) for p in self.text_encoders], embedding_directory=embeddings,
                                      clip_type=names[kind.lower()])
        except Exception as exc:
            raise ValueError(f"ComfyUI cannot load --text-encoder {', '.join(map(str, self.text_encoders))} as "
                             f"{kind} text encoders ({str(exc).strip().splitlines()[0]}); give the files CLIPLoader "
                             "loads for this model") from exc

    @property
    def video(self) -> bool:
        """A video family (Wan, HunyuanVideo, LTXV, ...): its latents have a frame axis."""
        return int(getattr(self.latent_format, "latent_dimensions", 2)) == 3

    @property
    def guidance_distilled(self) -> bool:
        """Flux dev / schnell / Kontext / Flux 2: sampled at CFG 1 (dev's guidance input stands for CFG), as
        ComfyUI's Flux templates do; Chroma, also a Flux class, samples with real CFG."""
        import comfy.model_base

        return isinstance(self.model, comfy.model_base.Flux) and not isinstance(self.model, comfy.model_base.Chroma)

    def default_resolution(self) -> int:
        """The resolution the family was trained at (SDXL and the flow image models 1024, SD2.x-v 768, SD1.x 512; a
        video family 640 square, the pixel count of Wan's 832x480)."""
        import comfy.model_base

        if self.prediction == "flow":
            return 640 if self.video else 1024
        if isinstance(self.model, comfy.model_base.SDXL):
            return 1024
        return 768 if self.prediction == "v" else 512

    def downscale(self) -> int:
        """Pixels per latent cell along a side: the VAE's, 8 where the checkpoint holds none."""
        if self.vae is None or getattr(self.vae, "first_stage_model", None) is None:  # no VAE weights in the file
            return 8
        return int(self.vae.spacial_compression_encode())

    def latent_shape(self, resolution: int, frames: int) -> tuple:
        """(channels, [latent frames,] height, width) of an empty latent at ``resolution`` (and ``frames`` for video:
        the first frame alone, then one latent frame per 4, as ComfyUI's EmptyHunyuanLatentVideo / Wan latents)."""
        side = resolution // self.downscale()
        if not self.video:
            return (self.latent_channels, side, side)
        if frames < 1 or (frames - 1) % 4:
            raise ValueError(f"--frames {frames}: a video latent holds 1 + 4k frames; use e.g. {max(1, frames - (frames - 1) % 4)}")
        return (self.latent_channels, 1 + (frames - 1) // 4, side, side)

    def encode_text(self, prompts: list[str], cache: TensorCache) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """CLIPTextEncode's (cond, pooled_output) for each prompt, from the cache where present."""
        if self.clip is None:
            raise ValueError(f"{self.path.name} holds no text encoder; use a full checkpoint (model, text encoder and VAE "
                             "in one file) or give the text encoder files with --text-encoder")
        conds, pooled = [], []
        for text in prompts:
            k = cache_key(text)
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

        h, w = latent_shape[-2:]
        scale = self.downscale()
        params = {
            "cross_attn": cond, "device": torch.device("cpu"), "noise": torch.zeros(1, *latent_shape),
            "width": w * scale, "height": h * scale, "prompt_type": "negative" if negative else "positive",
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
            raise ValueError(f"{self.path.name} takes no cross-attention text context; Dot training supports text-conditioned models")
        return context.float(), {k: v.float() for k, v in kwargs.items()}

    def encode_images(self, images: list[Path], resolution: int, cache: TensorCache) -> torch.Tensor:
        """VAE latents (ComfyUI's VAEEncode output) of the images, from the cache where present."""
        if self.vae is None or getattr(self.vae, "first_stage_model", None) is None:
            raise ValueError(f"{self.path.name} holds no VAE; use a checkpoint with its VAE to train from --images")
        latents = []
        for image in images:
            st = image.stat()
            k = cache_key(f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}|{resolution}")
            latent = cache.get(f"latent.{k}")
            if latent is None:
                latent = self.vae.encode(load_image(image, resolution)).float()
                cache.put(f"latent.{k}", latent)
            latents.append(latent.float())
        return torch.cat(latents)
