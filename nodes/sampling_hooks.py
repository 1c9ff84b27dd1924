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
import comfy.model_sampling
import comfy.patcher_extension
import torch

from ..morse_engine import BudgetSchedule, DotFile, EveryK, MorseError, MorseRouter, fingerprint_state_dict, make_fill, needs_blocks
from ..morse_engine.prior_noise import PriorNoise
from ..morse_engine.schedules import Pattern
from ..morse_engine.speedup_knob import OFF, KnobChoice, choose, model_kind
from .backbone_call import BackboneCall

KEY = "morse"  # wrapper key and transformer_options entry of the settings
RUN_KEY = "morse_run"  # transformer_options entry of the live run
REACHED_KEY = "morse_reached"  # set in a call's own transformer_options when its DIFFUSION_MODEL wrapper ran
# Diffusion-model classes whose forward does not pass its calls through DIFFUSION_MODEL wrappers (in ComfyUI 0.8.0
# SD3's MMDiT, PixArt, HunyuanDiT, Mochi, ...): Morse routes their calls one level up, at apply_model, where every
# family has the same signature and the output is the denoised estimate. Learned at a class's first call.
ROUTED_AT_APPLY_MODEL: set = set()
log = logging.getLogger("morse")


class MorseSettings:
    """What the user chose for a model. Shared, read-only, by the model's clones."""

    def __init__(self, schedule=None, dot: Optional[DotFile] = None, fill: str = "reuse", allow_other_weights=False,
                 prior_noise: float = 0.0, speedup: str = OFF, sampler: Optional[str] = None):
        self.schedule = schedule if schedule is not None else EveryK(2)
        self.dot = dot
        self.fill = fill
        self.allow_other_weights = allow_other_weights
        # the speedup knob: a request ("2x", "quality first"), resolved at each run for its step count and the
        # model; it replaces the schedule (and, without a Dot, the fill). ``sampler``: where the node knows it
        self.speedup, self.sampler = speedup or OFF, sampler
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

    def knob_choice(self, model_patcher, steps: int) -> Optional[KnobChoice]:
        """The speedup knob's choice for a run of ``steps`` steps on this model (None: the knob is off); a request
        the table cannot meet is refused in one sentence, before sampling."""
        if self.speedup == OFF:
            return None
        model_sampling = model_patcher.get_model_object("model_sampling")
        try:
            kind = model_kind(hasattr(model_patcher.model.diffusion_model, "input_blocks"),
                              isinstance(model_sampling, comfy.model_sampling.CONST))
            return choose(self.speedup, steps, kind, self.sampler or "euler",
                          dot_n=self.dot.measured_n if self.dot is not None else None)
        except MorseError as exc:
            raise ValueError(f"Morse: {exc}") from None

    def router_for(self, model_patcher, device, dtype, steps: Optional[int] = None) -> MorseRouter:
        backbone = model_patcher.model.diffusion_model
        dot = None if self.dot is None else self._dot_for(model_patcher, backbone, device, dtype)
        name = self.fill if dot is None else "dot"
        spec = self.spec
        choice = self.knob_choice(model_patcher, steps) if steps else None
        if choice is not None:
            spec, name = Pattern(choice.pattern), ("dot" if dot is not None else choice.fill)
        try:
            blocks = backbone_blocks(backbone) if needs_blocks(name, dot) else None  # the fill reruns its blocks
            filler = make_fill(name, blocks=blocks, dot=dot, backbone=backbone)
        except (AttributeError, MorseError) as exc:
            raise ValueError(f"Morse: the fill '{name}' needs an SD1.x, SD2.x or SDXL UNet or a DiT whose blocks "
                             f"ComfyUI's block-replace patches reach; this model has another layout ({exc}). "
                             "Pick reuse or extrapolate") from None
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        # sigma -> timestep, so encoder propagation can decode the steps up to the next key step in one call
        model_sampling = model_patcher.get_model_object("model_sampling")
        timestep_of = model_sampling.timestep if decodes_spans_at_once(device) else None
        # an adaptive schedule's window, placed on the model's noise range as ComfyUI's EasyCache places its own
        router = MorseRouter(spec, filler, measure=True, sync=sync, timestep_of=timestep_of,
                             percent_to_sigma=model_sampling.percent_to_sigma)
        router.knob = choice  # what the speedup knob chose for this run, for its log line (None: off)
        return router

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


def backbone_blocks(backbone):
    """The host's description of ``backbone``'s blocks for a block fill: a UNet's, else a DiT's."""
    if hasattr(backbone, "input_blocks"):
        from .unet_blocks import ComfyUNetBlocks

        return ComfyUNetBlocks(backbone)
    from ..morse_engine.block_replace import PatchedDiTBlocks

    return PatchedDiTBlocks(backbone)


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
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, KEY)
    patched.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, KEY)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, apply_model_wrapper)
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
    model_sampling = guider.model_patcher.get_model_object("model_sampling")  # as ModelSamplingFlux & co. patch it
    flow = isinstance(model_sampling, comfy.model_sampling.CONST)
    denoise = settings.prior_noise.denoiser(guider, sigmas.tolist(), model_sampling.timestep, flow=flow)
    return executor(_InjectedGuider(guider, denoise), sigmas, *args, **kwargs)


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    settings = original.get("transformer_options", {}).get(KEY)
    if settings is None:
        return executor(*args, **kwargs)
    sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
    noise = kwargs["noise"] if "noise" in kwargs else args[0]
    latent_shapes = kwargs.get("latent_shapes") if "latent_shapes" in kwargs else (args[8] if len(args) > 8 else None)
    if latent_shapes is not None and len(latent_shapes) > 1:
        raise ValueError("Morse: this model samples several latents packed into one (audio and video together, as "
                         "LTX-2's audio-video model does); the pack serves one latent a run: sample it without Morse")
    patcher = guider.model_patcher
    router = settings.router_for(patcher, patcher.load_device, patcher.model.get_dtype(), steps=len(sigmas) - 1)
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
            chose = f"; speedup {router.knob.describe()}" if router.knob is not None else ""
            log.info("%s (batch %d)%s", summary.log_line(n), noise.shape[0], chose)


def apply_model_wrapper(executor, *args, **kwargs):
    """Routes the call here only for a class that does not pass DIFFUSION_MODEL wrappers; otherwise marks the call
    so that its DIFFUSION_MODEL wrapper says it ran, and learns the class's level at its first call."""
    call = BackboneCall(executor, args, kwargs)  # (x, sigma, c_concat, c_crossattn, control, transformer_options)
    options = call.options
    run, sigmas = options.get(RUN_KEY), options.get("sigmas")
    if run is None or sigmas is None:
        return call.passed_on()
    model_class = type(executor.class_obj.diffusion_model)
    if model_class in ROUTED_AT_APPLY_MODEL:
        return _route(run, call, call.dash, float(sigmas.reshape(-1)[0]), fill_backbone=None)
    summary = run.summary
    first_call = not (summary.dash_calls or summary.dot_calls or summary.fallback_calls)
    options[REACHED_KEY] = False  # the call's own copy of the options (samplers copies them per call)
    out = call.passed_on()
    # learnt at a run's first call only: later, another pack's DIFFUSION_MODEL wrapper outside Morse's may serve a
    # call from its cache without passing it on
    if options.get(REACHED_KEY) or not first_call:
        return out
    # the first call of a class that bypasses DIFFUSION_MODEL wrappers: from now on it is routed here; this call
    # was a full model call, handed to the router as its Dash call (so it counts and anchors the next fill)
    ROUTED_AT_APPLY_MODEL.add(model_class)
    log.info("Morse: %s does not pass ComfyUI's DIFFUSION_MODEL wrappers; its calls are routed at apply_model "
             "(fills work on the denoised estimate)", model_class.__name__)
    return _route(run, call, lambda *_a, **_k: out, float(sigmas.reshape(-1)[0]), fill_backbone=None)


def diffusion_model_wrapper(executor, *args, **kwargs):
    call = BackboneCall(executor, args, kwargs)  # any family's signature: read by name, passed on as it came
    options = call.options
    run = options.get(RUN_KEY)
    sigmas = options.get("sigmas")
    if run is None or sigmas is None:
        return call.passed_on()
    options[REACHED_KEY] = True
    return _route(run, call, call.dash, float(sigmas.reshape(-1)[0]),
                  fill_backbone=call.backbone_itself if hasattr(executor, "original") else None)


def _route(run, call: BackboneCall, dash, sigma: float, fill_backbone):
    return run(dash, call.x, call.timestep, sigma, keys=call.options.get("uuids"), fill_backbone=fill_backbone,
               **call.inputs())
