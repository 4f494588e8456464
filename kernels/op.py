"""`sea_edge::sparse_attention`, the one attention op every SEA layer calls.

CPU implementation: the plain-torch reference, or for rows of few slots over few keys the same function over all keys
(cpu_sparse_attention.py). CUDA implementation: the Triton kernels of triton_sparse_attention.py, for
the forward op and for the backward op (which recomputes the forward's logsumexp in Triton, since the op's schema
returns only the output). triton is imported inside the CUDA implementations only, so `import sea_edge.kernels`
works without it. A fake (meta) implementation
lets torch.compile / torch.export trace it, and autograd is registered so the estimator can train through it.
Layout: see reference.py.
"""

from __future__ import annotations

import torch

from .cpu_sparse_attention import sparse_attention_cpu, sparse_attention_cpu_bwd
from .reference import (
    check_attention_shapes,
    column_scores_bwd_ref,
    column_scores_ref,
    expand_columns_ref,
    select_columns_ref,
    sparse_attention_cols_ref,
    sparse_index_ref,
)

__all__ = ["column_scores", "select_columns_op", "sparse_attention", "sparse_attention_cols", "sparse_index_op"]


@torch.library.custom_op("sea_edge::sparse_attention", mutates_args=())
def _sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    return sparse_attention_cpu(q, k, v, idx, scale)


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
    return sparse_attention_cpu_bwd(grad, q, k, v, idx, scale)


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


@torch.library.custom_op("sea_edge::select_columns", mutates_args=())
def _select_columns_op(probs: torch.Tensor, n_cols: int, head_cap: int, S: int, causal: bool,
                       n_keys: int) -> torch.Tensor:
    return select_columns_ref(probs, n_cols, head_cap, S, causal, n_keys or None)


@_select_columns_op.register_kernel("cuda")
def _(probs, n_cols, head_cap, S, causal, n_keys):
    from .mask import select_columns  # lazy: triton only where CUDA runs

    return select_columns(probs, n_cols, head_cap, S, causal, n_keys or None)


@_select_columns_op.register_fake
def _(probs, n_cols, head_cap, S, causal, n_keys):
    B, H, T, K = probs.shape
    return probs.new_empty(B, H, T, torch.sym_min(head_cap, K), dtype=torch.int32)


def select_columns_op(probs: torch.Tensor, n_cols: int, head_cap: int, S: int, causal: bool,
                      n_keys: int | None) -> torch.Tensor:
    """`sea_edge::select_columns`: the grouped top-k alone (reference.select_columns_ref; Triton on CUDA).
    Returns cols (B, H, T, min(head_cap, K)) int32. No gradient (top-k)."""
    return _select_columns_op(probs, n_cols, head_cap, S, causal, n_keys or 0)


@torch.library.custom_op("sea_edge::sparse_attention_cols", mutates_args=())
def _sparse_attention_cols_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor,
                              key_valid: torch.Tensor | None, K: int, causal: bool, scale: float) -> torch.Tensor:
    return sparse_attention_cols_ref(q, k, v, cols, K, causal, scale, key_valid)


@_sparse_attention_cols_op.register_kernel("cuda")
def _(q, k, v, cols, key_valid, K, causal, scale):
    from .triton_sparse_attention import sparse_attention_cols_triton

    return sparse_attention_cols_triton(q, k, v, cols, K, causal, scale, key_valid)


@_sparse_attention_cols_op.register_fake
def _(q, k, v, cols, key_valid, K, causal, scale):
    return torch.empty_like(q)


@torch.library.custom_op("sea_edge::sparse_attention_cols_bwd", mutates_args=())
def _sparse_attention_cols_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  cols: torch.Tensor, key_valid: torch.Tensor | None, K: int, causal: bool,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = expand_columns_ref(cols, K, k.shape[2], causal, key_valid)
    return sparse_attention_cpu_bwd(grad, q, k, v, idx, scale)


@_sparse_attention_cols_bwd_op.register_kernel("cuda")
def _(grad, q, k, v, cols, key_valid, K, causal, scale):
    from .triton_sparse_attention import sparse_attention_cols_triton_bwd

    return sparse_attention_cols_triton_bwd(grad, q, k, v, cols, K, causal, scale, key_valid)


@_sparse_attention_cols_bwd_op.register_fake
def _(grad, q, k, v, cols, key_valid, K, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _cols_setup_context(ctx, inputs, output):
    q, k, v, cols, key_valid, K, causal, scale = inputs
    ctx.save_for_backward(q, k, v, cols, key_valid)
    ctx.K, ctx.causal, ctx.scale = K, causal, scale


def _cols_backward(ctx, grad):
    q, k, v, cols, key_valid = ctx.saved_tensors
    dq, dk, dv = _sparse_attention_cols_bwd_op(grad.contiguous(), q, k, v, cols, key_valid, ctx.K, ctx.causal,
                                               ctx.scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("sea_edge::sparse_attention_cols", _cols_backward, setup_context=_cols_setup_context)


def sparse_attention_cols(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor,
                          key_valid: torch.Tensor | None, K: int, causal: bool, scale: float) -> torch.Tensor:
    """`sea_edge::sparse_attention_cols`: attention of each query row over the keys its kept compressed columns
    cols (B, Hq, T, c) stand for (reference.column_spans; padding keys, key_valid (B, S) False, dropped). Equal to
    `sparse_attention(q, k, v, expand_columns_ref(cols, K, S, causal, key_valid), scale)`; on CUDA the Triton
    kernel plans its key blocks from cols directly, so the per-row key list idx is never built. Autograd as
    sparse_attention."""
    check_attention_shapes(q, k, v, cols)
    if key_valid is not None:
        key_valid = key_valid.to(torch.bool)
    return _sparse_attention_cols_op(q, k, v, cols.to(torch.int32), key_valid, int(K), bool(causal), float(scale))


@torch.library.custom_op("sea_edge::column_scores", mutates_args=())
def _column_scores_op(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, K: int, causal: bool,
                      scale: float) -> torch.Tensor:
    return column_scores_ref(q, k, K, causal, scale, key_valid)


@_column_scores_op.register_kernel("cuda")
def _(q, k, key_valid, K, causal, scale):
    from .triton_column_scores import column_scores_triton  # lazy: triton only where CUDA runs

    return column_scores_triton(q, k, K, causal, scale, key_valid)


@_column_scores_op.register_fake
def _(q, k, key_valid, K, causal, scale):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, K, dtype=torch.float32)


def _column_scores_setup_context(ctx, inputs, output):
    q, k, key_valid, K, causal, scale = inputs
    ctx.save_for_backward(q, k, key_valid)
    ctx.K, ctx.causal, ctx.scale = K, causal, scale


def _column_scores_backward(ctx, grad):
    q, k, key_valid = ctx.saved_tensors
    dq, dk = column_scores_bwd_ref(grad, q, k, ctx.K, ctx.causal, ctx.scale, key_valid)  # torch ops: any device
    return dq, dk, None, None, None, None


torch.library.register_autograd("sea_edge::column_scores", _column_scores_backward,
                                setup_context=_column_scores_setup_context)


def column_scores(q: torch.Tensor, k: torch.Tensor, K: int, causal: bool, scale: float,
                  key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """`sea_edge::column_scores`: scale * q . (mean valid key of each of the row's K compressed columns),
    (B, Hq, T, K) fp32, 0 for a column without a valid key (reference.column_scores_ref; Triton on CUDA). The queries
    are the last T of the S keys' positions. Differentiable in q and k."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B, Hq, T, D) and k (B, Hkv, S, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")
    if key_valid is not None:
        key_valid = key_valid.to(torch.bool)
    return _column_scores_op(q, k, key_valid, int(K), bool(causal), float(scale))
