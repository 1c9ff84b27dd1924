"""Training a DiT feature Dot through ComfyUI's own Flux class: the gradient reaches the Dot through every later
Dash call (comfy_kitchen's RoPE ops given their gradient, in-place adds made safe by saved copies)."""
import pytest
import torch

from comfy_host import COMFYUI_PATH
from tiny_checkpoints import tiny_families_registered, write_tiny_checkpoint


def test_comfy_kitchens_rope_ops_get_the_rotations_gradient(host):
    from training.host.rope_gradients import register_rope_gradients, rope1

    if not register_rope_gradients():
        pytest.skip("comfy_kitchen is not installed in this ComfyUI: its RoPE is plain torch, with a gradient")
    g = torch.Generator().manual_seed(0)
    x, k, weight = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    angles = torch.randn(1, 1, 5, 4, generator=g)
    freqs = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1).reshape(1, 1, 5, 4, 2, 2)

    def grads(rotate, *inputs):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        outs = rotate(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum(((o * weight) ** 2).sum() for o in outs).backward()  # a loss that is not linear in the rotated tensors
        return [leaf.grad for leaf in leaves]

    assert torch.equal(torch.ops.comfy_kitchen.apply_rope1(x, freqs), rope1(x, freqs))  # the same rotation
    for got, want in zip(grads(lambda a: torch.ops.comfy_kitchen.apply_rope1(a, freqs), x), grads(lambda a: rope1(a, freqs), x)):
        torch.testing.assert_close(got, want)
    pair = grads(lambda a, b: torch.ops.comfy_kitchen.apply_rope(a, b, freqs), x, k)
    for got, want in zip(pair, grads(lambda a, b: (rope1(a, freqs), rope1(b, freqs)), x, k)):
        torch.testing.assert_close(got, want)


def test_rollout_training_through_comfyuis_flux_lowers_the_end_error_of_its_runs(host, tmp_path):
    from training.host.comfy_setup import comfy_setup
    from training.host.unet_blocks import blocks_of
    from training.trainer.rollout import RolloutConfig, Rollouts, relative_end_error, targets_for, train_feature_dot
    from morse_engine import FeatureDotConfig
    from morse_engine.dot_layouts.feature import fill_for

    with tiny_families_registered(host) as families:
        checkpoint = write_tiny_checkpoint(host, families, "flux", tmp_path / "tiny_flux.safetensors")
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red cube\na blue sphere\n")
        setup = comfy_setup(checkpoint, tmp_path / "run", prompts=prompts, resolution=64, comfyui=COMFYUI_PATH,
                            log=lambda *_: None)
    assert setup.prediction == "flow" and setup.inplace_forward and setup.guidance_distilled
    config = RolloutConfig(runs=2, fixed_runs=1, batch=1, min_steps=4, max_steps=6, cfg_min=1.0, cfg_max=1.0,
                           steps=12, fixed_every=6, checkpoint_every=100, lr=1e-2, warmup=1, samplers=("euler",),
                           dot=FeatureDotConfig(width=8))
    blocks = blocks_of(setup.unet, on_comfy=True)
    state = tmp_path / "run" / "train-state.safetensors"
    result = train_feature_dot(setup, blocks, config, state, log=lambda *_: None)
    rollouts = Rollouts(setup, "cpu")
    runs = targets_for(setup, config, rollouts, state.parent / "rollout-targets.safetensors", log=lambda *_: None)
    untrained = type(result.dot).build(setup.unet, result.dot.config)
    with torch.no_grad():
        before = [float(relative_end_error(rollouts, r, fill_for(untrained, setup.unet, blocks))) for r in runs["train"]]
        after = [float(relative_end_error(rollouts, r, fill_for(result.dot, setup.unet, blocks))) for r in runs["train"]]
    assert sum(after) < sum(before), (before, after)
