"""The cost options of Dot training: device, precision, gradient checkpointing and accumulation,
the memory estimate, and the Dot's share of Dash's parameters (CPU; CUDA-only checks skip)."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from morse_engine import PaperDotConfig, PaperDot
from training.trainer import loop
from training.trainer import memory as mem
from training.trainer import runtime as runtimes
from training.trainer.config import DotTrainConfig
from training.trainer.loop import (
    accumulate_gradients,
    build_trainable,
    estimate_memory,
    peft_adapters,
    train_dot,
    training_tuple,
)
from test_dot_training import CFG, tiny_setup

CPU = runtimes.Runtime(torch.device("cpu"))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def trainable_dot(setup, cfg):
    """The trainer's Dot and LoRA with every output weight non-zero, so every parameter gets a gradient."""
    torch.manual_seed(0)
    dot, lora = build_trainable(setup.unet, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [dot.out.weight, dot.to_backbone.weight] + [p for n, p in setup.unet.named_parameters() if "lora_B" in n]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return dot, dot.light_parameters() + lora


def tuples(setup, cfg, sizes, seed=7):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        x0, cond = next(setup.batches(b, gen))
        with torch.no_grad(), peft_adapters(setup.unet, False):
            out.append(training_tuple(setup, x0, cond, cfg, gen))
    return out


def joined(a, b):
    """One tuple holding the samples of both, laid out as a tuple is: [all cond rows, all uncond rows]
    (the guided loss pairs the halves), with the per-sample guidance scales in the same order."""

    def cat(k):
        if k == "guidance":
            return torch.cat([getattr(a, k), getattr(b, k)])
        (ac, au), (bc, bu) = getattr(a, k).chunk(2), getattr(b, k).chunk(2)
        return torch.cat([ac, bc, au, bu])

    names = [f.name for f in dataclasses.fields(a) if f.name != "backbone_kwargs" and getattr(a, f.name) is not None]
    return dataclasses.replace(a, **{k: cat(k) for k in names}, backbone_kwargs={})


def grads(dot_params, fn):
    for p in dot_params:
        p.grad = None
    loss = fn()
    return loss, [p.grad.clone() for p in dot_params]


@pytest.mark.parametrize("loss_weight", ["none", "step"])
def test_two_accumulated_micro_batches_give_the_gradient_of_one_batch_twice_as_large(loss_weight):
    setup = tiny_setup()
    cfg = DotTrainConfig.of(**dict(CFG, loss_weight=loss_weight), steps=1)
    dot, params = trainable_dot(setup, cfg)
    a, b = tuples(setup, cfg, [4, 4])
    accumulated = DotTrainConfig.of(**dict(CFG, loss_weight=loss_weight, grad_accum=2), steps=1)
    (loss2, reuse2), g2 = grads(params, lambda: accumulate_gradients(dot, setup.unet, [a, b], accumulated, CPU))
    (loss1, reuse1), g1 = grads(params, lambda: accumulate_gradients(dot, setup.unet, [joined(a, b)], cfg, CPU))
    assert all(g.abs().sum() > 0 for g in g1)
    for x, y in zip(g2, g1):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # float32 sums in another order (thread count varies)
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=0)
    torch.testing.assert_close(reuse2, reuse1, rtol=1e-5, atol=0)
    # step weighting: micro-batches with different sigma steps count by them, not equally
    if loss_weight == "step":
        wa, wb = a.sigma_step.sum(), b.sigma_step.sum()
        assert not torch.isclose(wa, wb)


class CountingGroup:
    """A stand-in for a data-parallel group of one process that counts the gradient all-reduces."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self):
        self.reduces = 0

    def stream_seed(self, seed):
        return seed

    def broadcast_(self, tensors):
        pass

    def average_gradients(self, params):
        self.reduces += 1

    def mean(self, value):
        return value.detach().clone()

    def gather_generator_states(self, gen):
        return [gen.get_state()]

    def barrier(self):
        pass

    def close(self):
        pass


def test_accumulation_counts_optimizer_steps_and_reduces_gradients_once_per_step(tmp_path):
    draws = []
    setup = tiny_setup()
    real = setup.batches

    def counting(batch_size, gen):
        for item in real(batch_size, gen):
            draws.append(batch_size)
            yield item

    setup.batches = counting
    group = CountingGroup()
    cfg = DotTrainConfig.of(**dict(CFG, grad_accum=3), steps=4)
    state = tmp_path / "s.safetensors"
    result = train_dot(setup, cfg, state, progress=False, parallel=group)
    # 4 optimizer steps x 3 micro-batches, after the fixed tuple set drawn once from its own generator
    assert draws == [CFG["batch_size"]] * (loop.FIXED_SET_BATCHES + 12)
    assert group.reduces == 4
    assert result.steps == 4
    with safe_open(str(state), "pt") as f:
        assert f.metadata()["step"] == "4"
        assert json.loads(f.metadata()["extra"])["config"]["grad_accum"] == 3


def test_resume_with_another_grad_accum_is_refused(tmp_path):
    state = tmp_path / "s.safetensors"
    train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=5), state, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(grad_accum\)"):
        train_dot(tiny_setup(), DotTrainConfig.of(**dict(CFG, grad_accum=2), steps=10), state, resume=True, progress=False)


def test_a_checkpoint_from_before_grad_accum_resumes_with_the_default(tmp_path):
    state = tmp_path / "s.safetensors"
    train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=5), state, progress=False)
    with safe_open(str(state), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    extra = json.loads(meta["extra"])
    del extra["config"]["grad_accum"]  # as a checkpoint written before the option existed
    save_file(tensors, str(state), dict(meta, extra=json.dumps(extra)))
    result = train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=6), state, resume=True, progress=False)
    assert result.resumed_from == 5


def test_gradient_checkpointing_gives_the_same_gradients():
    setup = tiny_setup()
    cfg = DotTrainConfig.of(**CFG, steps=1)
    dot, params = trainable_dot(setup, cfg)
    (batch,) = tuples(setup, cfg, [6])
    plain = runtimes.Runtime(torch.device("cpu"), "fp32", grad_checkpointing=False)
    ckpt = runtimes.Runtime(torch.device("cpu"), "fp32", grad_checkpointing=True)
    (loss_a, _), ga = grads(params, lambda: accumulate_gradients(dot, setup.unet, [batch], cfg, plain))
    (loss_b, _), gb = grads(params, lambda: accumulate_gradients(dot, setup.unet, [batch], cfg, ckpt))
    torch.testing.assert_close(loss_a, loss_b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_on_the_cpu_trains_with_a_finite_loss_and_fp32_weights(tmp_path):
    rt = runtimes.resolve("cpu", "bf16", grad_checkpointing=True)
    setup = tiny_setup()
    result = train_dot(setup, DotTrainConfig.of(**CFG, steps=4), tmp_path / "s.safetensors", progress=False, runtime=rt)
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert all(p.dtype == torch.float32 for p in result.dot.parameters())
    assert all(p.dtype == torch.float32 for p in setup.unet.parameters())
    assert result.dot.out.weight.abs().sum() > 0  # it trained


def test_fp16_on_the_cpu_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--precision fp16 needs a CUDA device"):
        runtimes.resolve("cpu", "fp16")
    with pytest.raises(ValueError, match=r"--precision 'fp8' is not one of"):
        runtimes.resolve("cpu", "fp8")
    with pytest.raises(ValueError, match=r"--precision fp16 needs a CUDA device"):
        runtimes.Runtime(torch.device("cpu"), "fp16")  # also when built directly, as train_dot's callers may


def test_cli_refuses_fp16_on_the_cpu_with_exit_2(tmp_path, capsys):
    from training import train_dot as cli

    code = cli.main(["--layout", "paper", "--device", "cpu", "--precision", "fp16", "--steps", "1", "--runs", str(tmp_path),
                     "--out", str(tmp_path / "dot.safetensors")])
    assert code == 2
    assert "--precision fp16 needs a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match=r"--device cuda .*no CUDA device"):
        runtimes.resolve("cuda")


def test_defaults_per_device():
    cpu = runtimes.resolve("cpu")
    assert (cpu.precision, cpu.grad_checkpointing) == ("fp32", False)
    if torch.cuda.is_available():
        gpu = runtimes.resolve("cuda")
        assert gpu.precision == ("bf16" if runtimes.cuda_bf16(gpu.device) else "fp16")
        assert gpu.grad_checkpointing and gpu.device.index is not None
    with pytest.raises(ValueError, match="grad_accum"):
        DotTrainConfig.of(grad_accum=0)


# ---- the memory estimate ------------------------------------------------------------------


def test_weight_bytes_are_numel_times_element_size():
    tensors = [torch.zeros(3, 5), torch.zeros(7, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.float64)]
    assert mem.tensor_bytes(tensors) == 15 * 4 + 7 * 2 + 4 * 8


def test_saved_tensor_bytes_count_what_autograd_keeps():
    lin = torch.nn.Linear(5, 7)
    x = torch.randn(3, 5)
    # a linear layer keeps its input for the weight gradient
    assert mem.saved_tensor_bytes(lambda: lin(x).sum()) == 3 * 5 * 4
    # and its weight for the input's gradient, where the input needs one; weights can be left out (counted as weights)
    x.requires_grad_(True)
    assert mem.saved_tensor_bytes(lambda: lin(x).sum()) == 3 * 5 * 4 + 7 * 5 * 4
    assert mem.saved_tensor_bytes(lambda: lin(x).sum(), exclude=list(lin.parameters())) == 3 * 5 * 4


def accumulate_loss(dot, unet, batch, rt):
    with rt.autocast():
        pred = dot(unet, batch.x, batch.t, batch.anchor_x, batch.anchor_z, batch.anchor_t,
                   context=batch.context, backbone_call=rt.backbone_call(unet), lora_hooks=False,
                   sigma=batch.sigma, anchor_sigma=batch.anchor_sigma)
    return (pred - batch.target).pow(2).mean()


def test_activation_bytes_grow_linearly_with_the_batch_and_shrink_with_checkpointing():
    setup = tiny_setup()
    cfg = DotTrainConfig.of(**CFG, steps=1)
    dot, params = trainable_dot(setup, cfg)
    weights = list(setup.unet.parameters()) + list(dot.parameters())

    def measured(b, rt):
        (batch,) = tuples(setup, cfg, [b])

        def loss():
            return accumulate_loss(dot, setup.unet, batch, rt)

        return mem.saved_tensor_bytes(loss, exclude=weights)

    one, four = measured(1, CPU), measured(4, CPU)
    assert 3.5 * one < four < 4.5 * one, (one, four)
    with_ckpt = measured(4, runtimes.Runtime(torch.device("cpu"), grad_checkpointing=True))
    assert with_ckpt < 0.8 * four, (with_ckpt, four)


def test_the_run_estimate_adds_up_and_leaves_the_run_untouched():
    setup = tiny_setup()
    cfg = DotTrainConfig.of(**CFG, steps=1)
    torch.manual_seed(0)
    dot, lora = build_trainable(setup.unet, cfg)
    trainable = dot.light_parameters() + lora
    rng = torch.get_rng_state()
    est = estimate_memory(setup, dot, setup.unet, lora, trainable, cfg, CPU)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in trainable)
    lora_ids = {id(p) for p in lora}
    dash = sum(p.numel() * 4 for p in setup.unet.parameters() if id(p) not in lora_ids)
    n_train = sum(p.numel() for p in trainable)
    n_dot = sum(p.numel() for p in dot.parameters())
    n_lora = sum(p.numel() for p in lora)
    assert est.dash_bytes == dash
    assert est.train_bytes == 4 * (n_dot + n_lora + 3 * n_train)
    assert est.activation_bytes == est.activation_bytes_per_sample * CFG["batch_size"] > 0
    assert est.total_bytes == est.dash_bytes + est.train_bytes + est.activation_bytes
    line = est.line()
    assert line.startswith("memory estimate: Dash weights") and "estimate" in line and f"micro-batch of {CFG['batch_size']}" in line


def test_training_prints_the_estimate_before_it_starts(tmp_path, capsys):
    train_dot(tiny_setup(), DotTrainConfig.of(**CFG, steps=1), tmp_path / "s.safetensors", progress=True)
    assert "memory estimate: Dash weights" in capsys.readouterr().out


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_with_checkpointing_trains(tmp_path, precision):
    if precision == "bf16" and not runtimes.cuda_bf16(torch.device("cuda")):
        pytest.skip("this GPU has no bf16")
    rt = runtimes.resolve("cuda", precision, grad_checkpointing=True)
    setup = tiny_setup()
    result = train_dot(setup, DotTrainConfig.of(**dict(CFG, grad_accum=2), steps=4), tmp_path / "s.safetensors",
                       progress=True, runtime=rt)
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert all(p.is_cuda and p.dtype == torch.float32 for p in result.dot.parameters())
    if precision == "fp16":
        with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["extra"])["grad_scaler"]["scale"] > 0


# ---- the Dot's share of Dash's parameters -------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3])
def test_default_dot_is_at_most_a_tenth_of_an_sd15_sized_dash(m):
    """The project's UNet in SD1.5's layout (860M parameters), built on the meta device (no memory);
    ComfyUI's SD1.5 and SDXL UNets are checked the same way in tests/host/test_dot_share.py."""
    from training.bench_backbones import build_own

    with torch.device("meta"):
        unet = build_own("sd15")
    dash = sum(p.numel() for p in unet.parameters())
    assert dash > 8e8
    dot = PaperDot.build(unet, PaperDotConfig.for_backbone(unet, m=m))
    share = sum(p.numel() for p in dot.parameters()) / dash
    assert share <= 0.10, share
