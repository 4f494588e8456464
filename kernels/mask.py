"""Triton mask construction (SEA.md steps 4 and 5): grouped top-k over the compressed estimate, and its
interpolation into per-row key indices. Outputs are identical (same keys, same order) to select_columns_ref and
expand_columns_ref in reference.py, whose layout and tie rules they follow.

select_columns: one program per query token (b, t), holding all H*K probabilities of that token, as
order-preserving uint32 keys of the fp32 values. Instead of the reference's two sorts it finds two thresholds, first
per head (the head_cap-th largest), then over the surviving candidates (the n_cols-th largest), by the cheapest of
three routes for the cap c:
- c = 1 (the layer's cap at long T, sea_edge.config.budget): each head's max and its lowest column, and the n_cols
  best heads by a rank over (H x H) pairs; no scan of the (H, K) tile. 1.15 ms at 64k, 12 x 256, against 11.9 ms by
  bisection (H100);
- c <= 16: the distinct key levels from the top, one max and one count each, into a (H, c) table of level keys and
  their candidate counts, which the budget's bisection then counts instead of the tile;
- larger c: bisection on the 32 key bits, each step a compare-and-count over the tile.
Ties at a threshold are broken exactly like the stable sorts of the reference: lower column first within a head,
then lower head first across heads (row-major rank = a cumulative sum).

expand_columns: one program per (b, h, t) row; each kept column j covers the keys [floor(j L / K),
floor((j + 1) L / K)) (reference.column_spans); valid keys are written compacted in slot order, holes (-1) after.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .reference import _span

__all__ = ["expand_columns", "select_columns", "sparse_index"]


# Launch settings the layer bench's --sweep varies (None: the default below); not a public interface.
_CFG = {"select_warps": None}
# Per-head caps up to this take step (1) by distinct levels (<= c max + count pairs) rather than by bisection (32
# counts); the layer bench's caps at k = 64 are 1 to 8 (sea_edge.config.budget).
_ITER_MAX_C = 16


@triton.jit
def _order_key(x):
    """fp32 -> uint32 with the same order as the floats (-0.0 is first turned into +0.0). -inf maps to 0x007FFFFF,
    so 0 is free for padding. 32-bit keys (not int64): half the registers and one instruction per compare."""
    x = x + 0.0
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    return key.to(tl.uint32, bitcast=True) ^ tl.full([], 1 << 31, tl.uint32)  # flip the sign: unsigned order


@triton.jit
def _select_columns_fwd_kernel(
    probs_ptr, cols_ptr, T, S, K, H, n_cols, n_keys, c,
    CAUSAL: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, ITER: tl.constexpr,
):
    pid = tl.program_id(0)  # b * T + t
    b = pid // T
    t = pid % T
    hh = tl.arange(0, BH)
    jj = tl.arange(0, BK)
    inside = (hh < H)[:, None] & (jj < K)[None, :]
    off = ((b * H + hh[:, None]).to(tl.int64) * T + t) * K + jj[None, :]
    x = tl.load(probs_ptr + off, mask=inside, other=0.0).to(tl.float32)  # (BH, BK)
    if CAUSAL:
        L = (S - T + t + 1).to(tl.int64)
    else:
        L = S + tl.zeros([], tl.int64)
    n_row = n_cols + tl.zeros([], tl.int64)  # columns this row keeps over all heads
    if n_keys > 0:  # per-row count: reference.row_columns
        n_row = tl.maximum(n_keys // ((L + K - 1) // K), 1)
    j64 = jj.to(tl.int64)
    selectable = ((j64 + 1) * L // K) > (j64 * L // K)  # empty spans (L < K) are never selected
    x = tl.where(selectable[None, :], x, float("-inf"))
    key = _order_key(x)
    zero = tl.zeros([BH, BK], tl.uint32)
    key = tl.where(inside, key, zero)  # 0: padding, below every real key

    if BC == 1:
        # a cap of one column per head (the layer's at long T): each head's candidate is its largest key, lower
        # column first, and the budget keeps the n_row best heads by (key descending, head ascending): a rank over
        # (BH x BH) pairs, with no scan of the (BH, BK) tile
        hv = tl.max(key, 1)  # (BH,)
        ha = tl.min(tl.where(key == hv[:, None], jj[None, :], BK), 1)  # (BH,) its lowest column
        hi = tl.arange(0, BH)
        ahead = (hv[None, :] > hv[:, None]) | ((hv[None, :] == hv[:, None]) & (hi[None, :] < hi[:, None]))
        rank = tl.sum(ahead.to(tl.int32), 1)  # heads that come first
        neg = _order_key(tl.full([BH], float("-inf"), tl.float32))
        one = (rank < n_row) & (hv > neg) & (hh < H)
        out_row = ((b * H + hh).to(tl.int64) * T + t) * c  # (BH,)
        tl.store(cols_ptr + out_row, tl.where(one, ha, -1), mask=hh < H)
        return
    if ITER:
        # (1) per head: the c-th largest key by walking the distinct values from the top, one max and one count per
        # level (c <= BC levels at most) instead of 32 bisection steps over the whole (BH, BK) tile. Level i's key and
        # how many of the c candidates sit there go into (BH, BC) tables that step (2) then counts instead of the tile.
        lv = tl.zeros([BH, BC], tl.uint32)
        lm = tl.zeros([BH, BC], tl.int32)
        li = tl.arange(0, BC)[None, :]
        cur = tl.max(key, 1)  # (BH,) the largest key
        th = cur
        got = tl.zeros([BH], tl.int32)  # candidates placed so far
        for i in tl.static_range(BC):
            take = tl.minimum(tl.sum((key == cur[:, None]).to(tl.int32), 1), c - got)
            active = got < c
            lv = tl.where((li == i) & active[:, None], cur[:, None], lv)
            lm = tl.where((li == i) & active[:, None], take[:, None], lm)
            th = tl.where(active, cur, th)
            got += tl.where(active, take, 0)
            if i + 1 < BC:
                cur = tl.max(tl.where(key < cur[:, None], key, zero), 1)  # the next distinct key (0: none left)
    else:
        # (1) per head: threshold = the c-th largest key (bisection on the 32 key bits)
        th = tl.zeros([BH], tl.uint32)
        for bit in tl.static_range(31, -1, -1):
            cand = th | tl.full([], 1 << bit, tl.uint32)
            cnt = tl.sum((key >= cand[:, None]).to(tl.int32), 1)
            th = tl.where(cnt >= c, cand, th)
    gt = key > th[:, None]
    eq = key == th[:, None]
    eq_rank = tl.cumsum(eq.to(tl.int32), 1)  # ties: lower column first
    room = c - tl.sum(gt.to(tl.int32), 1)
    is_cand = gt | (eq & (eq_rank <= room[:, None]))

    # (2) over all heads' candidates: threshold = the n_cols-th largest
    gkey = tl.where(is_cand, key, zero)
    g = tl.zeros([], tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        cand = g | tl.full([], 1 << bit, tl.uint32)
        if ITER:  # the level tables hold the candidates' keys with multiplicity (cand > 0: padding never counts)
            cnt = tl.sum(tl.sum(tl.where(lv >= cand, lm, 0), 1), 0)
        else:
            cnt = tl.sum(tl.sum((gkey >= cand).to(tl.int32), 1), 0)
        g = tl.where(cnt >= n_row, cand, g)
    ggt = gkey > g
    geq = gkey == g
    # row-major rank of the ties: lower head first, then lower column (the reference's head-major stable sort)
    geq_i = geq.to(tl.int32)
    row_tot = tl.sum(geq_i, 1)
    g_rank = (tl.cumsum(row_tot, 0) - row_tot)[:, None] + tl.cumsum(geq_i, 1)
    groom = n_row - tl.sum(tl.sum(ggt.to(tl.int32), 1), 0)
    # g = 0 when the heads hold fewer candidates than the budget: then every key ties it, the non-candidates (over
    # a head's cap) and the padding too, so the keep rule names the candidates explicitly
    keep = (ggt | (geq & (g_rank <= groom))) & (x > float("-inf")) & is_cand & inside

    # write each head's kept columns ascending, then -1 in the unused slots (disjoint addresses)
    keep_i = keep.to(tl.int32)
    pos = tl.cumsum(keep_i, 1) - 1
    out_row = ((b * H + hh).to(tl.int64) * T + t) * c  # (BH,)
    tl.store(cols_ptr + out_row[:, None] + pos, jj[None, :] + tl.zeros([BH, BK], tl.int32), mask=keep)
    n_keep = tl.sum(keep_i, 1)
    slot = tl.arange(0, BC)
    tl.store(cols_ptr + out_row[:, None] + slot[None, :], tl.full([BH, BC], -1, tl.int32),
             mask=(hh < H)[:, None] & (slot[None, :] >= n_keep[:, None]) & (slot[None, :] < c))


def _select_warps(c: int, n: int) -> int:
    """Warps per token's program. H100, 12 heads x K = 256 (results/select_columns_cap1_h100_2026-12-07.json): cap 1
    (T = 65536) takes 0.63 ms at 2 warps, 0.78 at 4, 1.16 at 8; cap 2 (T = 16384) 0.97 ms at 4, 1.29 at 2, 1.47 at
    8."""
    if c == 1:
        return 2
    if c <= _ITER_MAX_C:
        return 4
    return 8 if n >= 4096 else 4


def select_columns(probs: torch.Tensor, n_cols: int, head_cap: int, S: int, causal: bool,
                   n_keys: int | None = None) -> torch.Tensor:
    """Triton twin of select_columns_ref: per token keep the n_cols largest of H*K probabilities (or, with n_keys,
    reference.row_columns of them), at most head_cap per head. probs (B, H, T, K) float. Returns cols (B, H, T, min(head_cap, K)) int32, ascending, -1 padded.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, H, T, K), got shape {tuple(probs.shape)}")
    if n_cols < 1 or head_cap < 1:
        raise ValueError(f"n_cols and head_cap must be >= 1, got {n_cols} and {head_cap}")
    B, H, T, K = probs.shape
    if causal and T > S:
        raise ValueError(f"causal needs T <= S, got T={T}, S={S}")
    c = min(head_cap, K)
    BH, BK = triton.next_power_of_2(H), triton.next_power_of_2(K)
    if BH * BK > 65536:
        raise ValueError(f"H * K too large for one program: H={H}, K={K}")
    cols = torch.empty(B, H, T, c, device=probs.device, dtype=torch.int32)
    if B * T == 0:
        return cols
    _select_columns_fwd_kernel[(B * T,)](
        probs_ptr=probs.contiguous(), cols_ptr=cols, T=T, S=S, K=K, H=H, n_cols=n_cols, n_keys=n_keys or 0, c=c,
        CAUSAL=bool(causal), BH=BH, BK=BK, BC=triton.next_power_of_2(c), ITER=c <= _ITER_MAX_C,
        num_warps=_CFG["select_warps"] or _select_warps(c, BH * BK),
    )
    return cols


@triton.jit
def _expand_columns_fwd_kernel(
    cols_ptr, kv_ptr, idx_ptr, T, S, K, H, c, W, span,
    CAUSAL: tl.constexpr, HAS_KV: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, BW: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * H + h) * T + t
    t = pid % T
    b = pid // (H * T)
    if CAUSAL:
        L = (S - T + t + 1).to(tl.int64)
    else:
        L = S + tl.zeros([], tl.int64)
    ss = tl.arange(0, BS)
    out_row = idx_ptr + pid.to(tl.int64) * W
    n_out = tl.zeros([], tl.int32)
    for c0 in range(0, c, BC):
        ci = c0 + tl.arange(0, BC)
        col = tl.load(cols_ptr + pid.to(tl.int64) * c + ci, mask=ci < c, other=-1).to(tl.int64)  # (BC,)
        colc = tl.maximum(col, 0)
        start = colc * L // K
        end = (colc + 1) * L // K
        key = start[:, None] + ss[None, :]  # (BC, BS)
        ok = (col >= 0)[:, None] & (key < end[:, None]) & (ss < span)[None, :]
        if HAS_KV:
            ok &= tl.load(kv_ptr + b.to(tl.int64) * S + key, mask=ok, other=0) != 0
        ok_i = ok.to(tl.int32)
        row_tot = tl.sum(ok_i, 1)
        rank = (tl.cumsum(row_tot, 0) - row_tot)[:, None] + tl.cumsum(ok_i, 1)  # slot order == ascending keys
        tl.store(out_row + n_out + rank - 1, key.to(tl.int32), mask=ok)
        n_out += tl.sum(row_tot, 0)
    for w0 in range(0, W, BW):
        wi = w0 + tl.arange(0, BW)
        tl.store(out_row + wi, tl.full([BW], -1, tl.int32), mask=(wi >= n_out) & (wi < W))


def expand_columns(cols: torch.Tensor, K: int, S: int, causal: bool,
                   key_valid: torch.Tensor | None = None, span: int | None = None) -> torch.Tensor:
    """Triton twin of expand_columns_ref: kept compressed columns (B, H, T, c) -> idx (B, H, T, c * ceil(S / K))
    int32, ascending, -1 padded; keys with key_valid[b, key] False are dropped."""
    if cols.dim() != 4:
        raise ValueError(f"cols must be (B, H, T, c), got shape {tuple(cols.shape)}")
    B, H, T, c = cols.shape
    if causal and T > S:
        raise ValueError(f"causal needs T <= S, got T={T}, S={S}")
    span = _span(S, K, span)
    W = c * span
    idx = torch.empty(B, H, T, W, device=cols.device, dtype=torch.int32)
    if idx.numel() == 0:
        return idx
    if key_valid is not None and tuple(key_valid.shape) != (B, S):
        raise ValueError(f"key_valid must be (B, S) = {(B, S)}, got {tuple(key_valid.shape)}")
    kv = key_valid.to(torch.int8).contiguous() if key_valid is not None else idx  # dummy pointer when absent
    BS = triton.next_power_of_2(span)
    BC = max(1, min(triton.next_power_of_2(c), 4096 // BS))
    _expand_columns_fwd_kernel[(B * H * T,)](
        cols_ptr=cols.to(torch.int32).contiguous(), kv_ptr=kv, idx_ptr=idx, T=T, S=S, K=K, H=H, c=c, W=W,
        span=span, CAUSAL=bool(causal), HAS_KV=key_valid is not None, BC=BC, BS=BS,
        BW=min(1024, triton.next_power_of_2(W)), num_warps=4,
    )
    return idx


def sparse_index(probs: torch.Tensor, n_cols: int, head_cap: int, S: int, causal: bool,
                 key_valid: torch.Tensor | None = None, n_keys: int | None = None,
                 span: int | None = None) -> torch.Tensor:
    """select_columns then expand_columns: compressed probabilities (B, H, T, K) -> idx (B, H, T, w)."""
    cols = select_columns(probs, n_cols, head_cap, S, causal, n_keys)
    return expand_columns(cols, probs.shape[-1], S, causal, key_valid, span)
