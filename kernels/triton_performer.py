"""Triton kernels of a SEA estimator's query side: Performer features of q, their product with the keys' state,
the normalisation by its last column, the concatenation with q / |q| and the encoder's input LayerNorm, in one pass
over q. Bidirectional: reference.performer_query_ref; causal: reference.performer_causal_ref (layout in
reference.py).

Why: in eager torch these are ~10 passes over (B, H, T, m) and (B, H, T, 2D + E) fp32 tensors (m = 266 features for
D = 64: the features alone are 837 MB at T = 65536 and 12 heads), ~8 ms of the 28 ms bidirectional layer at that
length on an H100 (kernels/NOTES.md). Here one program per (BLOCK_T rows, head) holds its rows' q, walks the m
features in chunks of BLOCK_F (phi = exp(x_hat . w - sqrt(D) / 2) in registers, then phi @ kv[chunk] on tensor
cores into a (BLOCK_T, D + E + 1) accumulator), and writes only the normalised encoder input: q is read once and
(2D + E) fp32 values per row are written once. kv (m x (D + E + 1) per head, 205 KB fp32 at E = 128) is read from
L2 by every program. Products run in fp32 ("ieee") unless torch allows TF32 matmuls, as torch's own path would.

Causal rows see only the keys up to their own position, so the state differs per row. The keys are cut into chunks
of CHUNK: `_performer_chunk_state_kernel` writes each chunk's (m x W) state sum phi(k)^T [v, eye, 1] (the keys'
features and values built in registers, never stored), an in-place torch cumsum turns them into the state before
each chunk, and `_performer_causal_ctx_kernel` adds to phi(q) @ (that state) the chunk's own earlier keys,
(phi(q) phi(k)^T, lower triangle) @ [v, eye, 1], in blocks of columns (so its accumulator stays (BLOCK_T x 128) at
E = 256, and blocks of eye columns a tile cannot reach yet are skipped), and divides by the last column;
`_performer_encoder_input_kernel` then normalises each row in place. The torch path
(reference.causal_linear_attention_ref) does the same algebra in ~15 eager passes over T x m and T x W tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import PERFORMER_CLAMP

__all__ = ["performer_causal_triton", "performer_kv_triton", "performer_query_triton"]

_CFG = {"performer_block_t": 32, "performer_block_f": 32, "performer_warps": 4,  # sea_edge.bench_layer --sweep
        "causal_chunk": 128, "causal_block_t": 32, "causal_warps": 4, "state_block_s": 32, "state_warps": 4,
        "state_block_w": 64, "kv_keys": 2048,
        # the causal query side's ctx columns per program (None: all D + E in one program, padded to a power of 2).
        # Layer at 64k, 12/12, H100: 55.8 ms at 128, 62.0 at None, 67.1 at 64 (each block recomputes phi(q))
        "causal_block_w": 128,
        # None: the whole padded state row per program, as measured in the bidirectional layer (H100, 2026-12-06)
        "kv_block_w": None,
        # the causal estimator's route (sea_edge/estimator.py): these kernels (True) or the torch path (False). On:
        # the layer at 64k, 12/12 heads, 57.2 ms against 63.3 ms, peak 4628 against 12418 MiB (H100, 2026-12-06)
        "causal_fused": True}


@triton.jit
def _unit_rows(x, q_scale):
    """Rows of x (fp32) scaled to unit norm (F.normalize), and to norm D^(1/4) (the features' input)."""
    xn = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
    return xn, xn * q_scale


@triton.jit
def _features(xt, Proj, f0, M, z_shift, clamp,
              D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """phi = exp(xt . w_f - sqrt(D) / 2) for the BLOCK_F features from f0 (0 past M): (rows, BLOCK_F) fp32."""
    f = f0 + tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    fmask = f < M
    pw = tl.load(Proj + f[:, None] * D + d[None, :], mask=fmask[:, None] & (d < D)[None, :], other=0.0)
    if IEEE:
        z = tl.dot(xt, tl.trans(pw), input_precision="ieee")  # (rows, BLOCK_F)
    else:
        z = tl.dot(xt, tl.trans(pw))
    return tl.where(fmask[None, :], tl.exp(tl.minimum(z - z_shift, clamp)), 0.0)


@triton.jit
def _state_rows(st_base, f0, M, stride_m, W, BLOCK_F: tl.constexpr, BLOCK_W: tl.constexpr):
    """Rows f0 .. f0 + BLOCK_F of an (m x W) fp32 state at st_base (row stride stride_m), zero past m and W."""
    f = f0 + tl.arange(0, BLOCK_F)
    w = tl.arange(0, BLOCK_W)
    return tl.load(st_base + f[:, None] * stride_m + w[None, :], mask=(f < M)[:, None] & (w < W)[None, :], other=0.0)


@triton.jit
def _state_col(col_base, f0, M, stride_m, BLOCK_F: tl.constexpr):
    """Entries f0 .. f0 + BLOCK_F of one column of an (m x W) fp32 state (col_base: the column's first entry)."""
    f = f0 + tl.arange(0, BLOCK_F)
    return tl.load(col_base + f * stride_m, mask=f < M, other=0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _store_encoder_input(acc, qn, LnW, LnB, o_rows, rmask, eps,
                         D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    """ctx = acc[:, :-1] / acc[:, -1], then LayerNorm([ctx, qn]) over its 2D + E values, stored at o_rows (row
    pointers)."""
    W: tl.constexpr = D + E + 1
    F: tl.constexpr = 2 * D + E
    w = tl.arange(0, BLOCK_W)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    cmask = (w < W - 1)[None, :]
    den = tl.sum(tl.where(w[None, :] == W - 1, acc, 0.0), axis=1)  # (rows,) last column: phi(q) . sum phi(k)
    ctx = tl.where(cmask, acc / tl.maximum(den, 1e-30)[:, None], 0.0)
    mean = (tl.sum(ctx, axis=1) + tl.sum(qn, axis=1)) / F
    dc = tl.where(cmask, ctx - mean[:, None], 0.0)
    dq = tl.where(dmask[None, :], qn - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(dc * dc, axis=1) + tl.sum(dq * dq, axis=1)) / F + eps)
    lw = tl.load(LnW + w, mask=w < W - 1, other=0.0)
    lb = tl.load(LnB + w, mask=w < W - 1, other=0.0)
    tl.store(o_rows[:, None] + w[None, :], dc * rstd[:, None] * lw[None, :] + lb[None, :], mask=rmask[:, None] & cmask)
    lw = tl.load(LnW + (W - 1) + d, mask=dmask, other=0.0)
    lb = tl.load(LnB + (W - 1) + d, mask=dmask, other=0.0)
    tl.store(o_rows[:, None] + (W - 1) + d[None, :], dq * rstd[:, None] * lw[None, :] + lb[None, :],
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _performer_query_fwd_kernel(
    Q, Proj, KV, LnW, LnB, Out,
    T, M, eps, q_scale, z_shift, clamp,
    stride_qb, stride_qh, stride_qt,
    stride_kvb, stride_kvh, stride_kvm,
    stride_ob, stride_oh, stride_ot,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G  # query head h reads the keys' state of head h // G
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_D)
    qn, xt = _unit_rows(q, q_scale)
    W: tl.constexpr = D + E + 1
    acc = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)  # num = phi(q) @ kv
    kv_base = KV + b * stride_kvb + hk * stride_kvh
    for f0 in range(0, M, BLOCK_F):
        phi = _features(xt, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
        acc = _dot(phi, _state_rows(kv_base, f0, M, stride_kvm, W, BLOCK_F, BLOCK_W), acc, IEEE)
    _store_encoder_input(acc, qn, LnW, LnB, Out + b * stride_ob + h * stride_oh + rows * stride_ot, rmask, eps,
                         D, E, BLOCK_D, BLOCK_W)


@triton.jit
def _values(v_rows, s, smask, pos0, L, w0, D: tl.constexpr, E: tl.constexpr, BLOCK_W: tl.constexpr):
    """Columns w0 .. w0 + BLOCK_W of [v, eye, 1] of the keys s (rows, BLOCK_W) fp32: v_rows are the keys' row
    pointers into V; the eye is the one-hot of column min((pos0 + s) * E // L, E - 1)."""
    w = w0 + tl.arange(0, BLOCK_W)
    vv = tl.load(v_rows[:, None] + w[None, :], mask=smask[:, None] & (w < D)[None, :], other=0.0).to(tl.float32)
    col = tl.minimum(((pos0 + s).to(tl.int64) * E) // L, E - 1)
    one = (w[None, :] == (D + col)[:, None]) | (w[None, :] == D + E)
    return tl.where(one & smask[:, None], 1.0, vv)


@triton.jit
def _key_rows(k_rows, s, smask, Valid, HAS_VALID: tl.constexpr, q_scale,
              D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The keys s scaled to norm D^(1/4) (rows, BLOCK_D) fp32, and which of them count (in range, valid)."""
    d = tl.arange(0, BLOCK_D)
    kt = tl.load(k_rows[:, None] + d[None, :], mask=smask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    _, xk = _unit_rows(kt, q_scale)
    keep = smask
    if HAS_VALID:
        keep &= tl.load(Valid + s, mask=smask, other=0) != 0
    return xk, keep


@triton.jit
def _performer_chunk_state_kernel(
    Kk, V, Valid, Proj, Buf,
    T, M, L, pos0, q_scale, z_shift, clamp,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_valb,
    stride_bb, stride_bh, stride_bn, stride_bm,
    HKV: tl.constexpr, D: tl.constexpr, E: tl.constexpr, HAS_VALID: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, IEEE: tl.constexpr,
):
    """Buf[b, hk, n + 1, f-block, w-block] = sum over the chunk's keys s of phi_f(k_s)^T [v_s, eye_s, 1]_w: one
    program per (chunk, head, feature block, BLOCK_W columns), so the accumulator stays (BLOCK_F x BLOCK_W)."""
    n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    nf = tl.cdiv(M, BLOCK_F)
    f0 = (tl.program_id(2) % nf) * BLOCK_F
    w0 = (tl.program_id(2) // nf) * BLOCK_W
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    W: tl.constexpr = D + E + 1
    w = w0 + tl.arange(0, BLOCK_W)
    f = f0 + tl.arange(0, BLOCK_F)
    acc = tl.zeros([BLOCK_F, BLOCK_W], dtype=tl.float32)
    # Each key has one eye column, and the columns grow with the position: the chunk's keys reach only the eye
    # columns [col(first key), col(last key)]. A block of eye columns alone outside them stays zero, so its program
    # skips the keys (at the default E = 256, W = 321 in 64-wide blocks, 3 or 4 of the 6 blocks do work: v, the
    # block of the last column, and the one or two eye blocks the chunk reaches).
    s_lo = n * CHUNK
    c_lo = tl.minimum(((pos0 + s_lo).to(tl.int64) * E) // L, E - 1)
    c_hi = tl.minimum(((pos0 + tl.minimum(s_lo + CHUNK, T) - 1).to(tl.int64) * E) // L, E - 1)
    idle = (w0 >= D) & (w0 + BLOCK_W <= D + E) & ((w0 + BLOCK_W <= D + c_lo) | (w0 > D + c_hi))
    for s0 in range(s_lo, tl.where(idle, s_lo, s_lo + CHUNK), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < T
        xk, keep = _key_rows(Kk + b * stride_kb + hk * stride_kh + s * stride_ks, s, smask,
                             Valid + b * stride_valb, HAS_VALID, q_scale, D, BLOCK_D)
        phi = tl.where(keep[:, None], _features(xk, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE), 0.0)
        vals = _values(V + b * stride_vb + hk * stride_vh + s * stride_vs, s, smask, pos0, L, w0, D, E, BLOCK_W)
        acc = _dot(tl.trans(phi), vals, acc, IEEE)  # (BLOCK_F, BLOCK_W)
    tl.store(Buf + b * stride_bb + hk * stride_bh + (n + 1) * stride_bn + f[:, None] * stride_bm + w[None, :], acc,
             mask=(f < M)[:, None] & (w < W)[None, :])


@triton.jit
def _performer_causal_ctx_kernel(
    Q, Kk, V, Valid, Proj, Buf, Out,
    T, M, L, pos0, q_scale, z_shift, clamp,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_valb,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_ob, stride_oh, stride_ot,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, E: tl.constexpr, HAS_VALID: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr, IEEE: tl.constexpr,
):
    """ctx columns w0 .. w0 + BLOCK_W (of the D + E before the normaliser) for the rows t of a tile in chunk n:
    num_t = phi(q_t) @ (the state before chunk n, Buf[n]) plus, over the chunk's keys s <= t,
    (phi(q_t) . phi(k_s)) [v_s, eye_s]; ctx = num / den with den the same sums over the state's last column (the
    keys' phi). Written into Out's first D + E columns; _performer_encoder_input_kernel normalises them."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    w0 = tl.program_id(2) * BLOCK_W
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    t0 = pid_t * BLOCK_T
    rows = t0 + tl.arange(0, BLOCK_T)
    rmask = rows < T
    w = tl.arange(0, BLOCK_W)
    o_rows = Out + b * stride_ob + h * stride_oh + rows * stride_ot
    W: tl.constexpr = D + E + 1
    # The eye columns grow with the position: the tile's rows reach none past col(its last row). A block of such
    # columns alone is zero (at the default E = 256 in 128-wide blocks: the last of 3 blocks over the first 3/4 of
    # the L positions, the middle one over the first 1/4).
    c_hi = tl.minimum(((pos0 + tl.minimum(t0 + BLOCK_T, T) - 1).to(tl.int64) * E) // L, E - 1)
    if w0 > D + c_hi:
        tl.store(o_rows[:, None] + w0 + w[None, :], tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32),
                 mask=rmask[:, None] & (w0 + w < W - 1)[None, :])
    else:
        d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + d[None, :],
                    mask=rmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        _, xt = _unit_rows(q, q_scale)
        c0 = (t0 // CHUNK) * CHUNK  # the tile's chunk starts here (BLOCK_T divides CHUNK)
        st_base = Buf + b * stride_bb + hk * stride_bh + (t0 // CHUNK) * stride_bn
        acc = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)
        den = tl.zeros([BLOCK_T], dtype=tl.float32)
        k_base = Kk + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        if CHUNK == BLOCK_T:  # the tile is the chunk: one pass over the features serves the state and the diagonal
            s = rows
            xk, keep = _key_rows(k_base + s * stride_ks, s, rmask, Valid + b * stride_valb, HAS_VALID, q_scale,
                                 D, BLOCK_D)
            sc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
            for f0 in range(0, M, BLOCK_F):
                phi = _features(xt, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
                acc = _dot(phi, _state_rows(st_base + w0, f0, M, stride_bm, W - 1 - w0, BLOCK_F, BLOCK_W), acc, IEEE)
                den += tl.sum(phi * _state_col(st_base + W - 1, f0, M, stride_bm, BLOCK_F)[None, :], axis=1)
                phi_k = _features(xk, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
                sc = _dot(phi, tl.trans(phi_k), sc, IEEE)
            sc = tl.where((s[None, :] <= rows[:, None]) & keep[None, :], sc, 0.0)
            den += tl.sum(sc, axis=1)
            acc = _dot(sc, _values(v_base + s * stride_vs, s, rmask, pos0, L, w0, D, E, BLOCK_W), acc, IEEE)
        else:
            for f0 in range(0, M, BLOCK_F):  # keys of earlier chunks (and before pos0): one (m x W) state
                phi = _features(xt, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
                acc = _dot(phi, _state_rows(st_base + w0, f0, M, stride_bm, W - 1 - w0, BLOCK_F, BLOCK_W), acc, IEEE)
                den += tl.sum(phi * _state_col(st_base + W - 1, f0, M, stride_bm, BLOCK_F)[None, :], axis=1)
            for s0 in range(c0, t0 + BLOCK_T, BLOCK_T):  # keys of this chunk up to the tile's last row
                s = s0 + tl.arange(0, BLOCK_T)
                smask = s < T
                xk, keep = _key_rows(k_base + s * stride_ks, s, smask, Valid + b * stride_valb, HAS_VALID, q_scale,
                                     D, BLOCK_D)
                sc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
                for f0 in range(0, M, BLOCK_F):
                    phi_q = _features(xt, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
                    phi_k = _features(xk, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
                    sc = _dot(phi_q, tl.trans(phi_k), sc, IEEE)
                sc = tl.where((s[None, :] <= rows[:, None]) & keep[None, :], sc, 0.0)
                den += tl.sum(sc, axis=1)
                acc = _dot(sc, _values(v_base + s * stride_vs, s, smask, pos0, L, w0, D, E, BLOCK_W), acc, IEEE)
        tl.store(o_rows[:, None] + w0 + w[None, :], acc / tl.maximum(den, 1e-30)[:, None],
                 mask=rmask[:, None] & (w0 + w < W - 1)[None, :])


@triton.jit
def _performer_encoder_input_kernel(
    Q, LnW, LnB, Out, T, eps,
    stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """In place: Out's rows [ctx, .] -> LayerNorm([ctx, q / |q|]) (_store_encoder_input, with den = 1)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + d[None, :],
                mask=rmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    qn, _ = _unit_rows(q, 1.0)
    W: tl.constexpr = D + E + 1
    w = tl.arange(0, BLOCK_W)
    o_rows = Out + b * stride_ob + h * stride_oh + rows * stride_ot
    ctx = tl.load(o_rows[:, None] + w[None, :], mask=rmask[:, None] & (w < W - 1)[None, :], other=0.0)
    _store_encoder_input(tl.where((w == W - 1)[None, :], 1.0, ctx), qn, LnW, LnB, o_rows, rmask, eps,
                         D, E, BLOCK_D, BLOCK_W)


def performer_query_triton(q, proj, kv, ln_w, ln_b, eps: float = 1e-5):
    """reference.performer_query_ref in one Triton launch (inference: no autograd): (B, H, T, 2D + E) fp32."""
    B, H, T, D = q.shape
    if kv.dim() != 4 or kv.shape[0] != B or H % kv.shape[1]:
        raise ValueError(f"kv must be (B, Hkv, m, D + E + 1) with H = {H} a multiple of Hkv, got {tuple(kv.shape)}")
    Hkv, M, W = kv.shape[1:]
    E = W - D - 1
    if tuple(proj.shape) != (M, D) or E < 0:
        raise ValueError(f"proj must be (m, D) = {(M, D)} and kv's last dim D + E + 1 > D, got {tuple(proj.shape)}, "
                         f"{tuple(kv.shape)}")
    if ln_w.numel() != 2 * D + E:
        raise ValueError(f"LayerNorm width {ln_w.numel()} != 2D + E = {2 * D + E}")
    f32 = (lambda t: t.detach().to(device=q.device, dtype=torch.float32).contiguous())
    q, proj, kv = q.contiguous(), f32(proj), f32(kv)
    out = torch.empty(B, H, T, 2 * D + E, device=q.device, dtype=torch.float32)
    bt = _CFG["performer_block_t"]
    grid = (triton.cdiv(T, bt), B * H)
    ieee = not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32)  # as torch's own fp32 matmuls would
    _performer_query_fwd_kernel[grid](
        Q=q, Proj=proj, KV=kv, LnW=f32(ln_w), LnB=f32(ln_b), Out=out,
        T=T, M=M, eps=float(eps), q_scale=D**0.25, z_shift=0.5 * math.sqrt(D), clamp=PERFORMER_CLAMP,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kvb=kv.stride(0), stride_kvh=kv.stride(1), stride_kvm=kv.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        H=H, G=H // Hkv, D=D, E=E, BLOCK_T=bt, BLOCK_F=_CFG["performer_block_f"],
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_W=triton.next_power_of_2(W), IEEE=ieee,
        num_warps=_CFG["performer_warps"],
    )
    return out


def performer_causal_triton(q, k, v, proj, state0, ln_w, ln_b, eps: float, E: int, L: int, pos0: int,
                            key_valid=None):
    """reference.performer_causal_ref in three launches (inference: no autograd): the chunks' key states (Triton),
    their exclusive prefix sum in place (torch cumsum), and the query side (Triton). Returns x (B, H, T, 2D + E)
    and the state after the last key (B, Hkv, m, D + E + 1), fp32."""
    B, H, T, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or H % k.shape[1] or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, Hkv, T, D) = ({B}, Hkv, {T}, {D}) with H = {H} a multiple of Hkv, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    Hkv, M, W = k.shape[1], proj.shape[0], D + E + 1
    if tuple(proj.shape) != (M, D):
        raise ValueError(f"proj must be (m, D) with D = {D}, got {tuple(proj.shape)}")
    if tuple(state0.shape) != (B, Hkv, M, W):
        raise ValueError(f"state0 must be (B, Hkv, m, D + E + 1) = {(B, Hkv, M, W)}, got {tuple(state0.shape)}")
    if ln_w.numel() != 2 * D + E:
        raise ValueError(f"LayerNorm width {ln_w.numel()} != 2D + E = {2 * D + E}")
    if key_valid is not None and tuple(key_valid.shape) != (B, T):
        raise ValueError(f"key_valid must be (B, T) = {(B, T)}, got {tuple(key_valid.shape)}")
    f32 = (lambda t: t.detach().to(device=q.device, dtype=torch.float32).contiguous())
    q, k, v, proj = q.contiguous(), k.contiguous(), v.contiguous(), f32(proj)
    chunk, bt = _CFG["causal_chunk"], _CFG["causal_block_t"]
    if chunk % bt:
        raise ValueError(f"causal_chunk {chunk} must be a multiple of causal_block_t {bt}")
    N = triton.cdiv(T, chunk)
    buf = torch.empty(B, Hkv, N + 1, M, W, device=q.device, dtype=torch.float32)  # [state0, chunk 0, ..., N - 1]
    buf[:, :, 0] = state0
    common = _chunk_states(k, v, proj, key_valid, E, L, pos0, chunk, buf, _CFG["state_block_w"])
    buf.cumsum_(2)  # buf[n] = state0 + chunks 0 .. n - 1: what precedes chunk n; buf[N] covers every key
    out = torch.empty(B, H, T, 2 * D + E, device=q.device, dtype=torch.float32)
    bw = _block_width(_CFG["causal_block_w"], W - 1)
    _performer_causal_ctx_kernel[(triton.cdiv(T, bt), B * H, triton.cdiv(W - 1, bw))](
        Q=q, Kk=k, V=v, Proj=proj, Buf=buf, Out=out,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        H=H, G=H // Hkv, BLOCK_T=bt, BLOCK_W=bw, num_warps=_CFG["causal_warps"], **common)
    _performer_encoder_input_kernel[(triton.cdiv(T, 16), B * H)](
        Q=q, LnW=f32(ln_w), LnB=f32(ln_b), Out=out, T=T, eps=float(eps),
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        H=H, D=D, E=int(E), BLOCK_T=16, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_W=triton.next_power_of_2(W), num_warps=4)
    return out, buf[:, :, N].clone()


def _block_width(setting: int | None, n: int) -> int:
    """Columns per program for n columns: the launch setting, None meaning all n (padded to a power of 2)."""
    return min(setting or triton.next_power_of_2(n), triton.next_power_of_2(n))


def _chunk_states(k, v, proj, key_valid, E: int, L: int, pos0: int, chunk: int, buf, block_w: int | None) -> dict:
    """Launch _performer_chunk_state_kernel: buf[:, :, n + 1] = the state sum of keys [n chunk, (n + 1) chunk), in
    blocks of block_w state columns (None: the whole padded row). k, v contiguous, proj fp32 contiguous. Returns the
    launch arguments the query kernel shares."""
    B, Hkv, T, D = k.shape
    M, W = proj.shape[0], buf.shape[-1]
    valid = key_valid.contiguous().view(torch.uint8) if key_valid is not None else None
    bf = _CFG["performer_block_f"]
    common = dict(  # noqa: C408 (keyword names = the kernels' parameters)
        T=T, M=M, L=int(L), pos0=int(pos0), q_scale=D**0.25, z_shift=0.5 * math.sqrt(D), clamp=PERFORMER_CLAMP,
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ks=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vs=v.stride(2),
        stride_valb=valid.stride(0) if valid is not None else 0,
        stride_bb=buf.stride(0), stride_bh=buf.stride(1), stride_bn=buf.stride(2), stride_bm=buf.stride(3),
        D=D, E=int(E), HAS_VALID=valid is not None, CHUNK=chunk, BLOCK_F=bf,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        IEEE=not (k.is_cuda and torch.backends.cuda.matmul.allow_tf32),  # as torch's own fp32 matmuls would
        Valid=valid if valid is not None else k,  # any pointer when there is no mask; never read
    )
    bw = _block_width(block_w, W)
    _performer_chunk_state_kernel[(buf.shape[2] - 1, B * Hkv, triton.cdiv(M, bf) * triton.cdiv(W, bw))](
        Kk=k, V=v, Proj=proj, Buf=buf, HKV=Hkv, BLOCK_S=_CFG["state_block_s"], BLOCK_W=bw,
        num_warps=_CFG["state_warps"], **common)
    return common


def performer_kv_triton(k, v, proj, E: int, L: int, pos0: int = 0, key_valid=None):
    """reference.performer_kv_ref on the GPU: sum over the keys of phi(k)^T [v, eye, 1] (B, Hkv, m, D + E + 1) fp32,
    phi(k) and the values built in registers (never stored). Programs of kv_keys keys each write a partial state;
    torch sums them."""
    B, Hkv, S, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if proj.dim() != 2 or proj.shape[1] != D:
        raise ValueError(f"proj must be (m, D) with D = {D}, got {tuple(proj.shape)}")
    if key_valid is not None and tuple(key_valid.shape) != (B, S):
        raise ValueError(f"key_valid must be (B, S) = {(B, S)}, got {tuple(key_valid.shape)}")
    M, W = proj.shape[0], D + E + 1
    bs = _CFG["state_block_s"]
    chunk = min(_CFG["kv_keys"], triton.cdiv(S, bs) * bs)
    buf = torch.empty(B, Hkv, triton.cdiv(S, chunk) + 1, M, W, device=k.device, dtype=torch.float32)
    proj = proj.detach().to(device=k.device, dtype=torch.float32).contiguous()
    _chunk_states(k.contiguous(), v.contiguous(), proj, key_valid, E, L, pos0, chunk, buf, _CFG["kv_block_w"])
    return buf[:, :, 1:].sum(2)
