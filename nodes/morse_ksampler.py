"""Morse KSampler: KSampler with your checkpoint as Dash and a Dot for the other steps."""
import logging

import comfy.samplers
import nodes as comfy_nodes
from comfy_api.latest import io, ui

from ..morse_engine import AutoPattern, BudgetSchedule, MorseError
from ..morse_engine.fillers import TRAINING_FREE_FILLS
from ..morse_engine.fill_by_name import FILLS_WITHOUT_DOT
from ..morse_engine.schedules import FREE_FILL_N
from ..morse_engine.speedup_knob import CHOICES as KNOB_CHOICES
from ..morse_engine.speedup_knob import OFF as KNOB_OFF
from .sampling_hooks import MorseSettings, apply_morse
from .types import CATEGORY, DotModelType, ScheduleType

log = logging.getLogger("morse")


def fill_speed(dot, fill_without_dot):
    """The N an LSD budget is planned with: the Dot's measured one; a training-free fill's ~free; None for a fill
    that reruns UNet blocks (its N depends on the model and resolution: the schedule's n_speed must give it)."""
    if dot is not None:
        return dot.measured_n
    return FREE_FILL_N if (fill_without_dot or "reuse") in TRAINING_FREE_FILLS else None


def morse_inputs():
    return [
        DotModelType.Input("dot", optional=True, tooltip=(
            "The Dot adapter for this checkpoint (Load Dot Model). Without one, non-Dash steps reuse or "
            "extrapolate the last Dash estimate (training-free).")),
        ScheduleType.Input("schedule", optional=True, tooltip="Which steps run Dash (Dash/Dot Schedule). Default: every 2nd step."),
        io.Combo.Input("fill_without_dot", options=list(FILLS_WITHOUT_DOT), default="reuse", optional=True, tooltip=(
            "Only without a Dot: reuse the last Dash estimate, extrapolate from the last two (both free), rerun the "
            "outer 1 or 2 UNet blocks per side and inherit the deeper features from the last Dash step (inherit_k1, "
            "inherit_k2: A-SDM / DeepCache), the same with the deeper features extrapolated from the last two Dash "
            "steps (forecast_k1, forecast_k2: first-order feature forecasting) or along the parabola through the last three "
            "(forecast2_k2), or run the decoder on the last Dash step's encoder features (propagate: "
            "Faster Diffusion). SD1.x/SD2.x/SDXL UNets; a ControlNet step runs Dash.")),
        io.Boolean.Input("allow_other_weights", default=False, optional=True, tooltip=(
            "Use a Dot trained on other weights of the same architecture (a fine-tune or merge). Quality may drop.")),
        io.Float.Input("prior_noise", default=0.0, min=0.0, max=0.1, step=0.001, optional=True, tooltip=(
            "Faster Diffusion's prior noise injection: add this times the initial latent before each step of the "
            "second half (the paper: 0.003 with encoder propagation, for texture). 0 = off. Exact for euler/ddim.")),
        io.Combo.Input("speedup", options=list(KNOB_CHOICES), default=KNOB_OFF, optional=True, tooltip=(
            "Ask for a speedup instead of choosing a schedule and fill: the pack picks them for your model and sampler "
            "from the tables it measured (the run spends at most 1/speedup of plain sampling's steps), or 'quality "
            "first': the choice the tables expect closest to plain sampling. Replaces the schedule (and, without a "
            "Dot, the fill). A speedup it cannot give at your step count is refused with the most it can give.")),
    ]


class MorseKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MorseKSampler",
            display_name="Morse KSampler",
            category=CATEGORY,
            description="KSampler with Morse dual sampling: your checkpoint (Dash) runs on the scheduled steps, "
            "the Dot fills the others. With every step on Dash it gives exactly KSampler's result.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model (Dash). It is not changed; Morse works on a clone."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Sampling steps (Dash + Dot). An lsd_budget schedule replaces this with its plan."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The noise schedule."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent to denoise (lower keeps more of the input, for img2img)."),
                *morse_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                dot=None, schedule=None, fill_without_dot="reuse", allow_other_weights=False, prior_noise=0.0,
                speedup=KNOB_OFF) -> io.NodeOutput:
        if denoise <= 0:
            raise ValueError("Morse KSampler: denoise is 0, so there is nothing to sample; set denoise above 0 (1.0 for txt2img)")
        speedup = speedup or KNOB_OFF
        if speedup != KNOB_OFF:  # the knob's choice, shown on the node; the run makes the same one for its log
            settings = MorseSettings(schedule, dot, fill_without_dot or "reuse", bool(allow_other_weights),
                                     prior_noise or 0.0, speedup=speedup, sampler=sampler_name)
            choice = settings.knob_choice(model, steps)
            log.info("Morse: speedup %s", choice.describe())
            (out,) = comfy_nodes.common_ksampler(apply_morse(model, settings), seed, steps, cfg, sampler_name, scheduler,
                                                 positive, negative, latent_image, denoise=denoise)
            return io.NodeOutput(out, ui=ui.PreviewText(f"Morse chose {choice.describe()}"))
        if isinstance(schedule, BudgetSchedule):
            try:
                plan = schedule.plan(fill_speed(dot, fill_without_dot), sampler_name,
                                     dot.pattern_table if dot is not None else None)
            except MorseError as exc:
                raise ValueError(f"Morse KSampler: {exc}") from None
            why = "" if plan.choice is None else f"; pattern {plan.choice.describe()}"
            log.info("Morse: LSD budget %.2f plans %d steps (%s) instead of the steps input %d%s",
                     schedule.budget_lsd, plan.steps, plan.schedule.pattern(), steps, why)
            steps = plan.steps
            if plan.choice is not None:
                schedule = plan.spec  # the chosen pattern; the router resolves it for the planned steps
        settings = MorseSettings(schedule, dot, fill_without_dot or "reuse", bool(allow_other_weights), prior_noise or 0.0)
        patched = apply_morse(model, settings)
        (out,) = comfy_nodes.common_ksampler(
            patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise
        )
        return io.NodeOutput(out)


class MorseModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MorseModelPatch",
            display_name="Morse Model Patch",
            category=CATEGORY,
            description="Adds Morse to a model for custom sampling (CFGGuider + SamplerCustomAdvanced, custom sigmas "
            "such as Align Your Steps). The step count comes from the sigmas; an lsd_budget schedule uses only its pattern "
            "('auto' there: the rule's choice for the budget, since the sampler is not known yet).",
            inputs=[io.Model.Input("model", tooltip="The checkpoint's model (Dash). It is not changed; a clone is patched."),
                    *morse_inputs()],
            outputs=[io.Model.Output(tooltip="The model with Morse, for a guider or any sampler node.")],
        )

    @classmethod
    def execute(cls, model, dot=None, schedule=None, fill_without_dot="reuse", allow_other_weights=False,
                prior_noise=0.0, speedup=KNOB_OFF) -> io.NodeOutput:
        speedup = speedup or KNOB_OFF
        if speedup != KNOB_OFF:  # chosen at each run, for its step count (the sigmas decide it); euler's table
            settings = MorseSettings(schedule, dot, fill_without_dot or "reuse", bool(allow_other_weights),
                                     prior_noise or 0.0, speedup=speedup)
            return io.NodeOutput(apply_morse(model, settings), ui=ui.PreviewText(
                f"Morse: speedup {speedup}, chosen at each run for its step count from the measured tables "
                "(the sampler is not known here: euler's table)"))
        if isinstance(schedule, BudgetSchedule) and isinstance(schedule.spec, AutoPattern):
            # the sampler is picked later (SamplerCustomAdvanced), so the choice cannot use the Dot's
            # per-sampler table: the rule chooses, for the budget and N
            budget = schedule.budget_lsd
            try:
                schedule, choice = schedule.spec_for(fill_speed(dot, fill_without_dot))
            except MorseError as exc:
                raise ValueError(f"Morse Model Patch: {exc}") from None
            log.info("Morse: pattern %s for an LSD budget of %.2f; the step count comes from the sigmas",
                     choice.describe(), budget)
        settings = MorseSettings(schedule, dot, fill_without_dot or "reuse", bool(allow_other_weights), prior_noise or 0.0)
        return io.NodeOutput(apply_morse(model, settings))
