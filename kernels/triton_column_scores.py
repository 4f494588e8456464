"""Triton kernel of `sea_edge::column_scores`: each query row's score against the mean key of each of its K
compressed columns (reference.column_scores_ref; layout in reference.py).

Bidirectional rows share their columns (L = S for every row): the K mean keys (B, Hkv, K, D) are one reduction over a
(K, S / K) view of the keys when K divides S (else from the keys' prefix sums P at the K + 1 boundaries), and the
scores are one GEMM, scale * q @ mean^T. No kernel of ours.

Causal rows split their own L = pos + 1 keys, so every row has its own boundaries b_j = floor(j L / K). Gathering
P (fp32) at both ends of every (row, column) pair, as the first kernel did, moved 2 * D * 4 bytes per pair through
L2: ~100 GB per layer at T = 65536, K = 256, 12 heads, 62 ms on an H100; this kernel takes 7.9 ms there
(kernels/NOTES.md). `_column_scores_fwd_kernel`
instead uses that a tile of BLOCK_M consecutive rows moves each boundary by less than BLOCK_M keys: with lo_j the
tile's first row's boundary, q . P[b_j] = q . P[lo_j] + sum over keys s in [lo_j, b_j) of q . k_s. One program per
(BLOCK_M rows, query head) walks the K boundaries; for each it loads P[lo_j] (one row, shared by the tile) and the
BLOCK_M keys after lo_j in the inputs' dtype (one coalesced tile), and takes the (BLOCK_M x BLOCK_M) products q . k on
tensor cores; each row sums its own prefix of them. The scores are differences of consecutive boundaries' sums
divided by the column's valid-key count. Traffic: T * K * D keys in the inputs' dtype per head (4x less than the
fp32 gathers at fp16), plus (BLOCK_M x window x D) multiply-adds per boundary on tensor cores. Boundary j moves by at
most floor(j (BLOCK_M - 1) / K) + 1 keys over a tile, so the first quarter of the boundaries take windows of
BLOCK_M / 4 keys and the second quarter BLOCK_M / 2 (at least 16, tl.dot's minimum): 32% fewer products at
BLOCK_M = 64. H100, T = 65536, K = 256, fp16: 9.38 -> 8.39 ms (12/12), 6.48 -> 5.72 ms (9/3): the kernel is bound by
its per-boundary steps more than by the products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _key_prefix, column_means

__all__ = ["column_scores_triton"]


# BLOCK_M 64: 63.6 ms causal layer at T = 65536 vs 67.3 at 32 and 73.1 at 16 (H100, results/sweep_layer_h100_2026-12-06.json)
_CFG = {"scores_block_m": 64, "scores_stages": 3, "scores_warps": 4}


@triton.jit
def _scores_steps(j_lo, j_hi, u_prev, b_prev, c_prev, q, qf, L, L0, p_base, k_base, o_base, C, Valid, b, rmask, S,
                  scale, stride_ps, stride_ks, stride_cb, stride_vb,
                  K: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr, WIN: tl.constexpr,
                  BLOCK_D: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    """Boundaries j_lo .. j_hi - 1, each moving by fewer than WIN keys over the tile's rows (the launcher's j ranges).
    Returns the carried (u, b, count) of the last boundary."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    win = tl.arange(0, WIN)
    # one boundary per step; the pipeliner prefetches the next steps' key windows (STAGES)
    for j in tl.range(j_lo, j_hi, num_stages=STAGES):  # boundary j ends column j - 1
        lo = (j * L0) // K  # K constexpr: a multiply and shift
        bj = (j * L) // K  # (BLOCK_M,)
        p = tl.load(p_base + lo * stride_ps + d, mask=dmask, other=0.0)  # (BLOCK_D,) fp32
        s = lo + win  # (WIN,) the keys after lo_j
        smask = s < S
        kw = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=smask[:, None] & dmask[None, :],
                     other=0.0)  # (WIN, BLOCK_D)
        if IEEE:
            qk = tl.dot(q, tl.trans(kw), input_precision="ieee")  # fp32 inputs: no TF32 rounding
        else:
            qk = tl.dot(q, tl.trans(kw))  # (BLOCK_M rows, WIN keys) fp32
        keep = s[None, :] < bj[:, None]
        if HAS_VALID:
            keep &= (tl.load(Valid + b * stride_vb + s, mask=smask, other=0) != 0)[None, :]
        u = tl.sum(qf * p[None, :], axis=1) + tl.sum(tl.where(keep, qk, 0.0), axis=1)
        if HAS_VALID:
            cb = tl.load(C + b * stride_cb + bj, mask=rmask, other=0)
            n = cb - c_prev
            c_prev = cb
        else:
            n = (bj - b_prev).to(tl.int64)
        score = tl.where(n > 0, (u - u_prev) * scale / tl.maximum(n, 1).to(tl.float32), 0.0)
        # one column per step: BLOCK_M strided 4-byte stores, merged in L2 (a program writes BLOCK_M x K x 4 bytes)
        tl.store(o_base + (j - 1), score, mask=rmask)
        u_prev = u
        b_prev = bj
    return u_prev, b_prev, c_prev


@triton.jit
def _column_scores_fwd_kernel(
    Q, Kk, P, C, Valid, Out,
    T, S, scale, J1, J2,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_pb, stride_ph, stride_ps,
    stride_cb, stride_vb,
    stride_ob, stride_oh, stride_ot,
    K: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    HAS_VALID: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, WIN1: tl.constexpr, WIN2: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G  # grouped-query heads: query head h reads key head h // G
    idx_t = tl.int64 if WIDE else tl.int32  # j * L stays below 2^31 unless K * S is huge (the wrapper decides)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    L = (S - T + 1 + rows).to(idx_t)  # (BLOCK_M,) a causal row's K columns split its own keys [0, pos]
    L0 = (S - T + 1 + pid_m * BLOCK_M).to(idx_t)  # the tile's first row
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + d[None, :],
                mask=rmask[:, None] & (d < D)[None, :], other=0.0)  # (BLOCK_M, BLOCK_D), the inputs' dtype
    qf = q.to(tl.float32)
    p_base = P + b * stride_pb + hk * stride_ph
    k_base = Kk + b * stride_kb + hk * stride_kh
    o_base = Out + b * stride_ob + h * stride_oh + rows * stride_ot  # (BLOCK_M,)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)  # q . P[b_0], b_0 = 0
    bp = tl.zeros([BLOCK_M], dtype=idx_t)
    cp = tl.zeros([BLOCK_M], dtype=tl.int64)
    # Boundary j moves by at most floor(j (BLOCK_M - 1) / K) + 1 keys over the tile: the first boundaries need
    # narrower key windows (WIN1 up to J1, WIN2 up to J2, BLOCK_M after), so fewer products run on tensor cores
    u, bp, cp = _scores_steps(1, J1 + 1, u, bp, cp, q, qf, L, L0, p_base, k_base, o_base, C, Valid, b, rmask, S,
                              scale, stride_ps, stride_ks, stride_cb, stride_vb,
                              K, HAS_VALID, IEEE, WIN1, BLOCK_D, D, STAGES)
    u, bp, cp = _scores_steps(J1 + 1, J2 + 1, u, bp, cp, q, qf, L, L0, p_base, k_base, o_base, C, Valid, b, rmask,
                              S, scale, stride_ps, stride_ks, stride_cb, stride_vb,
                              K, HAS_VALID, IEEE, WIN2, BLOCK_D, D, STAGES)
    _scores_steps(J2 + 1, K + 1, u, bp, cp, q, qf, L, L0, p_base, k_base, o_base, C, Valid, b, rmask, S,
                  scale, stride_ps, stride_ks, stride_cb, stride_vb,
                  K, HAS_VALID, IEEE, BLOCK_M, BLOCK_D, D, STAGES)


def _last_boundary(win: int, bm: int, K: int) -> int:
    """The last boundary j whose move over a tile of bm rows, at most floor(j (bm - 1) / K) + 1 keys, fits win."""
    return K if bm == 1 else min(K, (win * K - 1) // (bm - 1))


def _column_scores_fwd(q, k, P, C, key_valid, K: int, scale: float):
    """Causal rows: the tiled kernel above."""
    B, H, T, D = q.shape
    S = P.shape[2] - 1
    out = torch.empty(B, H, T, K, device=q.device, dtype=torch.float32)
    q, k = q.contiguous(), k.to(q.dtype).contiguous()
    bm = _CFG["scores_block_m"]
    win1, win2 = max(16, bm // 4), max(16, bm // 2)  # tl.dot needs 16 keys at least
    valid = key_valid.contiguous().view(torch.uint8) if key_valid is not None else None
    grid = (triton.cdiv(T, bm), B * H)
    _column_scores_fwd_kernel[grid](
        Q=q, Kk=k, P=P, C=C if C is not None else P, Valid=valid if valid is not None else P, Out=out,
        T=T, S=S, scale=float(scale), J1=_last_boundary(win1, bm, K), J2=_last_boundary(win2, bm, K),
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ks=k.stride(2),
        stride_pb=P.stride(0), stride_ph=P.stride(1), stride_ps=P.stride(2),
        stride_cb=C.stride(0) if C is not None else 0, stride_vb=valid.stride(0) if valid is not None else 0,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        K=K, H=H, G=H // P.shape[1], D=D, HAS_VALID=C is not None, IEEE=q.dtype == torch.float32,
        WIDE=K * (S + bm) >= 2**31, BLOCK_M=bm, BLOCK_D=max(16, triton.next_power_of_2(D)),
        STAGES=_CFG["scores_stages"], WIN1=win1, WIN2=win2, num_warps=_CFG["scores_warps"],
    )
    return out


def _column_scores_shared(q, k, key_valid, K: int, scale: float):
    """Bidirectional rows: every row has the same K columns of S keys, so the scores are q against the K mean keys,
    one GEMM (fp32; TF32 where torch allows it)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    mean = column_means(k, key_valid, K)  # (B, Hkv, K, D)
    out = q.float().contiguous().view(B, Hkv, (H // Hkv) * T, D) @ mean.transpose(-1, -2)  # (B, Hkv, g*T, K)
    return out.mul_(scale).view(B, H, T, K)


def column_scores_triton(q: torch.Tensor, k: torch.Tensor, K: int, causal: bool, scale: float,
                         key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """column_scores_ref on the GPU: (B, Hq, T, K) fp32."""
    if not causal:
        return _column_scores_shared(q, k, key_valid, K, scale)
    P, C = _key_prefix(k, key_valid)
    P, C = P.contiguous(), None if C is None else C.contiguous()
    return _column_scores_fwd(q, k, P, C, key_valid, K, scale)
