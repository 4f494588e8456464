"""One SEA attention layer given the teacher's own q, k, v (SEA.md steps 1-7).

    q (B, H, T, D) after RoPE; k, v (B, Hkv, S, D); the T queries are the last T of the S positions.

Nothing here materializes a (T x S) tensor: the estimate is (B, H, T, K), the mask is per-row key indices
(B, H, T, w) with w = head_cap * ceil(S / K), and attention runs through `sea_edge::sparse_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sea_edge.kernels import (
    column_spans,
    mix_output_ref,
    select_columns_op,
    sparse_attention,
    sparse_attention_cols,
    sparse_index_op,
)
from sea_edge.kernels.reference import average_from_parts, column_means, cumsum_rows

from .config import budget
from .estimator import EstimatorOutput, SEAEstimator

__all__ = ["sea_attention", "sea_attention_step", "mask_geometry", "SEAState", "average_context"]


@dataclass
class SEAState:
    """What one layer's last forward produced, kept only while recording (distillation, evaluation)."""

    estimate: EstimatorOutput
    idx: torch.Tensor  # (B, H, T, w) kept key indices
    sparse: torch.Tensor  # (B, H, T, D) sparse context
    output: torch.Tensor  # (B, H, T, D) mixed output
    q: torch.Tensor  # (B, H, T, D) the layer's inputs, for the teacher's own attention (distillation targets)
    k: torch.Tensor  # (B, Hkv, S, D)
    v: torch.Tensor  # (B, Hkv, S, D)
    scale: float
    key_valid: torch.Tensor | None  # (B, S) bool


def selectable_columns(T: int, S: int, K: int, causal: bool, device, key_valid=None) -> torch.Tensor:
    """Compressed columns that hold at least one real key: (T, K) bool, or (B, 1, T, K) with padding.

    Causal rows shorter than K have empty columns; columns made only of padding keys hold nothing either, and
    masking them keeps the shared budget for real keys. Counted with a prefix sum over keys: linear memory.
    """
    start, end = column_spans(torch.arange(K, device=device).expand(T, K), K, S, causal)  # (T, K)
    if key_valid is None:
        return end > start
    csum = torch.nn.functional.pad(key_valid.to(torch.int32).cumsum(1), (1, 0))  # (B, S + 1)
    count = csum[:, end] - csum[:, start]  # (B, T, K) valid keys per column
    return (count > 0).unsqueeze(1)


def average_context(v, probs, key_valid, causal: bool, n_heads: int, col_mean=None) -> torch.Tensor:
    """The "average" context of SEA.md step 7. Causal: running mean of v over each query's visible keys.
    Bidirectional: v weighted by the mean estimated attention of the head's queries, spread over each column's keys.

    v (B, Hkv, S, D); probs (B, H, T, K); key_valid (B, S) bool or None; col_mean (B, H, K) or None: probs' mean
    over T (NaN rows as 0) when the caller has it already. Returns (B, H, T, D), fp32.
    """
    avg = average_from_parts(*_average_parts(v, probs, key_valid, causal, n_heads, col_mean), n_heads)
    return avg.expand(v.shape[0], n_heads, probs.shape[2], v.shape[3])


def _average_parts(v, probs, key_valid, causal: bool, n_heads: int, col_mean=None):
    """average_context in parts (num, cnt, group): head h's average is num[:, h // group] / max(cnt, 1), so that
    the output mix (kernels.mix_output_ref) divides and gathers heads on the way instead of in passes of its own.
    Causal: num (B, Hkv, T, D), cnt (B, T), group H / Hkv. Bidirectional: num (B, H, 1, D), no cnt, group 1."""
    B, Hkv, S, D = v.shape
    T, K = probs.shape[2], probs.shape[3]
    valid = torch.ones(B, S, device=v.device) if key_valid is None else key_valid.float()
    if causal:
        # The keys before the first query enter as one product (valid weights, 0 on the last T keys) @ v: it reads
        # the cache once and writes (B, Hkv, 1, D). Masking and slicing the whole cache instead wrote two copies of
        # it per layer, which in an exported decode step (T = 1) was 60% of the step at S = 4096 on the CPU.
        if v.is_cuda and key_valid is None and S == T:  # a whole prefill (never exported): no mask, no prior keys
            cnt = torch.arange(1, T + 1, device=v.device, dtype=torch.float32).expand(B, T)
            return cumsum_rows(v.float()), cnt, n_heads // Hkv  # cumsum_rows: a (T-stride 1) view
        last = v[:, :, S - T :].float() * valid[:, None, S - T :, None]  # (B, Hkv, T, D)
        prior = valid.masked_fill(torch.arange(S, device=v.device) >= S - T, 0.0)  # (B, S)
        num = cumsum_rows(last) + prior[:, None, None, :] @ v.float()  # (B, Hkv, T, D)
        cnt = valid[:, S - T :].cumsum(1) + prior.sum(1, keepdim=True)  # (B, T)
        return num, cnt, n_heads // Hkv
    heads = torch.arange(n_heads, device=v.device) // (n_heads // Hkv)
    if col_mean is None:
        col_mean = torch.nansum(probs.float(), 2) / T  # NaN rows (nothing selectable) as 0, without a copy
    if v.is_cuda and key_valid is None and S % K == 0:  # equal columns, no padding (never exported)
        return _equal_columns_context(v, col_mean, heads), None, 1
    vv = v.float() * valid[:, None, :, None]
    # key s lies in the column j with floor(jS/K) <= s < floor((j+1)S/K), i.e. j = ceil((s+1)K/S) - 1
    s = torch.arange(S, device=v.device)
    col = torch.div((s + 1) * K + S - 1, S, rounding_mode="floor") - 1  # (S,)
    start, end = column_spans(torch.arange(K, device=v.device).view(1, K), K, S, False)  # (1, K)
    span_len = (end - start).view(K).clamp(min=1)  # keys per column (no bincount: its size is data-dependent)
    w = col_mean[..., col] / span_len[col]  # (B, H, S)
    w = w * valid[:, None, :]
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    ctx = torch.einsum("bhs,bhsd->bhd", w, vv[:, heads])
    return ctx[:, :, None, :], None, 1


def _equal_columns_context(v, col_mean, heads) -> torch.Tensor:
    """The bidirectional average context (B, H, 1, D) when the K columns hold S / K keys each and none is padding:
    every key of column j weighs col_mean[j] / (S / K), so the context is sum_j col_mean[j] vmean[j] over
    sum_j col_mean[j], with vmean the columns' mean values (kernels.column_means: one fp32 reduction over v)
    instead of an fp32 copy of v, a (B, H, S) weight and a gather of v per query head."""
    w = col_mean / col_mean.sum(-1, keepdim=True).clamp(min=1e-30)  # (B, H, K)
    return torch.einsum("bhk,bhkd->bhd", w, column_means(v, None, col_mean.shape[-1])[:, heads])[:, :, None, :]


def mask_geometry(estimator: SEAEstimator, H: int, T: int, S: int, device, key_valid=None):
    """What the mask needs that depends only on the shapes and the padding, not on the layer: the selectable
    columns (T, K) or (B, 1, T, K) and the budget (n_cols, head_cap, span). A whole model computes it once."""
    K, causal = estimator.K, estimator.causal
    return selectable_columns(T, S, K, causal, device, key_valid), *budget(estimator.cfg, H, S)


def _sea(estimator: SEAEstimator, q, k, v, scale: float, key_valid, state, geometry=None, record=False):
    """Steps 1-7 for one layer: (output (B, H, T, D) in q's dtype, estimate, idx (None unless `record` on CUDA),
    sparse context)."""
    cfg = estimator.cfg
    B, H, T, D = q.shape
    S, causal, K = k.shape[2], estimator.causal, estimator.K
    if geometry is None:
        geometry = mask_geometry(estimator, H, T, S, q.device, key_valid)
    selectable, n_cols, head_cap, span = geometry
    # P_hat (SEA.md step 3), (B, H, T, K). Recording keeps the logits too (distillation and quality read them).
    est = estimator(q, k, v, selectable, key_valid, state, probs=not record)
    probs = est.probs if est.probs is not None else torch.softmax(est.logits, dim=-1)
    # top-k is not differentiable (SEA.md, distillation); every row spends H*k keys: causal rows whose columns
    # span fewer keys keep more columns.
    if q.is_cuda:
        # GPU: the mask stays compressed. The Triton kernel plans its key blocks from the kept columns (B, H, T, c)
        # directly; the per-row key list idx (c * S / K ints per row, 6.4 GB at T = 64k, k = 2048) is never built.
        cols = select_columns_op(probs.detach(), n_cols, head_cap, S, causal, H * cfg.k)  # (B, H, T, c)
        sparse = sparse_attention_cols(q, k, v, cols, key_valid, K, causal, scale)  # (B, H, T, D)
        idx = None
        if record:  # distillation / quality read the kept keys (Triton; this branch runs on CUDA only)
            from sea_edge.kernels import expand_columns

            idx = expand_columns(cols, K, S, causal, key_valid, span)
    else:
        # CPU and ONNX export: one mask op (a single node when exported) -> idx, the interface of the exported
        # sea_edge::SparseAttention node. Same keys as the GPU path (tests/test_kernels_cols.py).
        idx = sparse_index_op(probs.detach(), key_valid, n_cols, head_cap, S, causal, H * cfg.k, span)  # (B, H, T, w)
        sparse = sparse_attention(q, k, v, idx, scale)  # (B, H, T, D)
    if not cfg.mix:
        return sparse.to(q.dtype), est, idx, sparse
    num, cnt, group = _average_parts(v, probs, key_valid, causal, H, est.col_mean)
    if q.is_cuda and not torch.is_grad_enabled():  # one pass (kernels/triton_mix.py) instead of ~6 in torch
        from sea_edge.kernels import mix_output_triton

        return mix_output_triton(sparse, est.mix, est.gain, num, cnt, group, q.dtype), est, idx, sparse
    return mix_output_ref(sparse, est.mix, est.gain, num, cnt, group, q.dtype), est, idx, sparse


def sea_attention(
    estimator: SEAEstimator,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    record: bool = False,
) -> tuple[torch.Tensor, SEAState | None]:
    """SEA attention output (B, H, T, D) in q's dtype, and the layer's state when `record`."""
    out, est, idx, sparse = _sea(estimator, q, k, v, scale, key_valid, None, record=record)
    state = SEAState(est, idx, sparse, out, q, k, v, scale, key_valid) if record else None
    return out, state


def sea_attention_step(estimator: SEAEstimator, q, k, v, scale: float, key_valid=None, state=None, geometry=None):
    """Causal SEA attention that carries the estimator's state: the T queries are the last T of S positions and
    `state` (or None at the start) is what `sea_attention_step` returned after the first S - T positions. Returns
    (output (B, H, T, D), state after all S): a prefill followed by decode steps gives the rows a single prefill of
    the whole sequence gives, while each step reads only the new keys into the estimate (the cache is still read
    by the sparse attention and the average context). `geometry`: mask_geometry(), shared by a model's layers.

    The budget depends on the context length S (SEA.md step 4: k K / S columns per row), so rows equal those of
    one prefill of the whole sequence wherever that gives the same budget (same ceil(S / K))."""
    if not estimator.causal:
        raise ValueError("sea_attention_step is for causal models (bidirectional SEA has no decode state)")
    out, est, _, _ = _sea(estimator, q, k, v, scale, key_valid, state, geometry)
    return out, est.state
