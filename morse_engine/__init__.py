"""Morse (ICML 2025) as a host-independent engine: schedules, the fills, both Dot layouts, the router, files.

Nothing here imports ComfyUI; the nodes in ``nodes/`` and the tools in ``training/`` use it.
"""
from .adaptive import AdaptiveDash, AdaptiveSchedule
from .adapter_file import (DotFile, DotFileInfo, build_dot, check_compatible, load_dot, read_dot_file, read_dot_info, save_dot,
                           write_pattern_table)
from .dot_layouts import (DEFAULT_LAYOUT, LAYOUTS, Dot, DotLayoutConfig, FeatureDot, FeatureDotConfig, FeatureDotFiller,
                          PaperDot, PaperDotConfig, PaperDotFiller, layout_of)
from .dot_layouts.paper import default_widths, step_deviation
from .errors import DotFileError, DotInputError, DotMismatchError, MorseError, ScheduleError
from .fill_by_name import FILLS_WITHOUT_DOT, make_fill, needs_blocks
from .fillers import Anchor, DashCall, ExtrapolateFiller, ResidualFiller, ReuseFiller
from .fingerprint import BackboneFingerprint, fingerprint_module, fingerprint_state_dict
from .lora import DEFAULT_TARGETS, LoRAWeights
from .pattern_choice import AutoPattern, PatternChoice, check_pattern_table, choose_pattern, is_stochastic_sampler, rule_fills
from .router import MorseRouter, MorseRun, RunSummary
from .schedules import BudgetPlan, BudgetSchedule, DashSchedule, EveryK, FrontLoaded, KeySteps, Pattern, ScheduleSpec, lsd_cost, plan_budget
from .speedup import SpeedupPoint, average_speedup, speedup_curve

__all__ = [name for name in dir() if not name.startswith("_")]
