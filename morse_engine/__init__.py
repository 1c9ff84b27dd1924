"""Morse (ICML 2025) as a host-independent engine: schedules, the Dot, the router, files.

Nothing here imports ComfyUI; the nodes in ``nodes/`` and the tools in ``training/`` use it.
"""
from .adapter_file import (DotAdapter, DotFileInfo, build_dot, check_compatible, load_dot, read_dot_file, read_dot_info, save_dot,
                           write_pattern_table)
from .dot_model import DotConfig, DotModel, default_widths, step_deviation
from .errors import DotFileError, DotInputError, DotMismatchError, MorseError, ScheduleError
from .feature_dot import FeatureDot, FeatureDotConfig, FeatureDotFiller, dot_filler
from .fillers import Anchor, DotFiller, ExtrapolateFiller, ReuseFiller
from .fingerprint import BackboneFingerprint, fingerprint_module, fingerprint_state_dict
from .lora import DEFAULT_TARGETS, LoRAWeights
from .pattern_choice import AutoPattern, PatternChoice, check_pattern_table, choose_pattern, is_stochastic_sampler, rule_fills
from .router import MorseRouter, MorseRun, RunSummary
from .schedules import BudgetPlan, BudgetSchedule, DashSchedule, EveryK, FrontLoaded, KeySteps, Pattern, ScheduleSpec, lsd_cost, plan_budget
from .speedup import SpeedupPoint, average_speedup, speedup_curve

__all__ = [name for name in dir() if not name.startswith("_")]
