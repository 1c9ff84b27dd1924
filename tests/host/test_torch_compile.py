"""ComfyUI's TorchCompileModel applied before Morse, on one UNet and one DiT family: the run completes, all-Dash
equals compiled plain sampling, and a fill still serves its steps. The compile wrapper swaps the compiled module
in at APPLY_MODEL and Morse routes at DIFFUSION_MODEL (inside it), so the two hooks nest through ComfyUI's wrapper
API and neither replaces the other's ``forward`` (the peers that patch ``forward_orig`` lose one of the two)."""
import logging

import pytest
import torch

import tiny_dits as td
from comfy_host import build_tiny_sd15, conditioning

STEPS = 3


def compiled(host, model):
    """The model as ComfyUI's TorchCompileModel node returns it (inductor, the node's own options)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model, "inductor")[0]


def sample_sd15(host, model):
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return host.comfy.sample.sample(model, noise, STEPS, 2.0, "euler", "simple", conditioning(1, tokens=8),
                                    conditioning(2, tokens=8), latent, seed=1, disable_pbar=True)


def sample_flux(host, model):
    family = td.FAMILIES["flux"]
    latent = td.latent(family)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return host.comfy.sample.sample(model, noise, STEPS, 2.0, "euler", "simple", td.conditioning(family, 1),
                                    td.conditioning(family, 2), latent, seed=1, disable_pbar=True)


CASES = {"sd15": (build_tiny_sd15, sample_sd15), "flux": (lambda host: td.build(host, td.FAMILIES["flux"]), sample_flux)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_morse_after_torch_compile_is_compiled_plain_sampling(host, name, caplog):
    torch._dynamo.reset()
    build, sample = CASES[name]
    model = compiled(host, build(host))
    hooks, engine = host.hooks, host.engine
    plain = sample(host, model)
    all_dash = sample(host, hooks.apply_morse(model, hooks.MorseSettings(schedule=engine.EveryK(1))))
    assert torch.equal(all_dash, plain)
    with caplog.at_level(logging.INFO, logger="morse"):
        filled = sample(host, hooks.apply_morse(model, hooks.MorseSettings(schedule=engine.EveryK(2), fill="extrapolate")))
    assert torch.isfinite(filled).all() and not torch.equal(filled, plain)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ")]
    assert any(f"2 Dash steps, 1 extrapolate steps of {STEPS}" in line for line in lines), lines
