"""`sea_edge::sparse_attention`, the one attention op every SEA layer calls.

CPU implementation: the plain-torch reference. CUDA implementation: the Triton kernels of triton_sparse_attention.py, for
the forward op and for the backward op (which recomputes the forward's logsumexp in Triton, since the op's schema
returns only the output). triton is imported inside the CUDA implementations only, so `import sea_edge.kernels`
works without it. A fake (meta) implementation
lets torch.compile / torch.export trace it, and autograd is registered so the estimator can train through it.
Layout: see reference.py.
"""

from __future__ import annotations

import torch

from .reference import check_attention_shapes, sparse_attention_bwd_ref, sparse_attention_ref, sparse_index_ref

__all__ = ["sparse_attention", "sparse_index_op"]


@torch.library.custom_op("sea_edge::sparse_attention", mutates_args=())
def _sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    return sparse_attention_ref(q, k, v, idx, scale)


@_sparse_attention_op.register_kernel("cuda")
def _(q, k, v, idx, scale):
    from .triton_sparse_attention import sparse_attention_triton  # lazy: triton only where CUDA runs

    return sparse_attention_triton(q, k, v, idx, scale)


@_sparse_attention_op.register_fake
def _(q, k, v, idx, scale):
    return torch.empty_like(q)


@torch.library.custom_op("sea_edge::sparse_attention_bwd", mutates_args=())
def _sparse_attention_bwd_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = sparse_attention_bwd_ref(grad, q, k, v, idx, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_sparse_attention_bwd_op.register_kernel("cuda")
def _(grad, q, k, v, idx, scale):
    from .triton_sparse_attention import sparse_attention_triton_bwd

    return sparse_attention_triton_bwd(grad, q, k, v, idx, scale)


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
    check_attention_shapes(q, k, v, idx)
    return _sparse_attention_op(q, k, v, idx.to(torch.int32), float(scale))


@torch.library.custom_op("sea_edge::sparse_index", mutates_args=())
def _sparse_index_op(probs: torch.Tensor, key_valid: torch.Tensor | None, n_cols: int, head_cap: int, S: int,
                     causal: bool, n_keys: int, span: int) -> torch.Tensor:
    return sparse_index_ref(probs, n_cols, head_cap, S, causal, key_valid, n_keys or None, span)


@_sparse_index_op.register_kernel("cuda")
def _(probs, key_valid, n_cols, head_cap, S, causal, n_keys, span):
    from .mask import sparse_index  # lazy: triton only where CUDA runs

    return sparse_index(probs, n_cols, head_cap, S, causal, key_valid, n_keys or None, span)


@_sparse_index_op.register_fake
def _(probs, key_valid, n_cols, head_cap, S, causal, n_keys, span):
    B, H, T, K = probs.shape
    return probs.new_empty(B, H, T, torch.sym_min(head_cap, K) * span, dtype=torch.int32)


def sparse_index_op(probs: torch.Tensor, key_valid: torch.Tensor | None, n_cols: int, head_cap: int, S: int,
                    causal: bool, n_keys: int | None, span: int) -> torch.Tensor:
    """`sea_edge::sparse_index`: grouped top-k and interpolation (reference.sparse_index_ref; Triton on CUDA) as
    one op, so that graph capture (torch.export, ONNX) sees the mask construction as a single node with a known
    output shape (B, H, T, min(head_cap, K) * span) instead of data-dependent sorts. No gradient (top-k)."""
    return _sparse_index_op(probs, key_valid, n_cols, head_cap, S, causal, n_keys or 0, span)
