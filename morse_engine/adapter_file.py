"""Dot adapter files: safetensors with Morse metadata, checked against the Dash on load.

Only safetensors is read or written, never pickle. The metadata says what the Dot is
(format and version, m, widths, LoRA rank/alpha/targets, latent channels, whether it uses
the trajectory inputs), what it was trained on (base-model family, fingerprint of the
Dash weights, a training summary) and how fast it is (measured N); optionally which Dash/fill pattern
its evaluation measured best per sampler and LSD budget (``pattern_table``, read by the budget planner).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .dot_layouts import Dot, DotLayoutConfig, config_from_dict, config_to_dict, layout_of
from .dot_layouts.paper import LAYOUT as PAPER
from .errors import DotFileError, DotMismatchError, ScheduleError
from .fingerprint import BackboneFingerprint, fingerprint_module
from .pattern_choice import check_pattern_table

FORMAT = "morse-dot"
# 2: the layout fields (step_input, prediction, stem, eta_scale, base) are always written. Version 1 files
# written before those fields existed meant the paper's layout; migrate_config says so explicitly.
# 3: a "layout" key says which Dot the file holds: "paper" (PaperDotConfig, the paper's layout and its measured
# variants) or "feature" (FeatureDotConfig); files before it are all "paper".
FORMAT_VERSION = 3
# What a field that a version-1 file lacks meant when it was written: the paper's Dot.
PAPER_LAYOUT = {"step_input": "x_s", "prediction": "eps", "stem": "full_res", "eta_scale": "none", "base": "anchor"}
# optional metadata entry: {sampler: [[budget_lsd, pattern], ...]}, the measured best pattern per budget (files
# without it are read as before; no format version change)
PATTERN_TABLE_KEY = "pattern_table"


def migrate_config(config: dict, version: int) -> dict:
    """A Dot file's config in today's fields: the one place old files are read differently."""
    if version == 1:
        config = {**PAPER_LAYOUT, **config}
    if version < 3:
        config = {**config, "layout": PAPER}
    return dict(config)


@dataclass
class DotFileInfo:
    path: str
    config: DotLayoutConfig
    base_family: str
    fingerprint: BackboneFingerprint
    measured_n: Optional[float]
    training: dict = field(default_factory=dict)
    pattern_table: Optional[dict] = None  # {sampler: ((budget, pattern), ...)} where the file has one

    def describe(self) -> str:
        return layout_of(self.config).describe(self.config, self.base_family,
                                               f"{self.measured_n:.2f}" if self.measured_n else "unmeasured")


def save_dot(
    path,
    dot: Dot,
    *,
    base_family: str,
    fingerprint: BackboneFingerprint,
    measured_n: Optional[float] = None,
    training: Optional[dict] = None,
    pattern_table: Optional[dict] = None,
) -> Path:
    """Write the Dot's own weights (never the backbone) atomically, with its metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DotFileError(f"Dot files are saved as .safetensors; give a path ending in .safetensors (got '{path}')")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in dot.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config_to_dict(dot.config)),
        "base_family": base_family,
        "dash_architecture": fingerprint.architecture,
        "dash_weights_probe": json.dumps(list(fingerprint.weights)),
        **({"dash_weights_sample": json.dumps(list(fingerprint.sample)), "dash_weights_sample_dtype": fingerprint.sample_dtype}
           if fingerprint.sample is not None else {}),
        "measured_n": "" if measured_n is None else repr(float(measured_n)),
        "training": json.dumps(training or {}),
    }
    if pattern_table is not None:
        metadata[PATTERN_TABLE_KEY] = _pattern_table_json(pattern_table, path)
    save_file_atomic(tensors, path, metadata)
    return path


def _pattern_table_json(table: dict, path: Path) -> str:
    try:
        checked = check_pattern_table(table)
    except ScheduleError as exc:
        raise DotFileError(f"the pattern table for '{path.name}' cannot be written: {exc}") from None
    return json.dumps({sampler: [[b, p] for b, p in rows] for sampler, rows in checked.items()})


def _read_pattern_table(meta: dict, name: str) -> Optional[dict]:
    text = meta.get(PATTERN_TABLE_KEY)
    if not text:
        return None
    try:
        return check_pattern_table(json.loads(text))
    except (ValueError, ScheduleError) as exc:  # JSONDecodeError is a ValueError
        raise DotFileError(
            f"'{name}' has a bad '{PATTERN_TABLE_KEY}' metadata entry ({exc}); write it again with "
            f"`python -m training.pattern_table --write` or remove it with `--clear`"
        ) from None


def write_pattern_table(path, table: Optional[dict]) -> Path:
    """Put a measured pattern table into a Dot file's metadata (``None`` removes it), leaving its tensors and every
    other metadata entry as they are; the file is checked as a Dot first and replaced atomically."""
    path = Path(path)
    read_dot_info(path)  # a foreign or broken file is refused before anything is written
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    meta.pop(PATTERN_TABLE_KEY, None)
    if table is not None:
        meta[PATTERN_TABLE_KEY] = _pattern_table_json(table, path)
    save_file_atomic(tensors, path, meta)
    return path


def save_file_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    """Write safetensors through a temporary file and a rename: a killed writer leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_dot_info(path) -> DotFileInfo:
    """Read and validate a Dot file's metadata without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise DotFileError(f"Dot file '{path}' does not exist; check the path or put the file in models/dot_models")
    if path.suffix != ".safetensors":
        raise DotFileError(
            f"'{path.name}' is not a .safetensors file; Dot adapters are only read from safetensors (never pickle), "
            "so convert or re-save it as .safetensors"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DotFileError(
            f"'{path.name}' cannot be read as safetensors (truncated or corrupt: {exc}); download or train it again"
        ) from None
    if meta.get("format") != FORMAT:
        raise DotFileError(
            f"'{path.name}' has no Morse Dot metadata (format is {meta.get('format')!r}, expected '{FORMAT}'); "
            "it is not a Dot adapter: load it with the node meant for it, or train a Dot with training.train_dot"
        )
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) < 1:
        raise DotFileError(f"'{path.name}' has no readable Dot format version ({version!r}); train or download the Dot again")
    if int(version) > FORMAT_VERSION:
        raise DotFileError(
            f"'{path.name}' is Dot format version {version}, made by a newer version of the pack; update it "
            f"(this pack reads versions 1 to {FORMAT_VERSION})"
        )
    try:
        config = config_from_dict(migrate_config(json.loads(meta["config"]), int(version)))
        sample = meta.get("dash_weights_sample")
        fingerprint = BackboneFingerprint(meta["dash_architecture"], tuple(json.loads(meta["dash_weights_probe"])),
                                          tuple(json.loads(sample)) if sample else None,
                                          meta.get("dash_weights_sample_dtype") or "float32")
        measured_n = float(meta["measured_n"]) if meta.get("measured_n") else None
        training = json.loads(meta.get("training") or "{}")
    except (KeyError, TypeError, ValueError) as exc:
        raise DotFileError(f"'{path.name}' has damaged Morse metadata ({exc!r}); train or download the Dot again") from None
    return DotFileInfo(str(path), config, meta.get("base_family", "unknown"), fingerprint, measured_n, training,
                       _read_pattern_table(meta, path.name))


def check_compatible(
    info: DotFileInfo, backbone: nn.Module, allow_other_weights: bool = False, fingerprint: Optional[BackboneFingerprint] = None
) -> None:
    """Refuse, in one sentence, a Dot made for another Dash.

    ``fingerprint`` overrides the one taken from ``backbone``'s live weights: a host whose
    weights are patched in place (user LoRAs) passes the fingerprint of the original weights.
    """
    name = Path(info.path).name
    channels = getattr(backbone, "in_channels", None)
    if channels is not None and int(channels) != info.config.latent_channels:
        raise DotMismatchError(
            f"'{name}' is a Dot for {info.config.latent_channels}-channel latents ({info.base_family}) but this model "
            f"takes {channels} channels; use a Dot trained for this model family"
        )
    here = fingerprint or fingerprint_module(backbone)
    if here.architecture != info.fingerprint.architecture:
        raise DotMismatchError(
            f"'{name}' was trained for a different model architecture ({info.base_family}, architecture "
            f"{info.fingerprint.architecture}; this model is {here.architecture}); use a Dot trained for this model"
        )
    if not allow_other_weights and not here.weights_match(info.fingerprint):
        raise DotMismatchError(
            f"'{name}' was trained on other weights of this architecture (weights {info.fingerprint.weights_id}, this "
            f"model {here.weights_id}); train a Dot for this checkpoint, or allow other weights to use it anyway "
            "(fine-tunes of the same base may work at lower quality)"
        )


def read_dot_file(path) -> tuple[DotFileInfo, dict[str, torch.Tensor]]:
    """Read and validate a whole Dot file (metadata and tensors) without a backbone.

    A host can call this when the user picks the file, to report a broken file at once, and
    build the Dot for a model later with :func:`build_dot`.
    """
    info = read_dot_info(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DotFileError(
            f"'{Path(path).name}' cannot be read (truncated or corrupt: {exc}); download or train it again"
        ) from None
    return info, tensors


def build_dot(
    info: DotFileInfo,
    tensors: dict,
    backbone: nn.Module,
    allow_other_weights: bool = False,
    fingerprint: Optional[BackboneFingerprint] = None,
) -> Dot:
    """The Dot of a read file, for ``backbone``; raises before building anything if it does not fit."""
    check_compatible(info, backbone, allow_other_weights, fingerprint)
    dot = layout_of(info.config).build_checked(info.config, backbone, Path(info.path).name)
    expected = dot.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise DotFileError(
            f"'{Path(info.path).name}' does not hold the weights its metadata describes ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(wrong)} of the wrong shape, e.g. '{first}'); train or download the Dot again"
        )
    dot.load_state_dict(tensors)
    return dot.eval().requires_grad_(False)


def load_dot(path, backbone: nn.Module, allow_other_weights: bool = False, device=None) -> tuple[Dot, DotFileInfo]:
    """Load a Dot for ``backbone``; raises before building anything if it does not fit."""
    info, tensors = read_dot_file(path)
    dot = build_dot(info, tensors, backbone, allow_other_weights)
    if device is not None:
        dot.to(device)
    return dot, info


class DotFile:
    """A Dot file read and checked once, that builds its Dot for each backbone it meets, once.

    Hosts hold one of these per file the user picked: the file is read and checked when it
    is picked, and the Dot is built (and checked against the model) when a run starts.
    """

    def __init__(self, path):
        self.info, self._tensors = read_dot_file(path)
        self._built: dict = {}

    @property
    def measured_n(self) -> Optional[float]:
        return self.info.measured_n

    @property
    def pattern_table(self) -> Optional[dict]:
        """The measured best pattern per sampler and budget, where the file has one (for the budget planner)."""
        return self.info.pattern_table

    def dot_for(
        self,
        backbone: nn.Module,
        device=None,
        dtype=None,
        fingerprint: Optional[BackboneFingerprint] = None,
        allow_other_weights: bool = False,
    ) -> Dot:
        fp = fingerprint or fingerprint_module(backbone)
        key = (id(backbone), fp.architecture, fp.weights_id, str(device), str(dtype), allow_other_weights)
        if key not in self._built:
            dot = build_dot(self.info, self._tensors, backbone, allow_other_weights, fp)
            self._built = {key: dot.to(device=device, dtype=dtype)}  # one model at a time: no growth
        return self._built[key]
