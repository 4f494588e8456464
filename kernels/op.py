"""`sea_edge::sparse_attention`, the one attention op every SEA layer calls.

CPU implementation: the plain-torch reference. CUDA implementation: the Triton kernel (filled in by
sparse_attention.py; until it is registered, CUDA falls back to the reference too). A fake (meta) implementation
lets torch.compile / torch.export trace it, and autograd is registered so the estimator can train through it.
Layout: see reference.py.
"""

from __future__ import annotations

import torch

from .reference import sparse_attention_ref

__all__ = ["sparse_attention"]


@torch.library.custom_op("sea_edge::sparse_attention", mutates_args=())
def _sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    return sparse_attention_ref(q, k, v, idx, scale)


@_sparse_attention_op.register_fake
def _(q, k, v, idx, scale):
    return torch.empty_like(q)


def _backward_ref(grad, q, k, v, idx, scale):
    """Backward through the reference (recomputes the forward): CPU path and the fallback."""
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        out = sparse_attention_ref(qq, kk, vv, idx, scale)
        return torch.autograd.grad(out, (qq, kk, vv), grad)


@torch.library.custom_op("sea_edge::sparse_attention_bwd", mutates_args=())
def _sparse_attention_bwd_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward_ref(grad, q, k, v, idx, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_sparse_attention_bwd_op.register_fake
def _(grad, q, k, v, idx, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, scale = inputs
    ctx.save_for_backward(q, k, v, idx)
    ctx.scale = scale


def _backward(ctx, grad):
    q, k, v, idx = ctx.saved_tensors
    dq, dk, dv = _sparse_attention_bwd_op(grad.contiguous(), q, k, v, idx, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("sea_edge::sparse_attention", _backward, setup_context=_setup_context)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each query row over the keys listed in `idx` (-1 = empty slot); see reference.py for the layout.

    q (B, Hq, T, D), k/v (B, Hkv, S, D), idx (B, Hq, T, w) int32. Returns (B, Hq, T, D) in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or idx.dim() != 4:
        raise ValueError(f"expected 4-d q, k, v, idx; got {q.dim()}, {k.dim()}, {v.dim()}, {idx.dim()}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if tuple(idx.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"idx {tuple(idx.shape)} must start with q's (B, Hq, T) = {tuple(q.shape[:3])}")
    return _sparse_attention_op(q, k, v, idx.to(torch.int32), float(scale))
