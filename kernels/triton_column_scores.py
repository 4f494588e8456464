"""Triton kernel of `sea_edge::column_scores`: each query row's score against the mean key of each of its K
compressed columns (reference.column_scores_ref; layout in reference.py).

One program per (block of BLOCK_M query rows, query head). The keys' prefix sums P (B, Hkv, S + 1, D) fp32 are made
once by torch (one pass over k); a program gathers, for each tile of BLOCK_K columns, P at its rows' column starts
and ends, (BLOCK_M, BLOCK_K, D) each, and reduces q . (P[end] - P[start]) over D in registers. The row-dependent
column spans (a causal row's K columns split its own L = pos + 1 keys) make every (row, column) pair gather its own
rows of P, so this is not a tensor-core product; the gathers of neighbouring rows hit the same lines of P, which
stay in L2 (a query head's P is (S + 1) x D x 4 bytes: 17 MB at S = 65536, D = 64). Work: T * K * D multiply-adds
per head, the same as the estimate's own (T x K) products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _key_prefix

__all__ = ["column_scores_triton"]


@triton.jit
def _column_scores_fwd_kernel(
    Q, P, C, Out,
    T, S, K, H, G, scale,
    stride_qb, stride_qh, stride_qt,
    stride_pb, stride_ph, stride_ps,
    stride_cb,
    stride_ob, stride_oh, stride_ot,
    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G  # grouped-query heads: query head h reads key head h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    if CAUSAL:
        L = (S - T + 1 + rows).to(tl.int64)  # a causal row's K columns split its own keys [0, pos]
    else:
        L = tl.zeros([BLOCK_M], dtype=tl.int64) + S
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    p_base = P + b * stride_pb + hk * stride_ph
    for k0 in range(0, K, BLOCK_K):
        j = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        m2 = rmask[:, None] & (j < K)[None, :]  # (BLOCK_M, BLOCK_K)
        start = (j[None, :] * L[:, None]) // K  # int64: j * L passes 2^31 at long context
        end = ((j[None, :] + 1) * L[:, None]) // K
        m3 = m2[:, :, None] & dmask[None, None, :]
        pe = tl.load(p_base + end[:, :, None] * stride_ps + d[None, None, :], mask=m3, other=0.0)
        ps = tl.load(p_base + start[:, :, None] * stride_ps + d[None, None, :], mask=m3, other=0.0)
        dot = tl.sum(q[:, None, :] * (pe - ps), axis=2)  # (BLOCK_M, BLOCK_K)
        if HAS_VALID:
            n = (tl.load(C + b * stride_cb + end, mask=m2, other=0)
                 - tl.load(C + b * stride_cb + start, mask=m2, other=0)).to(tl.float32)
        else:
            n = (end - start).to(tl.float32)
        score = tl.where(n > 0, dot * scale / tl.maximum(n, 1.0), 0.0)
        tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + j[None, :], score, mask=m2)


def _column_scores_fwd(q, P, C, K: int, causal: bool, scale: float, block_m: int = 16, block_k: int = 16):
    B, H, T, D = q.shape
    S = P.shape[2] - 1
    out = torch.empty(B, H, T, K, device=q.device, dtype=torch.float32)
    q = q.contiguous()
    grid = (triton.cdiv(T, block_m), B * H)
    _column_scores_fwd_kernel[grid](
        Q=q, P=P, C=C if C is not None else P, Out=out,
        T=T, S=S, K=K, H=H, G=H // P.shape[1], scale=float(scale),
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_pb=P.stride(0), stride_ph=P.stride(1), stride_ps=P.stride(2),
        stride_cb=C.stride(0) if C is not None else 0,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        D=D, CAUSAL=bool(causal), HAS_VALID=C is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=triton.next_power_of_2(D),
    )
    return out


def column_scores_triton(q: torch.Tensor, k: torch.Tensor, K: int, causal: bool, scale: float,
                         key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """column_scores_ref on the GPU: (B, Hq, T, K) fp32."""
    P, C = _key_prefix(k, key_valid)
    return _column_scores_fwd(q, P.contiguous(), None if C is None else C.contiguous(), K, causal, scale)
