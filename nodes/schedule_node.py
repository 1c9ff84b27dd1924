"""Dash/Dot Schedule: which steps run the full model (Dash) and which the Dot."""
from comfy_api.latest import io, ui

from ..morse_engine import AdaptiveDash, AutoPattern, BudgetSchedule, EveryK, FrontLoaded, KeySteps, MorseError, Pattern
from ..morse_engine.adaptive import MORSE_WINDOW
from .types import CATEGORY, ScheduleType

KINDS = ["every_k", "front_loaded", "faster_diffusion", "pattern", "lsd_budget", "adaptive"]
AUTO = "auto"  # the pattern text that lets the budget planner choose the fills per Dash


def pattern_spec(pattern: str, final_dash: int):
    text = pattern.strip()
    return AutoPattern(final_dash=final_dash) if text.lower() == AUTO else Pattern(text, final_dash=final_dash)


def build_schedule(kind, k, dash_fraction, pattern, final_dash, budget_lsd, n_speed, threshold=0.2):
    if kind == "adaptive":
        return AdaptiveDash(threshold=threshold, final_dash=final_dash, **MORSE_WINDOW)
    if kind == "every_k":
        return EveryK(k, final_dash=final_dash)
    if kind == "front_loaded":
        return FrontLoaded(dash_fraction, final_dash=final_dash)
    if kind == "faster_diffusion":
        return KeySteps(final_dash=final_dash)
    if kind == "pattern":
        return pattern_spec(pattern, final_dash)
    if kind == "lsd_budget":
        spec = pattern_spec(pattern, final_dash) if pattern.strip() else EveryK(k, final_dash=final_dash)
        return BudgetSchedule(spec, budget_lsd, n_speed if n_speed > 0 else None)
    raise ValueError(f"schedule kind {kind!r} is not one of {KINDS}")


def describe(schedule, preview_steps: int, n_speed: float) -> str:
    n = n_speed if n_speed > 0 else None
    if isinstance(schedule, AdaptiveDash):
        return (f"{schedule.describe()}: decided during the run from the input's change and the output's last "
                "measured change rate (EasyCache's signal); the console's Morse line lists the Dash steps and why")
    if isinstance(schedule, BudgetSchedule):
        if schedule.n_speed is None and n is None:
            return f"{schedule.describe()}: steps are planned when the Dot's N is known"
        plan = schedule.plan(n)
        text = f"{schedule.describe()}: {plan.steps} steps {plan.schedule.pattern()}, {plan.lsd:.2f} LSD"
        if plan.choice is None:
            return text
        return (f"{text}; pattern {plan.choice.describe()}. Morse KSampler chooses again for its sampler and the "
                "Dot's measured patterns, where the Dot file has them")
    resolved = schedule.resolve(preview_steps)
    cost = f", {resolved.lsd(n):.2f} LSD at N={n:g}" if n else ""
    return f"{schedule.describe()}: at {preview_steps} steps {resolved.pattern()} ({resolved.dash_steps} Dash + {resolved.dot_steps} Dot{cost})"


class DashDotSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MorseDashDotSchedule",
            display_name="Dash/Dot Schedule",
            category=CATEGORY,
            description="Chooses which sampling steps run your checkpoint (Dash, 'D') and which the Dot ('.'). "
            "The first step is always Dash. Shows the pattern and its cost in LSD (one Dash step = 1 LSD).",
            inputs=[
                io.Combo.Input("kind", options=KINDS, default="every_k", tooltip=(
                    "every_k: Dash on every k-th step (Faster Diffusion's uniform key steps). front_loaded: more Dash steps "
                    "early, fewer late. faster_diffusion: the paper's 9 key steps of 50 (0-3, 5, 10, 15, 25, 35; "
                    "scaled for other step counts). "
                    "pattern: an explicit string such as D..D. repeated over the steps. "
                    "lsd_budget: the most steps that fit a budget, using the pattern (or every k-th if empty); "
                    "pattern 'auto' also chooses how many fills per Dash the budget buys. "
                    "adaptive: decided during the run: Dash again once the output's predicted change since the last "
                    "Dash step reaches threshold (EasyCache's signal, gated over the whole run: Morse's window, "
                    "measured better than EasyCache's 0.15-0.95 for Morse's fills), the fill in between.")),
                io.Int.Input("k", default=2, min=1, max=100, tooltip="every_k / lsd_budget: Dash on every k-th step (1 = all Dash)."),
                io.Float.Input("dash_fraction", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="front_loaded: the share of steps that run Dash."),
                io.String.Input("pattern", default="D.", tooltip=(
                    "pattern / lsd_budget: 'D' = Dash, '.' = Dot; must start with 'D'. lsd_budget also takes 'auto': "
                    "D followed by 0-3 fills, chosen per budget from the Dot file's measured best patterns for the "
                    "sampler, else by a rule (more fills while the run has under 14 steps; one fill for ancestral/SDE samplers).")),
                io.Int.Input("final_dash", default=0, min=0, max=1000, tooltip="Always run the last n steps on Dash (fine detail)."),
                io.Float.Input("budget_lsd", default=10.0, min=1.0, max=1000.0, step=0.5,
                               tooltip="lsd_budget: the latency budget in Dash steps; Morse KSampler's steps input is replaced by the plan."),
                io.Float.Input("n_speed", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="How many times faster the Dot is than Dash. 0 = use the N measured in the Dot file."),
                io.Int.Input("preview_steps", default=20, min=1, max=1000, tooltip="Step count used only for the preview text."),
                io.Float.Input("threshold", default=0.2, min=0.0, max=3.0, step=0.01, tooltip=(
                    "adaptive: how much predicted relative change of the output may add up before Dash runs again "
                    "(lower: more Dash steps, closer to plain sampling; EasyCache's default 0.2).")),
            ],
            outputs=[
                ScheduleType.Output(tooltip="The schedule, for Morse KSampler or Morse Model Patch."),
                io.String.Output(display_name="description", tooltip="The resolved pattern and its LSD cost."),
            ],
        )

    @classmethod
    def execute(cls, kind, k, dash_fraction, pattern, final_dash, budget_lsd, n_speed, preview_steps,
                threshold=0.2) -> io.NodeOutput:
        try:
            schedule = build_schedule(kind, k, dash_fraction, pattern, final_dash, budget_lsd, n_speed, threshold)
            text = describe(schedule, preview_steps, n_speed)
        except MorseError as exc:
            raise ValueError(f"Dash/Dot Schedule: {exc}") from None
        return io.NodeOutput(schedule, text, ui=ui.PreviewText(text))
