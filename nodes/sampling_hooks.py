"""Morse inside ComfyUI's sampling, through the core wrapper mechanism.

Two wrappers on a cloned ModelPatcher (never ``forward`` replacement, never the single
``model_function_wrapper`` slot):

* OUTER_SAMPLE opens a fresh Morse run for each sampling call, with the run's sigmas, and
  closes it in ``finally`` (also on interrupt or error), then logs one line;
* DIFFUSION_MODEL hands every backbone call to that run, which calls Dash (the rest of the
  chain) or the Dot. Calls are in the model's native prediction space on the scaled input.

and, only where the user asks for Faster Diffusion's prior noise injection, SAMPLER_SAMPLE, which hands the
sampler a denoiser with the injection (``morse_engine.prior_noise``) in place of the guider.
"""
from __future__ import annotations

import logging
from typing import Optional

import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..morse_engine import BudgetSchedule, DotFile, EveryK, MorseError, MorseRouter, fingerprint_state_dict, make_fill, needs_blocks
from ..morse_engine.prior_noise import PriorNoise

KEY = "morse"  # wrapper key and transformer_options entry of the settings
RUN_KEY = "morse_run"  # transformer_options entry of the live run
log = logging.getLogger("morse")


class MorseSettings:
    """What the user chose for a model. Shared, read-only, by the model's clones."""

    def __init__(self, schedule=None, dot: Optional[DotFile] = None, fill: str = "reuse", allow_other_weights=False,
                 prior_noise: float = 0.0):
        self.schedule = schedule if schedule is not None else EveryK(2)
        self.dot = dot
        self.fill = fill
        self.allow_other_weights = allow_other_weights
        try:
            self.prior_noise = PriorNoise(alpha=float(prior_noise)) if prior_noise else None
        except MorseError as exc:
            raise ValueError(f"Morse: prior_noise {exc}") from None

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the settings (and the Dot) are shared.
        return self

    @property
    def spec(self):
        return self.schedule.spec if isinstance(self.schedule, BudgetSchedule) else self.schedule

    def router_for(self, model_patcher, device, dtype) -> MorseRouter:
        backbone = model_patcher.model.diffusion_model
        dot = None if self.dot is None else self._dot_for(model_patcher, backbone, device, dtype)
        name = self.fill if dot is None else "dot"
        try:
            blocks = None
            if needs_blocks(name, dot):  # the fill reruns the checkpoint's own blocks
                from .unet_blocks import ComfyUNetBlocks

                blocks = ComfyUNetBlocks(backbone)
            filler = make_fill(name, blocks=blocks, dot=dot, backbone=backbone)
        except (AttributeError, MorseError) as exc:
            raise ValueError(f"Morse: the fill '{name}' needs an SD1.x, SD2.x or SDXL UNet; this model has another "
                             f"layout ({exc}). Pick reuse or extrapolate") from None
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        # sigma -> timestep, so encoder propagation can decode the steps up to the next key step in one call
        timestep_of = model_patcher.model.model_sampling.timestep if decodes_spans_at_once(device) else None
        return MorseRouter(self.spec, filler, measure=True, sync=sync, timestep_of=timestep_of)

    def _dot_for(self, model_patcher, backbone, device, dtype):
        try:
            return self.dot.dot_for(
                backbone,
                device=device,
                dtype=dtype if dtype in (torch.float16, torch.bfloat16) and device.type != "cpu" else None,
                fingerprint=original_fingerprint(model_patcher),
                allow_other_weights=self.allow_other_weights,
            )
        except MorseError as exc:
            # a plain ValueError: ComfyUI shows an exception's type with its module path, which for the pack's
            # own classes is a long custom_nodes path in front of the sentence that matters
            raise ValueError(f"Morse: {exc}") from None


def decodes_spans_at_once(device) -> bool:
    """Faster Diffusion's parallel decoding only on a GPU: on the CPU one batched decoder call costs more than the
    calls it replaces (SD1.5 at 512 px, 2 threads, 50 steps: 1.40x over plain sampling batched, 1.60x one step at
    a time; reports/2026-12-01-feature-fills.md)."""
    return device.type != "cpu"


def original_fingerprint(model_patcher):
    """Fingerprint of the checkpoint's own weights, before user LoRAs are patched in."""
    state = {}
    for key, value in model_patcher.model.diffusion_model.state_dict(keep_vars=True).items():
        backup = model_patcher.backup.get("diffusion_model." + key)
        state[key] = backup.weight if backup is not None else value
    return fingerprint_state_dict(state)


def apply_morse(model, settings: MorseSettings):
    """A clone of ``model`` that samples with Morse; ``model`` itself is left as it was."""
    patched = model.clone()
    patched.model_options["transformer_options"][KEY] = settings
    WrappersMP = comfy.patcher_extension.WrappersMP
    patched.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    patched.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
    patched.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, KEY)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    if settings.prior_noise is not None:
        patched.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, KEY, prior_noise_wrapper)
    return patched


class _InjectedGuider:
    """The guider as the sampler sees it, with the prior noise injected in each call; all else is the guider's."""

    def __init__(self, guider, denoise):
        self._guider, self._denoise = guider, denoise

    def __call__(self, x, sigma, **kwargs):
        return self._denoise(x, sigma, **kwargs)

    def __getattr__(self, name):
        return getattr(self._guider, name)


def prior_noise_wrapper(executor, guider, sigmas, *args, **kwargs):
    settings = guider.model_options.get("transformer_options", {}).get(KEY)
    if settings is None or settings.prior_noise is None:
        return executor(guider, sigmas, *args, **kwargs)
    timestep_of = guider.model_patcher.model.model_sampling.timestep
    denoise = settings.prior_noise.denoiser(guider, sigmas.tolist(), timestep_of)
    return executor(_InjectedGuider(guider, denoise), sigmas, *args, **kwargs)


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    settings = original.get("transformer_options", {}).get(KEY)
    if settings is None:
        return executor(*args, **kwargs)
    sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
    noise = kwargs["noise"] if "noise" in kwargs else args[0]
    patcher = guider.model_patcher
    router = settings.router_for(patcher, patcher.load_device, patcher.model.get_dtype())
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    try:
        with router.run(sigmas) as run:
            guider.model_options["transformer_options"][RUN_KEY] = run
            return executor(*args, **kwargs)
    finally:
        guider.model_options = original
        summary = router.last_summary
        if summary is not None and (summary.dash_calls or summary.dot_calls):
            n = settings.dot.measured_n if settings.dot is not None else None
            log.info("%s (batch %d)", summary.log_line(n), noise.shape[0])


def diffusion_model_wrapper(executor, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
    run = transformer_options.get(RUN_KEY)
    sigmas = transformer_options.get("sigmas")
    if run is None or sigmas is None:
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    def dash(x_, t_, context=None, y=None, control=None, transformer_options=None, **kw):
        return executor(x_, t_, context, y, control, transformer_options, **kw)

    def unet_itself(x_, t_, context=None, y=None, control=None, transformer_options=None, **kw):
        # the Dot's inner call at 1/2^m resolution is part of a fill, not a sampling step: it goes to the UNet
        # itself, past the other DIFFUSION_MODEL wrappers (EasyCache and the like track full-size steps)
        return executor.original(x_, t_, context, y, control, transformer_options, **kw)

    return run(
        dash,
        x,
        timesteps,
        float(sigmas.reshape(-1)[0]),
        keys=transformer_options.get("uuids"),
        context=context,
        fill_backbone=unet_itself if hasattr(executor, "original") else None,
        y=y,
        control=control,
        transformer_options=transformer_options,
        **kwargs,
    )
