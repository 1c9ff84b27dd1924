"""Fingerprints of a Dash backbone, so a Dot file can tell whether it fits a model.

Two levels, because they call for different answers:

* ``architecture``: a hash of every parameter name and shape. A mismatch means the Dot
  cannot run on this model at all.
* ``weights``: the values of a fixed sample of weights: ``SAMPLE_ELEMENTS`` elements, at positions drawn
  from each tensor's name, of ``SAMPLE_TENSORS`` weight tensors spread over the network. A mismatch means
  the same architecture with other weights (another checkpoint, a fine-tune, a merge, a LoRA baked in), on
  which a Dot trained elsewhere is not lossless. Two samples match when all but ``MISMATCH_SHARE`` of their
  elements agree within the rounding of the coarser of the two weight dtypes (so the same checkpoint in
  fp32, fp16, bf16 or fp8 matches), which a fine-tune moving every weight, or a merge moving only the
  attention weights, does not pass. Reading a few elements of some tensors costs milliseconds on SDXL.

Files from before the sample (format 2 without ``dash_weights_sample``) carry only the older probe, the mean
|w| of 16 tensors, which small zero-mean changes leave as it was; they are still checked by it, and
:attr:`BackboneFingerprint.weak` says so.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

PROBE_TENSORS = 16
PROBE_ELEMENTS = 4096
PROBE_RTOL = 5e-3
SAMPLE_TENSORS = 64
SAMPLE_ELEMENTS = 16
MISMATCH_SHARE = 0.01


def rounding_of(dtype_name: str) -> tuple[float, float]:
    """How far a cast to the dtype may move a value: relative (its eps) and absolute (the spacing of its
    subnormals, where small weights of fp8 lose their relative precision)."""
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return 2.0**-2, 2.0**-9  # an unknown dtype: as coarse as fp8
    info = torch.finfo(dtype)
    return float(info.eps), float(info.smallest_normal * info.eps)


@dataclass(frozen=True)
class BackboneFingerprint:
    architecture: str
    weights: tuple[float, ...]  # the older probe: mean |w| of PROBE_TENSORS tensors
    sample: Optional[tuple[float, ...]] = None  # the weight sample; None in files from before it
    sample_dtype: str = "float32"  # the dtype the sampled weights had (how far a cast may have moved them)

    @property
    def weak(self) -> bool:
        """True for a fingerprint without the weight sample (an older Dot file): small fine-tunes pass it."""
        return self.sample is None

    @property
    def weights_id(self) -> str:
        """Short display id of the weights (for messages and caches; comparison uses a tolerance)."""
        values = self.sample if self.sample is not None else self.weights
        text = json.dumps([float(f"{v:.2g}") for v in values])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def weights_match(self, other: "BackboneFingerprint") -> bool:
        if self.sample is not None and other.sample is not None and len(self.sample) == len(other.sample):
            # twice the coarser dtype's spacing: a cast rounds by half of it, stochastic rounding (fp8) by all of it
            rel, tiny = (2 * max(v) for v in zip(rounding_of(self.sample_dtype), rounding_of(other.sample_dtype)))
            off = sum(abs(a - b) > rel * max(abs(a), abs(b)) + tiny for a, b in zip(self.sample, other.sample))
            return off <= MISMATCH_SHARE * len(self.sample)
        if len(self.weights) != len(other.weights):
            return False
        return all(abs(a - b) <= PROBE_RTOL * max(abs(a), abs(b), 1e-8) for a, b in zip(self.weights, other.weights))


def _canonical_key(key: str) -> str:
    # ComfyUI and our tools may hand over the UNet with or without its checkpoint prefix.
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _spread(items: list, count: int) -> list:
    stride = max(1, len(items) // count)
    return items[::stride][:count]


def _positions(name: str, numel: int) -> torch.Tensor:
    """SAMPLE_ELEMENTS positions in a tensor, fixed by its name (not Python's per-process string hash)."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)
    return (seed + torch.arange(SAMPLE_ELEMENTS, dtype=torch.int64) * 2654435761) % numel


def fingerprint_state_dict(state: dict[str, torch.Tensor]) -> BackboneFingerprint:
    items = sorted((_canonical_key(k), v) for k, v in state.items() if torch.is_tensor(v))
    h = hashlib.sha256()
    for key, value in items:
        h.update(f"{key}:{tuple(value.shape)};".encode())
    float_items = [(k, v) for k, v in items if v.is_floating_point() and v.numel() > 0]
    probe = tuple(
        float(v.detach().reshape(-1)[:PROBE_ELEMENTS].to(device="cpu", dtype=torch.float64).abs().mean())
        for _, v in _spread(float_items, PROBE_TENSORS)
    )
    weights = _spread([(k, v) for k, v in float_items if v.dim() >= 2], SAMPLE_TENSORS)
    sample, coarsest = [], ("float32", 0.0)
    for key, v in weights:
        flat = v.detach().reshape(-1)
        sample += flat[_positions(key, flat.numel()).to(flat.device)].to(device="cpu", dtype=torch.float64).tolist()
        name = str(v.dtype).replace("torch.", "")
        coarsest = max(coarsest, (name, rounding_of(name)[0]), key=lambda c: c[1])
    return BackboneFingerprint(h.hexdigest()[:16], probe, tuple(sample) if sample else None, coarsest[0])


def fingerprint_module(backbone: nn.Module) -> BackboneFingerprint:
    return fingerprint_state_dict(backbone.state_dict())
