"""The weight fingerprint tells a fine-tune, a merge and a baked-in LoRA from the checkpoint a Dot was trained
on, while the same weights in another dtype (fp16, bf16, fp8) still match; files without the weight sample
keep loading on the older probe, marked weak."""
import pytest
import torch

from morse_engine.fingerprint import BackboneFingerprint, fingerprint_state_dict
from training.reference.unet import load_reference_dash


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    unet, _, _ = load_reference_dash()
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _fine_tune(state, share=0.10, seed=1):
    """Every tensor moved by zero-mean noise of ``share`` of its std (the issue's synthetic fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + share * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v)
            for k, v in state.items()}


def _merge(state, rank=8, share=0.05, seed=2):
    """A rank-``rank`` delta of ``share`` of each attention weight's scale, on the attention weights only."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for k, v in state.items():
        if ".attn" in k and k.endswith("weight") and v.dim() == 2:
            a, b = torch.randn(v.shape[0], rank, generator=g), torch.randn(rank, v.shape[1], generator=g)
            delta = a @ b
            out[k] = v + share * v.abs().mean() * delta / delta.abs().mean()
    return out


def test_a_fine_tune_and_a_merge_are_other_weights(state):
    base = fingerprint_state_dict(state)
    assert not base.weak and base.weights_match(fingerprint_state_dict(state))
    assert not fingerprint_state_dict(_fine_tune(state)).weights_match(base)
    merged = _merge(state)
    assert sum(not torch.equal(merged[k], state[k]) for k in state) > 0
    assert not fingerprint_state_dict(merged).weights_match(base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, getattr(torch, "float8_e4m3fn", None)])
def test_the_same_weights_in_another_dtype_match(state, dtype):
    if dtype is None:
        pytest.skip("this torch has no float8_e4m3fn")
    base = fingerprint_state_dict(state)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    assert fingerprint_state_dict(cast).weights_match(base)
    assert base.weights_match(fingerprint_state_dict(cast))


def test_a_file_without_the_sample_is_checked_by_the_older_probe_and_marked_weak(state):
    base = fingerprint_state_dict(state)
    old = BackboneFingerprint(base.architecture, base.weights)
    assert old.weak and base.weights_match(old) and old.weights_match(base)
    other = fingerprint_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()})
    assert not other.weights_match(old)
