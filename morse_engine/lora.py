"""LoRA deltas on a shared backbone that exist only while the Dot runs.

ComfyUI patches a model's weights by state-dict key (user LoRAs, offloading, fp8 casts), so
the Dash backbone's modules must keep their names and behaviour. Instead of wrapping
modules (as peft does for training), the deltas are added by forward hooks that are
registered when a Dot call begins and removed when it ends: Dash calls run the untouched
module graph and pay nothing.

The maths is peft's LoRA: ``out = base(x) + (alpha / r) * B(A(x))``, with A as a Linear (or a
Conv2d with the base conv's kernel, stride and padding) and B as a Linear (or 1x1 Conv2d)
initialised to zero.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DotMismatchError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _key(module_path: str) -> str:
    # nn.ModuleDict keys may not contain '.'
    return module_path.replace(".", "/")


@dataclass(frozen=True)
class LoRATarget:
    """A backbone module that gets a LoRA delta, described by what its weights need."""

    path: str
    kind: str  # "linear" or "conv2d"
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)


def matches_target(path: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of names: the module path equals a target or ends with '.' + target."""
    return any(path == t or path.endswith("." + t) for t in targets)


def find_targets(backbone: nn.Module, targets: tuple[str, ...]) -> list[LoRATarget]:
    found = []
    for path, module in backbone.named_modules():
        if not path or not matches_target(path, targets):
            continue
        if isinstance(module, nn.Linear):
            found.append(LoRATarget(path, "linear", module.in_features, module.out_features))
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            found.append(
                LoRATarget(
                    path,
                    "conv2d",
                    module.in_channels,
                    module.out_channels,
                    tuple(module.kernel_size),
                    tuple(module.stride),
                    tuple(module.padding),
                )
            )
    if not found:
        raise DotMismatchError(
            f"LoRA targets {list(targets)} match no Linear or Conv2d module of the backbone; "
            "name modules that exist in it (for an SD-style UNet: to_q, to_k, to_v, to_out.0)"
        )
    return found


class LoRAWeights(nn.Module):
    """The low-rank A/B pairs for each target module of a backbone."""

    def __init__(self, targets: list[LoRATarget], rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank}); 8 to 64 are usual")
        self.targets = {t.path: t for t in targets}
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        for t in targets:
            if t.kind == "linear":
                down = nn.Linear(t.in_features, rank, bias=False)
                up = nn.Linear(rank, t.out_features, bias=False)
            else:
                down = nn.Conv2d(t.in_features, rank, t.kernel_size, t.stride, t.padding, bias=False)
                up = nn.Conv2d(rank, t.out_features, 1, bias=False)
            # peft's default init: A Kaiming-uniform, B zero, so the delta starts at zero
            nn.init.kaiming_uniform_(down.weight, a=5**0.5)
            nn.init.zeros_(up.weight)
            self.down[_key(t.path)] = down
            self.up[_key(t.path)] = up

    def delta(self, path: str, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down[_key(path)], self.up[_key(path)]
        dtype = down.weight.dtype
        return (up(down(x.to(dtype))) * self.scale)

    def check_backbone(self, backbone: nn.Module) -> None:
        """Refuse a backbone whose modules do not fit these deltas (named in one sentence)."""
        present = {t.path: t for t in find_targets(backbone, _target_names(self.targets))}
        for path, want in self.targets.items():
            have = present.get(path)
            if have != want:
                what = "is missing" if have is None else f"has shape {have.in_features}->{have.out_features} ({have.kind})"
                raise DotMismatchError(
                    f"the Dot's LoRA expects backbone module '{path}' as {want.kind} "
                    f"{want.in_features}->{want.out_features}, but in this model it {what}; "
                    "use a Dot trained for this model architecture"
                )

    @contextmanager
    def applied_to(self, backbone: nn.Module):
        """Within the block, the targeted backbone modules add their LoRA delta."""
        modules = dict(backbone.named_modules())
        handles = []
        try:
            for path in self.targets:
                handles.append(modules[path].register_forward_hook(self._hook(path)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, path: str):
        def add_delta(module, inputs, output):
            return output + self.delta(path, inputs[0]).to(output.dtype)

        return add_delta

    # --- exchange with peft (training uses peft; files and inference use these weights) ---

    def load_from_peft(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """Copy lora_A/lora_B weights out of a peft-injected copy of the backbone."""
        modules = dict(peft_model.named_modules())
        with torch.no_grad():
            for path in self.targets:
                layer = _peft_layer(modules, path)
                self.down[_key(path)].weight.copy_(layer.lora_A[adapter_name].weight)
                self.up[_key(path)].weight.copy_(layer.lora_B[adapter_name].weight)

    def copy_to_peft(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """Copy these weights into a peft-injected backbone (to resume training)."""
        modules = dict(peft_model.named_modules())
        with torch.no_grad():
            for path in self.targets:
                layer = _peft_layer(modules, path)
                layer.lora_A[adapter_name].weight.copy_(self.down[_key(path)].weight)
                layer.lora_B[adapter_name].weight.copy_(self.up[_key(path)].weight)


def _target_names(targets: dict) -> tuple[str, ...]:
    return tuple(targets)


def _peft_layer(modules: dict, path: str):
    layer = modules.get(path)
    if layer is None or not hasattr(layer, "lora_A"):
        raise DotMismatchError(f"the peft model has no LoRA layer at '{path}'; inject LoRA with the same targets")
    return layer
