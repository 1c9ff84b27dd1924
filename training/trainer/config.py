"""The training run's settings: one source of truth for the Dot, Algorithm 1's draws, the loss and the loop.

``DotTrainConfig`` holds a :class:`morse_engine.PaperDotConfig` (what the Dot is), a
:class:`~morse_engine.training_tuples.TupleRecipe` and a :class:`~morse_engine.training_tuples.LossRecipe`
(how its tuples and loss are made) plus the loop's own settings. ``train_dot``'s flags are derived
from these fields (:func:`add_config_arguments`), so an option is declared once, with its help; the command
hands the options given back by name (:func:`config_from_options`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace

from morse_engine import PaperDotConfig
from morse_engine.training_tuples import LossRecipe, TupleRecipe

# The recipe measured best on the reference model (README, docs/decisions.md); a PaperDotConfig's own
# defaults stay the paper's layout, which is what a Dot file that predates a field meant.
RECIPE_DOT = PaperDotConfig(step_input="deviation", stem="pixel_shuffle", eta_scale="sigma_step", base="extrapolate")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help, "cli": True})


@dataclass(frozen=True)
class DotTrainConfig:
    dot: PaperDotConfig = field(default=RECIPE_DOT)
    tuples: TupleRecipe = field(default_factory=TupleRecipe)
    loss: LossRecipe = field(default_factory=LossRecipe)
    # the README's main job: 1000 steps keep it under 20 min on a 2-core VM whose speed has varied 2x between
    # sessions (1700 took 12 to 24 min); the committed reference Dot is the same recipe run longer (--steps 1700)
    steps: int = _opt(1000, "optimizer steps (the default: 12-15 min on 2 CPU cores for the reference model)")
    batch_size: int = _opt(32, "samples per micro-batch (per process under torchrun); each is a cond + uncond pair")
    grad_accum: int = _opt(1, "micro-batches per optimizer step: the step's batch is batch-size x K (x processes), for "
                              "the memory of one micro-batch; --steps and --checkpoint-every count optimizer steps")
    lr: float = _opt(1e-3, "peak learning rate (AdamW, linear warm-up then cosine)")
    warmup: int = _opt(100, "warm-up steps")
    seed: int = _opt(0, "seed of the Dot's start weights and of every draw")
    checkpoint_every: int = _opt(200, "steps between resumable checkpoints")

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")

    @classmethod
    def of(cls, **flat) -> "DotTrainConfig":
        """A config from flat field names (``m=1, jump_min=5, steps=10``), each routed to the part that owns it."""
        parts = {"dot": (RECIPE_DOT, {}), "tuples": (TupleRecipe(), {}), "loss": (LossRecipe(), {})}
        own = {}
        for name, value in flat.items():
            for part, (default, given) in parts.items():
                if name in _names(type(default)):
                    given[name] = value
                    break
            else:
                if name not in _names(cls):
                    raise TypeError(f"DotTrainConfig has no option {name!r}")
                own[name] = value
        return cls(**{part: replace(default, **given) for part, (default, given) in parts.items()}, **own)

    def flat(self) -> dict:
        """Every leaf option by name, JSON-safe (tuples as lists): what checkpoints and Dot files record."""
        out = {}
        for part in (self.dot, self.tuples, self.loss):
            out.update({f.name: getattr(part, f.name) for f in fields(part)})
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("dot", "tuples", "loss")})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _names(cls) -> set:
    return {f.name for f in fields(cls)}


def _csv(kind):
    def parse(text):
        return tuple(kind(v) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def option_fields():
    """(field, its default in the training recipe) of every option with a flag, in a stable order."""
    d = DotTrainConfig()
    for part in (d.dot, d.tuples, d.loss):
        for f in fields(part):
            if f.metadata.get("cli", True):
                yield f, getattr(part, f.name)
    for f in fields(d):
        if f.metadata.get("cli"):
            yield f, getattr(d, f.name)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per option field (``--jump-min`` for ``jump_min``); a flag not given stays out of the namespace,
    so the recipe's default (or a default that depends on other options) applies."""
    g = p.add_argument_group("the Dot and its training (defaults: the measured recipe)")
    for f, default in option_fields():
        flag = "--" + f.name.replace("_", "-")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata.get('help', '')} (default: {shown})"
        kw = dict(default=argparse.SUPPRESS, dest=f.name, help=help_)
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        kind = _field_kind(f, default)
        g.add_argument(flag, type=_csv(kind) if _is_tuple(f, default) else kind, **kw)


def _is_tuple(f, default) -> bool:
    return isinstance(default, tuple) or "tuple" in str(f.type)


def _field_kind(f, default):
    if isinstance(default, tuple) and default:
        return type(default[0])
    if default is None or isinstance(default, tuple):  # Optional[...] fields: the type named in the annotation
        text = str(f.type)
        return int if "int" in text else float if "float" in text else str
    return type(default)


def option_names() -> list[str]:
    """The options that have a flag (``--jump-min`` for ``jump_min``), in the order of ``option_fields``."""
    return [f.name for f, _ in option_fields()]


def config_from_options(given: dict, **defaults) -> DotTrainConfig:
    """The config of the options given (by field name; those not given keep the recipe's value); ``defaults``
    apply where an option was not given (e.g. a checkpoint's CFG range). Without trajectory inputs the base
    defaults to the anchor, the only one that Dot has."""
    given = dict(given)
    if given.get("trajectory") is False:
        given.setdefault("base", "anchor")
    return DotTrainConfig.of(**{**defaults, **given})
