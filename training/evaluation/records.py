"""What one sampling run of the evaluation leaves behind, and a store that makes a long evaluation resumable.

A run's record keeps per-sample data (classifier features and predicted labels, squared error to
the trajectory reference), not just the averages: the confidence intervals are paired bootstraps
over samples, which every run must resample alike. Records are written one file per run, so a
killed ``--full`` evaluation picks up where it stopped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from morse_engine.adapter_file import save_file_atomic


@dataclass
class RunRecord:
    sampler: str
    fill: str  # "plain", or the fill's name
    steps: int
    lsd: float  # measured: Dash calls per run + fill calls / N
    pattern: Optional[str] = None  # the Dash/fill pattern (None for plain)
    budget: Optional[float] = None
    dash_steps: Optional[int] = None
    fill_steps: Optional[int] = None
    fallback_calls: int = 0
    seconds: float = 0.0
    features: Optional[torch.Tensor] = None  # [n, D] classifier features of the samples
    predicted: Optional[torch.Tensor] = None  # [n] classifier labels
    sq_error: Optional[torch.Tensor] = None  # [n_ref] per-sample mean squared error to the trajectory reference
    images: Optional[torch.Tensor] = None  # kept for the trajectory reference runs only (the others compare to it)
    extra: dict = field(default_factory=dict)

    TENSORS = ("features", "predicted", "sq_error", "images")

    def meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.TENSORS}


def run_key(sampler: str, fill: str, pattern: Optional[str], value: float) -> str:
    return f"{sampler}|{fill}|{pattern or '-'}|{value:g}"


class RecordStore:
    """Records of one evaluation's settings, one safetensors file each, under ``root/<digest of the settings>``."""

    def __init__(self, root: Path, settings: dict):
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors")

    def get(self, key: str) -> Optional[RunRecord]:
        path = self._path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["record"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return RunRecord(**meta, **tensors)

    def put(self, key: str, record: RunRecord) -> None:
        tensors = {k: getattr(record, k).detach().cpu().contiguous() for k in RunRecord.TENSORS
                   if getattr(record, k) is not None}
        save_file_atomic(tensors, self._path(key), {"record": json.dumps(record.meta()), "key": key})

    def get_value(self, name: str):
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put_value(self, name: str, value) -> None:
        (self.dir / f"{name}.json").write_text(json.dumps(value, default=float))


def export_records(store: RecordStore, keys: list[str], path: Path, extra: dict) -> Path:
    """Pack the records ``keys`` into one safetensors file (features in float16), with ``extra`` values (e.g. the
    run's N) in its metadata: how a run on a lent machine brings its records back for analysis elsewhere."""
    tensors, metas = {}, {}
    for i, key in enumerate(keys):
        rec = store.get(key)
        for name in RunRecord.TENSORS:
            value = getattr(rec, name)
            if value is not None:
                value = value.half() if name in ("features", "images") else value
                tensors[f"{i}.{name}"] = value.contiguous()
        metas[str(i)] = {"key": key, "record": rec.meta()}
    save_file_atomic(tensors, Path(path), {"records": json.dumps(metas), "extra": json.dumps(extra, default=float)})
    return Path(path)


def import_records(store: RecordStore, path: Path) -> dict:
    """Put the records of a pack into ``store`` (features back in float32); returns the pack's extra values."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        metas = json.loads(meta["records"])
        for i, entry in metas.items():
            tensors = {name: f.get_tensor(f"{i}.{name}") for name in RunRecord.TENSORS if f"{i}.{name}" in f.keys()}
            tensors = {k: v.float() if k in ("features", "images") else v for k, v in tensors.items()}
            store.put(entry["key"], RunRecord(**entry["record"], **tensors))
    return json.loads(meta["extra"])
