"""The reference DiT is a miniature of ComfyUI's own Flux class: its weights load into ``comfy.ldm.flux.model.Flux``
key for key and give the same velocity, and ComfyUI's sampler on that model gives the samples the evaluation's
own sampler gives (the flow parameterisation and the "normal" scheduler mirrored in ``morse_engine``)."""
import pytest
import torch

from morse_engine.parameterization import FlowSchedule
from training.evaluation.samplers import GuidedDenoiser, normal_sigmas, sample
from training.reference.dit import DEFAULT_DIT_PATH, FluxConfig, ReferenceFlux, load_reference_dit
from training.reference.unet import NULL_CLASS, ClassConditioner
from training.train_reference import REFERENCE_CONDITIONER, REFERENCE_DIT_CONFIG, REFERENCE_DIT_MU


def comfy_flux(host, config: FluxConfig, state_dict: dict, mu: float):
    """ComfyUI's Flux model class (as Flux-dev: ModelSamplingFlux; here without pooled vector or guidance input) with ``state_dict``, its
    ModelSamplingFlux at shift ``mu``, in a ModelPatcher."""
    comfy = host.comfy
    model = comfy.supported_models.Flux({"image_model": "flux", **config.comfy_params()}).get_model(
        {}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(state_dict, strict=True)
    model.model_sampling.set_parameters(shift=mu)
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def committed_or_random():
    if DEFAULT_DIT_PATH.is_file():
        dit, cond, _ = load_reference_dit()
        return dit, cond
    torch.manual_seed(0)
    dit = ReferenceFlux(REFERENCE_DIT_CONFIG).eval()
    with torch.no_grad():
        for p in dit.parameters():  # RMSNorm scales away from one, modulations away from zero
            p.add_(torch.randn_like(p) * 0.05)
    return dit, ClassConditioner(**REFERENCE_CONDITIONER).eval()


def test_reference_dit_weights_give_comfyui_flux_the_same_velocity(host):
    dit, cond = committed_or_random()
    patcher = comfy_flux(host, dit.config, dit.state_dict(), REFERENCE_DIT_MU)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 1, 32, 32, generator=g), torch.tensor([0.9, 0.5, 0.1])
    context = cond(torch.tensor([1, 7, NULL_CLASS]))
    with torch.no_grad():
        ours = dit(x, t, context)
        theirs = patcher.model.diffusion_model(x, t, context, transformer_options={})
    assert ours.shape == theirs.shape == x.shape
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(ours.abs().max())), float((ours - theirs).abs().max())


def test_comfyui_sampling_the_reference_dit_gives_the_evaluations_samples(host):
    dit, cond = committed_or_random()
    patcher = comfy_flux(host, dit.config, dit.state_dict(), REFERENCE_DIT_MU)
    labels, steps, cfg = torch.tensor([3, 8]), 6, 2.5
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    pos, neg = cond(labels), cond(torch.full((2,), NULL_CLASS))
    with torch.no_grad():
        comfy_out = host.comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal",
                                             [[pos, {"pooled_output": None}]], [[neg, {"pooled_output": None}]],
                                             torch.zeros_like(noise), seed=5, disable_pbar=True)
        comfy_out = patcher.model.latent_format.process_in(comfy_out)  # ComfyUI hands back Flux's VAE scaling
        ms = FlowSchedule.flux(REFERENCE_DIT_MU)
        ours = sample("euler", GuidedDenoiser(dit, ms, pos, neg, cfg), noise, normal_sigmas(ms, steps), ms)
    assert torch.allclose(ours, comfy_out, atol=1e-4), float((ours - comfy_out).abs().max())
