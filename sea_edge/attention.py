"""One SEA attention layer given the teacher's own q, k, v (SEA.md steps 1-7).

    q (B, H, T, D) after RoPE; k, v (B, Hkv, S, D); the T queries are the last T of the S positions.

Nothing here materializes a (T x S) tensor: the estimate is (B, H, T, K), the mask is per-row key indices
(B, H, T, w) with w = head_cap * ceil(S / K), and attention runs through `sea_edge::sparse_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sea_edge.kernels as kernels
from sea_edge.kernels import column_spans, sparse_attention, sparse_index_ref

from .config import budget
from .estimator import EstimatorOutput, SEAEstimator

__all__ = ["sea_attention", "SEAState", "average_context"]


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


def average_context(v, probs, key_valid, causal: bool, n_heads: int) -> torch.Tensor:
    """The "average" context of SEA.md step 7. Causal: running mean of v over each query's visible keys.
    Bidirectional: v weighted by the mean estimated attention of the head's queries, spread over each column's keys.

    v (B, Hkv, S, D); probs (B, H, T, K); key_valid (B, S) bool or None. Returns (B, H, T, D), fp32.
    """
    B, Hkv, S, D = v.shape
    T, K = probs.shape[2], probs.shape[3]
    heads = torch.arange(n_heads, device=v.device) // (n_heads // Hkv)
    valid = torch.ones(B, S, device=v.device) if key_valid is None else key_valid.float()
    vv = v.float() * valid[:, None, :, None]
    if causal:
        num = vv[:, :, S - T :].cumsum(2) + vv[:, :, : S - T].sum(2, keepdim=True)  # (B, Hkv, T, D)
        cnt = valid[:, S - T :].cumsum(1) + valid[:, : S - T].sum(1, keepdim=True)  # (B, T)
        return (num / cnt.clamp(min=1)[:, None, :, None])[:, heads]
    # key s lies in the column j with floor(jS/K) <= s < floor((j+1)S/K), i.e. j = ceil((s+1)K/S) - 1
    s = torch.arange(S, device=v.device)
    col = torch.div((s + 1) * K + S - 1, S, rounding_mode="floor") - 1  # (S,)
    span_len = torch.bincount(col, minlength=K).clamp(min=1)  # keys per column
    w = probs.float().nan_to_num(0.0).mean(2)[..., col] / span_len[col]  # (B, H, S)
    w = w * valid[:, None, :]
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    ctx = torch.einsum("bhs,bhsd->bhd", w, vv[:, heads])
    return ctx[:, :, None, :].expand(B, n_heads, T, D)


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
    cfg = estimator.cfg
    B, H, T, D = q.shape
    S, K, causal = k.shape[2], estimator.K, estimator.causal
    selectable = selectable_columns(T, S, K, causal, q.device, key_valid)  # (T, K) or (B, 1, T, K)
    est = estimator(q, k, v, selectable, key_valid)  # logits (B, H, T, K)
    probs = torch.softmax(est.logits, dim=-1)  # P_hat, SEA.md step 3
    n_cols, head_cap, span = budget(cfg, H, S)
    with torch.no_grad():  # top-k is not differentiable (SEA.md, distillation)
        build = kernels.sparse_index if probs.is_cuda else sparse_index_ref  # Triton on GPU, same result
        # every row spends H*k keys: causal rows whose columns span fewer keys keep more columns
        idx = build(probs.detach(), n_cols, head_cap, S, causal, key_valid, n_keys=H * cfg.k,
                    span=span)  # (B, H, T, w), w = head_cap * span
    sparse = sparse_attention(q, k, v, idx, scale)  # (B, H, T, D)
    if cfg.mix:
        avg = average_context(v, probs, key_valid, causal, H)
        out = est.mix * est.gain * sparse.float() + (1.0 - est.mix) * avg
    else:
        out = sparse.float()
    out = out.to(q.dtype)
    state = SEAState(est, idx, sparse, out, q, k, v, scale, key_valid) if record else None
    return out, state
