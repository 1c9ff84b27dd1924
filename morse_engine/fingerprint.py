"""Fingerprints of a Dash backbone, so a Dot file can tell whether it fits a model.

Two levels, because they call for different answers:

* ``architecture``: a hash of every parameter name and shape. A mismatch means the Dot
  cannot run on this model at all.
* ``weights``: a probe of the values of a fixed set of tensors (mean |w| of their first
  elements). A mismatch means the same architecture with other weights: another checkpoint
  or fine-tune, on which a Dot trained elsewhere is not lossless. The probe is compared
  with a tolerance, so the same checkpoint loaded in fp16, bf16 or fp32 matches.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

PROBE_TENSORS = 16
PROBE_ELEMENTS = 4096
PROBE_RTOL = 5e-3


@dataclass(frozen=True)
class BackboneFingerprint:
    architecture: str
    weights: tuple[float, ...]

    @property
    def weights_id(self) -> str:
        """Short display id of the weight probe (for messages; comparison uses a tolerance)."""
        text = json.dumps([round(v, 3) for v in self.weights])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def weights_match(self, other: "BackboneFingerprint") -> bool:
        if len(self.weights) != len(other.weights):
            return False
        return all(abs(a - b) <= PROBE_RTOL * max(abs(a), abs(b), 1e-8) for a, b in zip(self.weights, other.weights))


def _canonical_key(key: str) -> str:
    # ComfyUI and our tools may hand over the UNet with or without its checkpoint prefix.
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def fingerprint_state_dict(state: dict[str, torch.Tensor]) -> BackboneFingerprint:
    items = sorted((_canonical_key(k), v) for k, v in state.items() if torch.is_tensor(v))
    h = hashlib.sha256()
    for key, value in items:
        h.update(f"{key}:{tuple(value.shape)};".encode())
    float_items = [(k, v) for k, v in items if v.is_floating_point() and v.numel() > 0]
    if float_items:
        stride = max(1, len(float_items) // PROBE_TENSORS)
        chosen = float_items[::stride][:PROBE_TENSORS]
    else:
        chosen = []
    probe = tuple(
        float(v.detach().reshape(-1)[:PROBE_ELEMENTS].to(device="cpu", dtype=torch.float64).abs().mean()) for _, v in chosen
    )
    return BackboneFingerprint(h.hexdigest()[:16], probe)


def fingerprint_module(backbone: nn.Module) -> BackboneFingerprint:
    return fingerprint_state_dict(backbone.state_dict())
