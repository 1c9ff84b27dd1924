"""Morse inside ComfyUI's sampling, through the core wrapper mechanism.

Two wrappers on a cloned ModelPatcher (never ``forward`` replacement, never the single
``model_function_wrapper`` slot):

* OUTER_SAMPLE opens a fresh Morse run for each sampling call, with the run's sigmas, and
  closes it in ``finally`` (also on interrupt or error), then logs one line;
* DIFFUSION_MODEL hands every backbone call to that run, which calls Dash (the rest of the
  chain) or the Dot. Calls are in the model's native prediction space on the scaled input.
"""
from __future__ import annotations

import logging
from typing import Optional

import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..morse_engine import (
    BudgetSchedule,
    DotAdapter,
    DotFiller,
    EveryK,
    MorseRouter,
    fingerprint_state_dict,
)
from ..morse_engine.errors import MorseError
from ..morse_engine.feature_fills import FEATURE_FILLS
from ..morse_engine.fillers import TRAINING_FREE_FILLS

KEY = "morse"  # wrapper key and transformer_options entry of the settings
# what serves a non-Dash step without a Dot: free fills, and fills that rerun some of the checkpoint's own blocks
FILLS_WITHOUT_DOT = [*TRAINING_FREE_FILLS, *FEATURE_FILLS]
RUN_KEY = "morse_run"  # transformer_options entry of the live run
log = logging.getLogger("morse")


class MorseSettings:
    """What the user chose for a model. Shared, read-only, by the model's clones."""

    def __init__(self, schedule=None, dot: Optional[DotAdapter] = None, fill: str = "reuse", allow_other_weights=False):
        self.schedule = schedule if schedule is not None else EveryK(2)
        self.dot = dot
        self.fill = fill
        self.allow_other_weights = allow_other_weights

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the settings (and the Dot) are shared.
        return self

    @property
    def spec(self):
        return self.schedule.spec if isinstance(self.schedule, BudgetSchedule) else self.schedule

    def router_for(self, model_patcher, device, dtype) -> MorseRouter:
        backbone = model_patcher.model.diffusion_model
        if self.dot is None and self.fill in FEATURE_FILLS:
            from .unet_blocks import ComfyUNetBlocks

            try:
                filler = FEATURE_FILLS[self.fill](ComfyUNetBlocks(backbone))
            except (AttributeError, MorseError) as exc:
                raise ValueError(f"Morse: the fill '{self.fill}' needs an SD1.x, SD2.x or SDXL UNet; this model has "
                                 f"another layout ({exc}). Pick reuse or extrapolate") from None
        elif self.dot is None:
            filler = TRAINING_FREE_FILLS[self.fill]()
        else:
            dot = self.dot.dot_for(
                backbone,
                device=device,
                dtype=dtype if dtype in (torch.float16, torch.bfloat16) and device.type != "cpu" else None,
                fingerprint=original_fingerprint(model_patcher),
                allow_other_weights=self.allow_other_weights,
            )
            filler = DotFiller(dot, backbone)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        # sigma -> timestep, so encoder propagation can decode the steps up to the next key step in one call
        timestep_of = model_patcher.model.model_sampling.timestep
        return MorseRouter(self.spec, filler, measure=True, sync=sync, timestep_of=timestep_of)


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
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    return patched


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

    return run(
        dash,
        x,
        timesteps,
        float(sigmas.reshape(-1)[0]),
        keys=transformer_options.get("uuids"),
        context=context,
        y=y,
        control=control,
        transformer_options=transformer_options,
        **kwargs,
    )
