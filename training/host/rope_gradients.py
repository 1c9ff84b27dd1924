"""Gradients for comfy_kitchen's RoPE ops, so that Dot training can backpropagate through ComfyUI's DiTs.

ComfyUI 0.8.0's Flux, HiDream, Lumina 2, Qwen-Image, Wan and Kandinsky 5 rotate their queries and keys with
``comfy_kitchen``'s custom ops ``apply_rope`` / ``apply_rope1``, which are inference-only: they have no autograd
formula, and a backward through them raises. The rollout trainer's loss flows through every Dash call after a fill
(Dash frozen, its activations not), so training a Dot on one of these DiTs needs that gradient. The rotation is
linear in the rotated tensor, so its gradient is the same rotation's transpose; here it is taken through a plain
torch copy of the rotation (the formula of ComfyUI's own fallback in ``comfy/ldm/flux/math.py``) and registered
with ``torch.library.register_autograd``, torch's public API for a custom op's gradient. Only the training process
registers it (``ComfyCheckpoint``); the ops' forward is untouched, and ComfyUI's sampling never needs it.
"""
from __future__ import annotations

import torch

OPS = ("comfy_kitchen::apply_rope", "comfy_kitchen::apply_rope1")
_registered = False


def rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The interleaved rotation ``apply_rope1`` computes, in differentiable torch (frequencies past x's sequence
    dropped, as comfy_kitchen's ``trim_rope_freqs`` does)."""
    if x.ndim > 2 and freqs_cis.ndim > 2 and x.shape[2] != 1 and freqs_cis.shape[2] > x.shape[2]:
        freqs_cis = freqs_cis[:, :, : x.shape[2]]
    pairs = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * pairs[..., 0]
    out.addcmul_(freqs_cis[..., 1], pairs[..., 1])  # as the op does: the same rounding
    return out.reshape(*x.shape).type_as(x)


def _rotation_vjp(shape, dtype, device, freqs_cis, grad):
    """The gradient of the rotation at ``grad`` (linear: taken at any point, here at zeros of the input's shape)."""
    if grad is None:
        return None
    with torch.enable_grad():
        x = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        (gx,) = torch.autograd.grad(rope1(x, freqs_cis.detach()), x, grad)
    return gx


def _setup_pair(ctx, inputs, output):
    xq, xk, freqs = inputs
    ctx.meta = [(t.shape, t.dtype, t.device) for t in (xq, xk)]
    ctx.save_for_backward(freqs)


def _backward_pair(ctx, grad_q, grad_k):
    (freqs,) = ctx.saved_tensors
    (sq, dq, vq), (sk, dk, vk) = ctx.meta
    return _rotation_vjp(sq, dq, vq, freqs, grad_q), _rotation_vjp(sk, dk, vk, freqs, grad_k), None


def _setup_one(ctx, inputs, output):
    x, freqs = inputs
    ctx.meta = (x.shape, x.dtype, x.device)
    ctx.save_for_backward(freqs)


def _backward_one(ctx, grad):
    (freqs,) = ctx.saved_tensors
    return _rotation_vjp(*ctx.meta, freqs, grad), None


def register_rope_gradients() -> bool:
    """Give comfy_kitchen's RoPE ops their gradient (once a process); False where comfy_kitchen is not installed
    (ComfyUI then uses its plain torch RoPE, which has one)."""
    global _registered
    if _registered:
        return True
    try:
        import comfy_kitchen  # noqa: F401  (registers the ops)
    except ImportError:
        return False
    torch.library.register_autograd(OPS[0], _backward_pair, setup_context=_setup_pair)
    torch.library.register_autograd(OPS[1], _backward_one, setup_context=_setup_one)
    _registered = True
    return True
