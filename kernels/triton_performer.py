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

Causal rows see only the keys up to their own position, so the state differs per row. The [v, 1] part is cut into
chunks of CHUNK keys: `_performer_chunk_state_kernel` writes each chunk's (m x (D + 1)) state sum phi(k)^T [v, 1]
(the keys' features built in registers, never stored), and an in-place torch cumsum turns them into the state before
each chunk. The eye part needs no per-chunk state: a key has one eye column, and the columns grow with the position,
so a row's eye output is phi(q) @ (the eye totals over every key) in the columns before its own, zero after it, and
den minus the rest in its own (`_performer_causal_query_kernel`'s docstring). The eye totals are one more pass of the
state kernel over the eye columns alone. `_performer_causal_query_kernel` then does, per tile of rows, phi(q) @ (the
[v, 1] state, the eye totals), the chunk's own earlier keys (phi(q) phi(k)^T, lower triangle) @ [v, 1], the
division and the encoder's input LayerNorm. The torch path (reference.causal_linear_attention_ref) carries the full
(m x (D + E + 1)) state per chunk in ~15 eager passes over T x m and T x W tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import PERFORMER_CLAMP

__all__ = ["performer_causal_triton", "performer_kv_triton", "performer_query_triton"]

# performer_block_t 64: the bidirectional layer at 64k (12/12) 12.02 vs 12.68 ms at 32 (rows per program: kv is read
# from L2 once per program; H100, 2026-12-07)
_CFG = {"performer_block_t": 64, "performer_block_f": 32, "performer_warps": 4,  # sea_edge.bench_layer --sweep
        # causal: the tile as the chunk (one pass over the features for states and diagonal), 8 warps for the
        # (64 x E) eye accumulator. Layer, H100, against chunk 128 / tile 32 / 4 warps: 33.8 vs 35.1 ms (64k, 12/12),
        # 22.6 vs 23.5 (64k, 9/3), 10.5 vs 11.2 (16k, 12/12), 7.95 vs 8.28 (16k, 9/3)
        "causal_chunk": 64, "causal_block_t": 64, "causal_warps": 8, "state_block_s": 32, "state_warps": 4,
        "state_block_w": 64, "kv_keys": 2048,
        # None: the whole padded state row per program, as measured in the bidirectional layer (H100, 2026-12-06)
        "kv_block_w": None,
        # the eye part as segment sums where the spans allow (_performer_kv_seg_kernel), its features per program
        "kv_seg": True, "seg_block_f": 64, "seg_warps": 4,
        # the causal estimator's route (sea_edge/estimator.py): these kernels (True) or the torch path (False). On:
        # the layer at 64k, 12/12 heads, 38.6 ms against 57.8 ms, peak 4628 against 12418 MiB (H100, 2026-12-07)
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
def _performer_query_fwd_kernel(
    Q, Proj, KV, LnW, LnB, Out,
    T, M, eps, q_scale, z_shift, clamp,
    stride_qb, stride_qh, stride_qt,
    stride_kvb, stride_kvh, stride_kvm,
    stride_ob, stride_oh, stride_ot,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
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
    # phi(q) @ kv in its three parts, kv's columns [v (D), eye (E), 1]: the D + E + 1 = 193 columns (D 64, E 128) as
    # one accumulator would pad to 256, which spilled registers at 64 rows per program
    acc_v = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    den = tl.zeros([BLOCK_T], dtype=tl.float32)  # phi(q) . sum phi(k)
    kv_base = KV + b * stride_kvb + hk * stride_kvh
    for f0 in range(0, M, BLOCK_F):
        phi = _features(xt, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
        acc_v = _dot(phi, _state_rows(kv_base, f0, M, stride_kvm, D, BLOCK_F, BLOCK_D), acc_v, IEEE)
        acc_e = _dot(phi, _state_rows(kv_base + D, f0, M, stride_kvm, E, BLOCK_F, BLOCK_E), acc_e, IEEE)
        den += tl.sum(phi * _state_col(kv_base + D + E, f0, M, stride_kvm, BLOCK_F)[None, :], axis=1)
    den = tl.maximum(den, 1e-30)[:, None]
    _store_encoder_input_parts(acc_v / den, acc_e / den, qn, LnW, LnB,
                               Out + b * stride_ob + h * stride_oh + rows * stride_ot, rmask, eps,
                               D, E, BLOCK_D, BLOCK_E)


@triton.jit
def _values(v_rows, s, smask, pos0, L, w0, D: tl.constexpr, E: tl.constexpr, BLOCK_W: tl.constexpr):
    """Columns w0 .. w0 + BLOCK_W of [v, eye, 1] of the keys s (rows, BLOCK_W) fp32: v_rows are the keys' row
    pointers into V; the eye is the one-hot of column min((pos0 + s) * E // L, E - 1)."""
    w = w0 + tl.arange(0, BLOCK_W)
    vv = tl.load(v_rows[:, None] + w[None, :], mask=smask[:, None] & (w < D)[None, :], other=0.0).to(tl.float32)
    if E > 0:  # E = 0: v alone (the [v, 1] state of the causal query side, whose 1 column is summed apart)
        col = tl.minimum(((pos0 + s).to(tl.int64) * E) // L, E - 1)
        one = (w[None, :] == (D + col)[:, None]) | (w[None, :] == D + E)
        vv = tl.where(one & smask[:, None], 1.0, vv)
    return vv


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
    T, M, L, pos0, w_lo, w_hi, q_scale, z_shift, clamp,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_valb,
    stride_bb, stride_bh, stride_bn, stride_bm,
    HKV: tl.constexpr, D: tl.constexpr, E: tl.constexpr, HAS_VALID: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, IEEE: tl.constexpr,
):
    """Buf[b, hk, n + 1, f, w - w_lo] = sum over the chunk's keys s of phi_f(k_s)^T [v_s, eye_s, 1]_w for the state
    columns w_lo <= w < w_hi: one program per (chunk, head, feature block, BLOCK_W columns), so the accumulator stays
    (BLOCK_F x BLOCK_W). E = 0: the [v, 1] state (W = D + 1); its last column, sum phi, is a row sum of the features
    that the program of the first block stores (w_lo = 0, w_hi = D)."""
    n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    nf = tl.cdiv(M, BLOCK_F)
    f0 = (tl.program_id(2) % nf) * BLOCK_F
    w0 = w_lo + (tl.program_id(2) // nf) * BLOCK_W
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    w = w0 + tl.arange(0, BLOCK_W)
    f = f0 + tl.arange(0, BLOCK_F)
    acc = tl.zeros([BLOCK_F, BLOCK_W], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_F], dtype=tl.float32)
    # Each key has one eye column, and the columns grow with the position: the chunk's keys reach only the eye
    # columns [col(first key), col(last key)]. A block whose stored columns are eye columns alone outside them stays
    # zero, so its program skips the keys (at 64k, E = 256 in 64-wide blocks, the eye totals of a causal prefill
    # keep 1 or 2 of 4 blocks per 2048-key chunk busy).
    s_lo = n * CHUNK
    c_lo = tl.minimum(((pos0 + s_lo).to(tl.int64) * E) // L, E - 1)
    c_hi = tl.minimum(((pos0 + tl.minimum(s_lo + CHUNK, T) - 1).to(tl.int64) * E) // L, E - 1)
    w_end = tl.minimum(w0 + BLOCK_W, w_hi)  # this program stores the columns [w0, w_end)
    idle = (E > 0) & (w0 >= D) & (w_end <= D + E) & ((w_end <= D + c_lo) | (w0 > D + c_hi))
    for s0 in range(s_lo, tl.where(idle, s_lo, s_lo + CHUNK), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < T
        xk, keep = _key_rows(Kk + b * stride_kb + hk * stride_kh + s * stride_ks, s, smask,
                             Valid + b * stride_valb, HAS_VALID, q_scale, D, BLOCK_D)
        phi = tl.where(keep[:, None], _features(xk, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE), 0.0)
        vals = _values(V + b * stride_vb + hk * stride_vh + s * stride_vs, s, smask, pos0, L, w0, D, E, BLOCK_W)
        acc = _dot(tl.trans(phi), vals, acc, IEEE)  # (BLOCK_F, BLOCK_W)
        if E == 0:
            zsum += tl.sum(phi, axis=0)
    buf = Buf + b * stride_bb + hk * stride_bh + (n + 1) * stride_bn + f * stride_bm
    tl.store(buf[:, None] + (w - w_lo)[None, :], acc, mask=(f < M)[:, None] & (w < w_end)[None, :])
    if E == 0:
        if w0 == 0:
            tl.store(buf + D, zsum, mask=f < M)


@triton.jit
def _performer_kv_seg_kernel(
    Kk, V, Valid, Proj, Buf,
    T, M, L, pos0, w_lo, q_scale, z_shift, clamp,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_valb,
    stride_bb, stride_bh, stride_bn, stride_bm,
    HKV: tl.constexpr, D: tl.constexpr, E: tl.constexpr, HAS_VALID: tl.constexpr, V_PART: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    """_performer_chunk_state_kernel's partial state of one chunk of keys, with the eye part as segment sums: when a
    column's span L / E is a multiple of BLOCK_S (and so is pos0), every step of BLOCK_S keys lies in one eye column,
    and phi(k)^T eye is that column's running sum of phi over the steps, stored when the column changes. Only
    phi(k)^T v goes through tensor cores: a (BLOCK_F x D) accumulator instead of (BLOCK_F x (D + E + 1)), a third
    of the products at E = 2D. V_PART: also the v columns and the last one (sum phi); else the eye columns alone
    (the causal eye totals). Buf must start zeroed: a chunk stores only the eye columns its keys reach."""
    n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    f0 = tl.program_id(2) * BLOCK_F
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    f = f0 + tl.arange(0, BLOCK_F)
    fmask = f < M
    d = tl.arange(0, BLOCK_D)
    buf = Buf + b * stride_bb + hk * stride_bh + (n + 1) * stride_bn + f * stride_bm  # (BLOCK_F,) row pointers
    acc = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_F], dtype=tl.float32)
    esum = tl.zeros([BLOCK_F], dtype=tl.float32)
    s_lo = n * CHUNK
    c_cur = ((pos0 + s_lo).to(tl.int64) * E) // L
    for s0 in range(s_lo, tl.minimum(s_lo + CHUNK, T), BLOCK_S):
        c = ((pos0 + s0).to(tl.int64) * E) // L
        if c != c_cur:  # the previous column's keys are done (in this chunk)
            tl.store(buf + (D + c_cur - w_lo), esum, mask=fmask)
            esum = tl.zeros([BLOCK_F], dtype=tl.float32)
            c_cur = c
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < T
        xk, keep = _key_rows(Kk + b * stride_kb + hk * stride_kh + s * stride_ks, s, smask,
                             Valid + b * stride_valb, HAS_VALID, q_scale, D, BLOCK_D)
        phi = tl.where(keep[:, None], _features(xk, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE), 0.0)
        part = tl.sum(phi, axis=0)  # (BLOCK_F,)
        esum += part
        if V_PART:
            vv = tl.load((V + b * stride_vb + hk * stride_vh + s * stride_vs)[:, None] + d[None, :],
                         mask=smask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_D)
            acc = _dot(tl.trans(phi), vv, acc, IEEE)
            zsum += part
    tl.store(buf + (D + c_cur - w_lo), esum, mask=fmask)
    if V_PART:
        tl.store(buf[:, None] + d[None, :], acc, mask=fmask[:, None] & (d < D)[None, :])
        tl.store(buf + D + E, zsum, mask=fmask)


@triton.jit
def _store_encoder_input_parts(cv, ce, qn, LnW, LnB, o_rows, rmask, eps,
                               D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """LayerNorm([cv, ce, qn]) over its 2D + E values (cv: D columns of BLOCK_D, ce: E of BLOCK_E, zero past
    them), stored at o_rows (row pointers)."""
    F: tl.constexpr = 2 * D + E
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_E)
    dmask = (d < D)[None, :]
    jmask = (j < E)[None, :]
    mean = (tl.sum(cv, axis=1) + tl.sum(ce, axis=1) + tl.sum(qn, axis=1)) / F
    dv = tl.where(dmask, cv - mean[:, None], 0.0)
    de = tl.where(jmask, ce - mean[:, None], 0.0)
    dq = tl.where(dmask, qn - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(dv * dv, axis=1) + tl.sum(de * de, axis=1) + tl.sum(dq * dq, axis=1)) / F + eps)
    _store_ln_part(dv, rstd, LnW, LnB, o_rows, rmask, 0, d, D)
    _store_ln_part(de, rstd, LnW, LnB, o_rows, rmask, D, j, E)
    _store_ln_part(dq, rstd, LnW, LnB, o_rows, rmask, D + E, d, D)


@triton.jit
def _store_ln_part(x, rstd, LnW, LnB, o_rows, rmask, c0, cols, width):
    """Columns c0 + cols (< c0 + width) of a LayerNorm: x (centred) * rstd * w + b."""
    lw = tl.load(LnW + c0 + cols, mask=cols < width, other=0.0)
    lb = tl.load(LnB + c0 + cols, mask=cols < width, other=0.0)
    tl.store(o_rows[:, None] + c0 + cols[None, :], x * rstd[:, None] * lw[None, :] + lb[None, :],
             mask=rmask[:, None] & (cols < width)[None, :])


@triton.jit
def _performer_causal_query_kernel(
    Q, Kk, V, Valid, Proj, Buf, Eye, LnW, LnB, Out,
    T, M, L, pos0, eps, q_scale, z_shift, clamp,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_valb,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_eb, stride_eh, stride_em,
    stride_ob, stride_oh, stride_ot,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, E: tl.constexpr, HAS_VALID: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):
    """The encoder input of the rows t of a tile in chunk n, in one program:
    - [v, 1] part: num_t = phi(q_t) @ (Buf[n], the [v, 1] state before chunk n) plus, over the chunk's keys
      s <= t, (phi(q_t) . phi(k_s)) [v_s, 1]; den_t is its last column;
    - eye part, without a per-chunk eye state: a key's eye column is col(s), growing with s, so the keys of the
      columns j < col(t) all precede t and phi(q_t) @ Eye[:, j] (Eye: the eye totals over every key) is exact
      there; column col(t) holds the keys of t's own column up to t, which is den_t minus those columns; columns
      past col(t) are zero;
    - ctx = num / den, then LayerNorm([ctx, q / |q|]) stored.
    The state0 contract makes the subtraction exact: its last column is the sum of its eye columns, none past
    col(pos0 - 1). In fp32 the col(t) entry carries an absolute error of ~eps * den, the order of the other
    entries' rounding after the division by den."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    t0 = pid_t * BLOCK_T
    rows = t0 + tl.arange(0, BLOCK_T)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    qn, xt = _unit_rows(q, q_scale)
    c0 = (t0 // CHUNK) * CHUNK  # the tile's chunk starts here (BLOCK_T divides CHUNK)
    st_base = Buf + b * stride_bb + hk * stride_bh + (t0 // CHUNK) * stride_bn
    eye_base = Eye + b * stride_eb + hk * stride_eh
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # phi(q) @ [v] states
    acc_e = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)  # phi(q) @ Eye
    den = tl.zeros([BLOCK_T], dtype=tl.float32)
    k_base = Kk + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if CHUNK == BLOCK_T:  # the tile is the chunk: one pass over the features serves the states and the diagonal
        s = rows
        xk, keep = _key_rows(k_base + s * stride_ks, s, rmask, Valid + b * stride_valb, HAS_VALID, q_scale,
                             D, BLOCK_D)
        sc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        for f0 in range(0, M, BLOCK_F):
            phi = _features(xt, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
            acc = _dot(phi, _state_rows(st_base, f0, M, stride_bm, D, BLOCK_F, BLOCK_D), acc, IEEE)
            den += tl.sum(phi * _state_col(st_base + D, f0, M, stride_bm, BLOCK_F)[None, :], axis=1)
            acc_e = _dot(phi, _state_rows(eye_base, f0, M, stride_em, E, BLOCK_F, BLOCK_E), acc_e, IEEE)
            phi_k = _features(xk, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
            sc = _dot(phi, tl.trans(phi_k), sc, IEEE)
        sc = tl.where((s[None, :] <= rows[:, None]) & keep[None, :], sc, 0.0)
        den += tl.sum(sc, axis=1)
        vv = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot(sc, vv.to(tl.float32), acc, IEEE)
    else:
        for f0 in range(0, M, BLOCK_F):  # keys of earlier chunks (and before pos0), and the eye totals
            phi = _features(xt, Proj, f0, M, z_shift, clamp, D, BLOCK_F, BLOCK_D, IEEE)
            acc = _dot(phi, _state_rows(st_base, f0, M, stride_bm, D, BLOCK_F, BLOCK_D), acc, IEEE)
            den += tl.sum(phi * _state_col(st_base + D, f0, M, stride_bm, BLOCK_F)[None, :], axis=1)
            acc_e = _dot(phi, _state_rows(eye_base, f0, M, stride_em, E, BLOCK_F, BLOCK_E), acc_e, IEEE)
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
            vv = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=smask[:, None] & dmask[None, :],
                         other=0.0)
            acc = _dot(sc, vv.to(tl.float32), acc, IEEE)
    col = tl.minimum(((pos0 + rows).to(tl.int64) * E) // L, E - 1)  # (BLOCK_T,) each row's own eye column
    j = tl.arange(0, BLOCK_E)
    before = j[None, :] < col[:, None]
    own = den - tl.sum(tl.where(before, acc_e, 0.0), axis=1)  # phi(q_t) . (keys of col(t) up to t)
    ce = tl.where(before, acc_e, tl.where(j[None, :] == col[:, None], own[:, None], 0.0))
    inv = 1.0 / tl.maximum(den, 1e-30)
    _store_encoder_input_parts(acc * inv[:, None], ce * inv[:, None], qn, LnW, LnB,
                               Out + b * stride_ob + h * stride_oh + rows * stride_ot, rmask, eps,
                               D, E, BLOCK_D, BLOCK_E)


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
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_E=max(16, triton.next_power_of_2(E)), IEEE=ieee,
        num_warps=_CFG["performer_warps"],
    )
    return out


def performer_causal_triton(q, k, v, proj, state0, ln_w, ln_b, eps: float, E: int, L: int, pos0: int,
                            key_valid=None):
    """reference.performer_causal_ref (inference: no autograd) in four launches: the chunks' [v, 1] states (Triton),
    their prefix sum in place (torch cumsum), the eye totals over every key (Triton, as performer_kv_triton), and
    the query side with the LayerNorm (Triton). state0 must be a state of keys before pos0 (as
    reference.performer_kv_ref writes one): its last column is the sum of its eye columns, and it has no eye column
    past col(pos0 - 1).
    Returns x (B, H, T, 2D + E) and the state after the last key (B, Hkv, m, D + E + 1), fp32."""
    B, H, T, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or H % k.shape[1] or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, Hkv, T, D) = ({B}, Hkv, {T}, {D}) with H = {H} a multiple of Hkv, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    Hkv, M, W = k.shape[1], proj.shape[0], D + E + 1
    if tuple(proj.shape) != (M, D):
        raise ValueError(f"proj must be (m, D) with D = {D}, got {tuple(proj.shape)}")
    if tuple(state0.shape) != (B, Hkv, M, W):
        raise ValueError(f"state0 must be (B, Hkv, m, D + E + 1) = {(B, Hkv, M, W)}, got {tuple(state0.shape)}")
    if E < 1:
        raise ValueError(f"E must be >= 1 eye columns, got {E}")
    if ln_w.numel() != 2 * D + E:
        raise ValueError(f"LayerNorm width {ln_w.numel()} != 2D + E = {2 * D + E}")
    if key_valid is not None and tuple(key_valid.shape) != (B, T):
        raise ValueError(f"key_valid must be (B, T) = {(B, T)}, got {tuple(key_valid.shape)}")
    f32 = (lambda t: t.detach().to(device=q.device, dtype=torch.float32).contiguous())
    q, k, v, proj, state0 = q.contiguous(), k.contiguous(), v.contiguous(), f32(proj), f32(state0)
    chunk, bt = _CFG["causal_chunk"], _CFG["causal_block_t"]
    if chunk % bt:
        raise ValueError(f"causal_chunk {chunk} must be a multiple of causal_block_t {bt}")
    N = triton.cdiv(T, chunk)
    # [v, 1] states, W = D + 1 (not D + E + 1: the eye part needs no per-chunk state): [state0, chunk 0, ..., N - 1]
    buf = torch.empty(B, Hkv, N + 1, M, D + 1, device=q.device, dtype=torch.float32)
    buf[:, :, 0, :, :D], buf[:, :, 0, :, D] = state0[..., :D], state0[..., -1]
    common = _chunk_states(k, v, proj, key_valid, 0, L, pos0, chunk, buf, (0, D), _CFG["state_block_w"])
    buf.cumsum_(2)  # buf[n] = state0 + chunks 0 .. n - 1: what precedes chunk n; buf[N] covers every key
    eye = state0[..., D : D + E] + _key_sums(k, v, proj, key_valid, E, L, pos0, (D, D + E), _CFG["state_block_w"])
    out = torch.empty(B, H, T, 2 * D + E, device=q.device, dtype=torch.float32)
    _performer_causal_query_kernel[(triton.cdiv(T, bt), B * H)](
        Q=q, Kk=k, V=v, Proj=proj, Buf=buf, Eye=eye, LnW=f32(ln_w), LnB=f32(ln_b), Out=out, eps=float(eps),
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_eb=eye.stride(0), stride_eh=eye.stride(1), stride_em=eye.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        H=H, G=H // Hkv, BLOCK_T=bt, BLOCK_E=triton.next_power_of_2(E), num_warps=_CFG["causal_warps"],
        **{**common, "E": int(E)})
    return out, torch.cat([buf[:, :, N, :, :D], eye, buf[:, :, N, :, D:]], dim=-1)


def _block_width(setting: int | None, n: int) -> int:
    """Columns per program for n columns: the launch setting, None meaning all n (padded to a power of 2)."""
    return min(setting or triton.next_power_of_2(n), triton.next_power_of_2(n))


def _state_args(k, v, proj, key_valid, E: int, L: int, pos0: int, chunk: int, buf, block_f: int) -> dict:
    """The launch arguments the keys' state kernels (and the causal query kernel) share, for keys k, v (contiguous)
    at positions pos0.., chunks of `chunk` keys and partial states written into buf (B, Hkv, n + 1, m, w)."""
    T, D = k.shape[2], k.shape[3]
    valid = key_valid.contiguous().view(torch.uint8) if key_valid is not None else None
    return dict(  # noqa: C408 (keyword names = the kernels' parameters)
        T=T, M=proj.shape[0], L=int(L), pos0=int(pos0), q_scale=D**0.25, z_shift=0.5 * math.sqrt(D), clamp=PERFORMER_CLAMP,
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ks=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vs=v.stride(2),
        stride_valb=valid.stride(0) if valid is not None else 0,
        stride_bb=buf.stride(0), stride_bh=buf.stride(1), stride_bn=buf.stride(2), stride_bm=buf.stride(3),
        D=D, E=int(E), HAS_VALID=valid is not None, CHUNK=chunk, BLOCK_F=block_f,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        IEEE=not (k.is_cuda and torch.backends.cuda.matmul.allow_tf32),  # as torch's own fp32 matmuls would
        Valid=valid if valid is not None else k,  # any pointer when there is no mask; never read
    )


def _chunk_states(k, v, proj, key_valid, E: int, L: int, pos0: int, chunk: int, buf, cols: tuple[int, int],
                  block_w: int | None) -> dict:
    """Launch _performer_chunk_state_kernel: buf[:, :, n + 1] = the state sum of keys [n chunk, (n + 1) chunk) over
    the state columns cols = [w_lo, w_hi) of [v, eye, 1] (E = 0: [v, 1], cols (0, D)), in blocks of block_w columns
    (None: all of them, padded). k, v contiguous, proj fp32 contiguous. Returns the launch arguments the query
    kernel shares."""
    B, Hkv = k.shape[:2]
    M = proj.shape[0]
    bf = _CFG["performer_block_f"]
    common = _state_args(k, v, proj, key_valid, E, L, pos0, chunk, buf, bf)
    bw = _block_width(block_w, cols[1] - cols[0])
    _performer_chunk_state_kernel[(buf.shape[2] - 1, B * Hkv, triton.cdiv(M, bf) * triton.cdiv(cols[1] - cols[0], bw))](
        Kk=k, V=v, Proj=proj, Buf=buf, w_lo=cols[0], w_hi=cols[1], HKV=Hkv, BLOCK_S=_CFG["state_block_s"],
        BLOCK_W=bw, num_warps=_CFG["state_warps"], **common)
    return common


def _seg_block_s(E: int, L: int, pos0: int, S: int, cols: tuple[int, int], D: int) -> int | None:
    """Keys per step of _performer_kv_seg_kernel for these keys, or None where it does not apply: every step must lie
    in one eye column (the span L / E and pos0 multiples of the step, no key clamped into the last column), and the
    columns must be the whole state or the eye alone."""
    if not _CFG["kv_seg"] or E < 1 or L % E or pos0 + S > L or cols not in ((0, D + E + 1), (D, D + E)):
        return None
    return next((bs for bs in (64, 32, 16) if (L // E) % bs == 0 and pos0 % bs == 0), None)


def _key_sums(k, v, proj, key_valid, E: int, L: int, pos0: int, cols: tuple[int, int], block_w: int | None):
    """The state columns cols = [w_lo, w_hi) of sum over the keys of phi(k)^T [v, eye, 1] (B, Hkv, m, w_hi - w_lo)
    fp32: programs of kv_keys keys each write a partial sum, and torch adds them (a fixed order, so the result is
    deterministic). Where the eye columns' spans allow it, the eye part is segment sums (_performer_kv_seg_kernel)."""
    B, Hkv, S, D = k.shape
    seg = _seg_block_s(E, L, pos0, S, cols, D)
    bs = seg or _CFG["state_block_s"]
    chunk = max(bs, min(_CFG["kv_keys"], triton.cdiv(S, bs) * bs) // bs * bs)  # whole steps: none crosses a column
    shape = (B, Hkv, triton.cdiv(S, chunk) + 1, proj.shape[0], cols[1] - cols[0])
    if seg is None:
        buf = torch.empty(shape, device=k.device, dtype=torch.float32)
        _chunk_states(k, v, proj, key_valid, E, L, pos0, chunk, buf, cols, block_w)
        return buf[:, :, 1:].sum(2)
    buf = torch.zeros(shape, device=k.device, dtype=torch.float32)  # a chunk stores only the eye columns it reaches
    bf = _CFG["seg_block_f"]
    common = _state_args(k, v, proj, key_valid, E, L, pos0, chunk, buf, bf)
    _performer_kv_seg_kernel[(shape[2] - 1, B * Hkv, triton.cdiv(proj.shape[0], bf))](
        Kk=k, V=v, Proj=proj, Buf=buf, w_lo=cols[0], HKV=Hkv, V_PART=cols[0] == 0, BLOCK_S=seg,
        num_warps=_CFG["seg_warps"], **common)
    return buf[:, :, 1:].sum(2)


def performer_kv_triton(k, v, proj, E: int, L: int, pos0: int = 0, key_valid=None):
    """reference.performer_kv_ref on the GPU: sum over the keys of phi(k)^T [v, eye, 1] (B, Hkv, m, D + E + 1) fp32,
    phi(k) and the values built in registers (never stored). Programs of kv_keys keys each write a partial state;
    torch sums them."""
    B, _, S, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if proj.dim() != 2 or proj.shape[1] != D:
        raise ValueError(f"proj must be (m, D) with D = {D}, got {tuple(proj.shape)}")
    if key_valid is not None and tuple(key_valid.shape) != (B, S):
        raise ValueError(f"key_valid must be (B, S) = {(B, S)}, got {tuple(key_valid.shape)}")
    proj = proj.detach().to(device=k.device, dtype=torch.float32).contiguous()
    return _key_sums(k.contiguous(), v.contiguous(), proj, key_valid, E, L, pos0, (0, D + E + 1), _CFG["kv_block_w"])
