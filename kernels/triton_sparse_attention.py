"""Triton sparse attention over per-row key indices (SEA.md step 6): forward, backward, and the block plan.

Layout: see reference.py (q (B, Hq, T, D); k, v (B, Hkv, S, D); idx (B, Hq, T, w) int32, ascending, -1 at the end).
Every idx row must be strictly ascending (no key twice), as the references produce it.

Design (why tensor cores work on a per-row sparse mask):
  SEA's rows are runs of ~S/K consecutive keys and neighbouring rows share most runs. So for a tile of BM query rows
  of one head we list the *union* of the BN-key blocks that any of its rows touches, and for each (block, row) a
  64-bit mask of which keys of the block that row keeps ("the plan", built by three data-parallel passes:
  `_sparse_attention_plan_scan_kernel` marks the blocks of each row segment in a per-tile bitmap,
  `_sparse_attention_plan_compact_kernel` turns it into the block list, the scan kernel again adds the key masks).
  The attention kernels then run dense tl.dot tiles (BM x BN x D) over the union blocks, with the bitmask as the
  score mask, and an online softmax (FlashAttention-2).
  Memory is linear: the plan holds (blocks per tile) x BM x 8 bytes, about T * (w / BN) * 8 bytes per head for
  SEA-shaped masks, never T x S.
  GQA: each query head has its own idx, so each (b, query head) has its own plan; heads of one group read the same
  K/V blocks, which then come from L2.
Backward: dq in the same tile loop; dk and dv are accumulated with fp32 atomics into (B, Hkv, S, D) buffers,
because a key block is shared by many tiles, overlapping rows and every head of its GQA group; a transposed
(key-major) plan would need a sort of all (tile, block) pairs per call, and atomics on distinct tiles rarely collide.
The summation order is therefore not deterministic (fp32 rounding differences only).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import check_attention_shapes

__all__ = ["SparsePlan", "sparse_attention_cols_plan", "sparse_attention_cols_triton",
           "sparse_attention_cols_triton_bwd", "sparse_attention_plan", "sparse_attention_triton",
           "sparse_attention_triton_bwd"]

BLOCK_N = 64  # keys per block: the per-(row, block) mask is one int64
# Launch settings the bench's --sweep varies (None: the defaults below); not a public interface.
_CFG = {"fwd_warps": None, "fwd_stages": 3, "plan_ch": None, "plan_warps": 4, "plan_flags": False,
        "cols_plan_warps": 1,
        # forward from kept columns: merge each tile's spans inside the attention kernel (no plan, no host sync)
        "cols_fused": True, "cols_fused_warps": 4, "cols_fused_block_m": 64,
        # the fused forward visits each head's rows by their first kept key where rows keep one column per head
        # (bidirectional / causal, _row_order). Layer at 64k, 12/12, H100: 11.26 against 13.54 ms bidirectional,
        # 26.78 against 30.03 causal (with the encoder then behind the query; results/sweep_layer_h100_2026-12-07_order)
        "cols_sort_bidir": True, "cols_sort_causal": True}


@triton.jit
def _popcount32(x):
    """Set bits of x (int64 holding a 32-bit value), SWAR (Hacker's Delight 5-1): triton has no popc that also
    runs under the CPU interpreter."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


@triton.jit
def _plan_add_masks(map_ptr, pre_ptr, bits_ptr, tbase, n_words, cap, rowoff, b, val, on,
                    BM: tl.constexpr, CH: tl.constexpr):
    """bits[tile, slot of block b, row] += val where `on`; slot = prefix of b's bitmap word + set bits below b."""
    b = tl.where(on, b, 0)
    wrd = b // 32
    word = tl.load(map_ptr + tbase * n_words + wrd, mask=on, other=0).to(tl.int64) & 0xFFFFFFFF
    below = word & ((tl.full([BM, CH], 1, tl.int64) << (b % 32).to(tl.int64)) - 1)
    slot = tl.load(pre_ptr + tbase * n_words + wrd, mask=on, other=0) + _popcount32(below)
    # relaxed: triton's default acq_rel puts a fence around every atomic; the plan's adds commute and are read only
    # by later launches
    tl.atomic_add(bits_ptr + (tbase * cap + slot) * BM + rowoff, val, mask=on & (slot < cap), sem="relaxed")


@triton.jit
def _sparse_attention_plan_scan_kernel(
    idx_ptr, map_ptr, pre_ptr, bits_ptr,
    T, W, n_tiles, n_words, cap,
    BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, FLAGS: tl.constexpr = False,
):
    """One program per (tile of BM rows, b*Hq + h), CH slots of all BM rows at a time; both plan passes.

    A row is ascending, so the keys it keeps in one BN-key block are consecutive slots (a segment).
    BITS = False: OR the bit of every segment's block into the tile's block bitmap (one atomic per segment, not
    per key). BITS = True: add each segment's key mask into bits[tile, slot of its block, row]. The mask of a
    segment is a difference of an in-chunk prefix sum of 1 << (key % BN): distinct keys give distinct bits, so
    sums are ORs and the int64 wrap-around of the prefix sum cancels in the difference. A segment cut by the
    chunk edge adds two partial masks: the atomic adds make that exact too.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * BM + tl.arange(0, BM)
    rmask = rows < T
    row_ptr = idx_ptr + (bh.to(tl.int64) * T + rows) * W  # (BM,)
    tbase = bh.to(tl.int64) * n_tiles + tile
    cols = tl.arange(0, CH)
    for c0 in range(0, W, CH):
        offs = c0 + cols[None, :]  # (1, CH)
        key = tl.load(row_ptr[:, None] + offs, mask=rmask[:, None] & (offs < W), other=-1)  # (BM, CH)
        nxt = tl.load(row_ptr[:, None] + offs + 1, mask=rmask[:, None] & (offs + 1 < W), other=-1)  # (BM, CH)
        valid = key >= 0
        blk = key // BN
        blk_n = tl.where(nxt >= 0, nxt // BN, -1)
        seg_end = valid & (blk_n != blk)  # last key of the row in this block
        if BITS:
            bit = tl.full([BM, CH], 1, tl.int64) << tl.where(valid, key % BN, 0).to(tl.int64)
            bit = tl.where(valid, bit, 0)
            cs = tl.cumsum(bit, 1)  # (BM, CH) int64, wraps
            last = offs == c0 + CH - 1
            add_end = valid & (seg_end | last)
            sub_next = seg_end & (nxt >= 0) & ~last  # the next segment starts in this chunk: remove cs from it
            rowoff = (rows - tile * BM)[:, None]  # (BM, 1)
            _plan_add_masks(map_ptr, pre_ptr, bits_ptr, tbase, n_words, cap, rowoff, blk, cs, add_end, BM, CH)
            _plan_add_masks(map_ptr, pre_ptr, bits_ptr, tbase, n_words, cap, rowoff, blk_n, -cs, sub_next, BM, CH)
        elif FLAGS:  # plain byte stores (same value from many rows: no read-modify-write); bits_ptr = byte map
            tl.store(bits_ptr + tbase * (n_words * 32) + tl.where(seg_end, blk, 0), tl.full([BM, CH], 1, tl.int8),
                     mask=seg_end)
        else:
            b = tl.where(seg_end, blk, 0)
            tl.atomic_or(map_ptr + tbase * n_words + b // 32, (tl.full([BM, CH], 1, tl.int32) << (b % 32)),
                         mask=seg_end, sem="relaxed")


@triton.jit
def _sparse_attention_plan_compact_kernel(
    map_ptr, pre_ptr, blk_ptr, cnt_ptr, flag_ptr,
    n_tiles, n_words, n_kblocks, cap,
    NW: tl.constexpr, FLAGS: tl.constexpr = False,
):
    """One program per (tile, b*Hq + h): the tile's block bitmap -> ascending block list, per-word prefix counts
    (a block's slot = prefix of its word + set bits below it in the word) and the block count."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    tbase = bh.to(tl.int64) * n_tiles + tile
    w = tl.arange(0, NW)
    j = tl.arange(0, 32)
    run = tl.full([], 0, tl.int32)
    for w0 in range(0, n_words, NW):
        wm = w0 + w < n_words
        if FLAGS:  # byte map -> bitmap words (pass 3 looks slots up in them)
            f = tl.load(flag_ptr + tbase * (n_words * 32) + (w0 + w)[:, None] * 32 + j[None, :], mask=wm[:, None],
                        other=0)  # (NW, 32) int8
            word = tl.sum((f != 0).to(tl.int64) << j[None, :].to(tl.int64), 1)  # (NW,) distinct bits: sum = OR
            tl.store(map_ptr + tbase * n_words + w0 + w, word.to(tl.uint32).to(tl.int32, bitcast=True), mask=wm)
        else:
            word = tl.load(map_ptr + tbase * n_words + w0 + w, mask=wm, other=0).to(tl.int64) & 0xFFFFFFFF  # (NW,)
        pc = _popcount32(word).to(tl.int32)
        incl = tl.cumsum(pc, 0)
        tl.store(pre_ptr + tbase * n_words + w0 + w, run + incl - pc, mask=wm)
        on = ((word[:, None] >> j[None, :].to(tl.int64)) & 1) != 0  # (NW, 32)
        rank = tl.reshape(tl.cumsum(tl.reshape(on.to(tl.int32), [NW * 32]), 0), [NW, 32]) - on.to(tl.int32)
        pos = run + rank
        tl.store(blk_ptr + tbase * cap + pos, (w0 + w)[:, None] * 32 + j[None, :], mask=on & (pos < cap))
        run += tl.sum(pc, 0)
    tl.store(cnt_ptr + tbase, run)


class SparsePlan:
    """Union key blocks per query tile and the per-(block, row) key bitmasks; see the module docstring."""

    def __init__(self, blk: torch.Tensor, bits: torch.Tensor, cnt: torch.Tensor, block_m: int, cap: int):
        self.blk, self.bits, self.cnt, self.block_m, self.cap = blk, bits, cnt, block_m, cap

    @property
    def blocks(self) -> int:
        """Total (tile, key block) pairs: the dense tile work of one pass."""
        return int(self.cnt.sum())


def _sparse_attention_plan(idx: torch.Tensor, S: int, block_m: int) -> SparsePlan:
    """Three data-parallel passes, no serial merge: (1) block bitmap per tile (atomic OR per row segment),
    (2) bitmap -> block list + per-word prefix counts, (3) key masks per (tile, block slot, row) (atomic adds).
    idx is read twice (passes 1 and 3): 2 x B*H*T*w*4 bytes, the floor of any plan that reads idx."""
    B, H, T, W = idx.shape
    n_tiles = triton.cdiv(T, block_m)
    n_kblocks = triton.cdiv(S, BLOCK_N)
    n_words = triton.cdiv(n_kblocks, 32)
    cnt = torch.zeros(B * H, n_tiles, device=idx.device, dtype=torch.int32)
    if W == 0 or T == 0:  # no keys at all: every row outputs zeros
        return SparsePlan(cnt.new_zeros(B * H, n_tiles, 1), cnt.new_zeros(B * H, n_tiles, 1, block_m,
                          dtype=torch.int64), cnt, block_m, 1)
    grid = (n_tiles, B * H)
    ch = _CFG["plan_ch"] or (64 if block_m <= 64 else 32)  # (BM, CH) int64 tiles: registers at 64 x 64
    flags = _CFG["plan_flags"]
    bitmap = (torch.empty if flags else torch.zeros)(B * H, n_tiles, n_words, device=idx.device, dtype=torch.int32)
    prefix = torch.empty(B * H, n_tiles, n_words, device=idx.device, dtype=torch.int32)
    # byte map variant: T/64 x S/64 bytes per head (12 MB at 64k x 12 heads), no atomics in pass 1
    fmap = torch.zeros(B * H, n_tiles, n_words * 32, device=idx.device, dtype=torch.int8) if flags else bitmap
    _sparse_attention_plan_scan_kernel[grid](
        idx_ptr=idx, map_ptr=bitmap, pre_ptr=prefix, bits_ptr=fmap, T=T, W=W, n_tiles=n_tiles,
        n_words=n_words, cap=1, BITS=False, BM=block_m, BN=BLOCK_N, CH=ch, FLAGS=flags,
        num_warps=_CFG["plan_warps"],
    )
    # First guess of blocks per tile: SEA rows are runs, so the union is a few times w / BN; rerun if exceeded.
    cap = max(1, min(n_kblocks, 4 * triton.cdiv(W, BLOCK_N) + 8))
    nw = min(32, triton.next_power_of_2(n_words))
    for _ in range(2):
        blk = torch.empty(B * H, n_tiles, cap, device=idx.device, dtype=torch.int32)
        _sparse_attention_plan_compact_kernel[grid](
            map_ptr=bitmap, pre_ptr=prefix, blk_ptr=blk, cnt_ptr=cnt, flag_ptr=fmap, n_tiles=n_tiles,
            n_words=n_words, n_kblocks=n_kblocks, cap=cap, NW=nw, FLAGS=flags, num_warps=4,
        )
        need = int(cnt.max())  # the one host sync of a call
        if need <= cap:
            break
        cap = need
    bits = torch.zeros(B * H, n_tiles, cap, block_m, device=idx.device, dtype=torch.int64)
    _sparse_attention_plan_scan_kernel[grid](
        idx_ptr=idx, map_ptr=bitmap, pre_ptr=prefix, bits_ptr=bits, T=T, W=W, n_tiles=n_tiles,
        n_words=n_words, cap=cap, BITS=True, BM=block_m, BN=BLOCK_N, CH=ch, num_warps=_CFG["plan_warps"],
    )
    return SparsePlan(blk, bits, cnt, block_m, cap)


_BIG = tl.constexpr(1 << 62)  # "no more keys": past every key block


@triton.jit
def _span_at(row_ptr, p, c, L, K, live):
    """[start, end) of each row's slot p (int64); BIG for both past the row's last kept column or where not live."""
    j = tl.load(row_ptr + p, mask=live & (p < c), other=-1).to(tl.int64)
    ok = live & (p < c) & (j >= 0)
    start = tl.where(ok, j * L // K, _BIG)
    end = tl.where(ok, (j + 1) * L // K, _BIG)
    return start, end



@triton.jit
def _block_masks(row_ptr, p, pos, end, c, L, K, lo, hi, BM: tl.constexpr):
    """Each row's key mask inside the block [lo, hi) (BM,) int64, walking its sorted spans: a span shorter than the
    block adds several runs, and a row moves on to its next column once its span ends in the block. Returns
    (mask, pos, end, p): the next uncovered key, its span's end and column slot per row."""
    mask = tl.zeros([BM], tl.int64)
    act = pos < hi
    while tl.max(act.to(tl.int32), 0) > 0:
        a = tl.maximum(pos, lo)
        z = tl.minimum(end, hi)
        ln = tl.maximum(z - a, 1)
        # ln in [1, 64]: 2 << (ln - 1) wraps to 0 at ln = 64, so (2 << (ln - 1)) - 1 is then all ones
        run = ((tl.full([BM], 2, tl.int64) << (ln - 1)) - 1) << (a - lo)
        mask |= tl.where(act & (z > a), run, 0)
        done = act & (end <= hi)  # the span ends in this block: the row moves on to its next column
        p = tl.where(done, p + 1, p)
        n_pos, n_end = _span_at(row_ptr, p, c, L, K, done)
        pos = tl.where(done, n_pos, tl.where(act, hi, pos))
        end = tl.where(done, n_end, end)
        act = pos < hi
    return mask, pos, end, p


@triton.jit
def _sparse_attention_cols_plan_kernel(
    cols_ptr, kvb_ptr, blk_ptr, bits_ptr, cnt_ptr,
    T, S, K, Hq, c, n_tiles, n_kblocks, cap,
    CAUSAL: tl.constexpr, HAS_KV: tl.constexpr, EMIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """One program per (tile of BM rows, b*Hq + h): the plan of the tile straight from the kept columns.

    Each row's kept columns are ascending, so its key spans are ascending and disjoint (reference.column_spans):
    the tile's union of key blocks is a merge of BM sorted span lists. Per row we keep the next key not yet
    covered (pos) and the end of its current span; the next block is min(pos) // BN over the rows; inside a
    block every row adds the bits of the spans that start there (a span shorter than BN: several per block) and
    moves on to its next column once a span ends in the block. Work per block is a few BM-wide vector steps:
    cols (B, H, T, c) is read once (c ints per row), idx (c * S / K ints per row) is never built.
    EMIT = False only counts the blocks per tile (to size the plan exactly); EMIT = True writes blocks and masks.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    r = tl.arange(0, BM)
    rows = tile * BM + r
    live = rows < T
    if CAUSAL:
        L = (S - T + rows + 1).to(tl.int64)  # keys the row's K columns span: [0, position]
    else:
        L = tl.zeros([BM], tl.int64) + S
    row_ptr = cols_ptr + (bh.to(tl.int64) * T + rows) * c  # (BM,)
    p = tl.zeros([BM], tl.int32)
    pos, end = _span_at(row_ptr, p, c, L, K, live)  # (BM,) int64
    base = (bh.to(tl.int64) * n_tiles + tile) * cap
    n = tl.zeros([], tl.int32)
    nb = tl.min(pos // BN, 0)
    while nb < n_kblocks:
        lo = nb * BN
        hi = lo + BN
        mask, pos, end, p = _block_masks(row_ptr, p, pos, end, c, L, K, lo, hi, BM)
        if HAS_KV:  # padding keys: one packed int64 of key_valid bits per (batch, key block)
            mask &= tl.load(kvb_ptr + b.to(tl.int64) * n_kblocks + nb)
        if tl.max((mask != 0).to(tl.int32), 0) > 0:
            if EMIT:
                tl.store(blk_ptr + base + n, nb.to(tl.int32))
                tl.store(bits_ptr + (base + n) * BM + r, mask)
            n += 1
        nb = tl.min(pos // BN, 0)
    tl.store(cnt_ptr + bh * n_tiles + tile, n)


def _pack_key_valid(key_valid: torch.Tensor, n_kblocks: int) -> torch.Tensor:
    """(B, S) bool -> (B, n_kblocks) int64, bit i of word j = key j * BLOCK_N + i is valid (bit 63 = sign bit)."""
    B, S = key_valid.shape
    kv = torch.nn.functional.pad(key_valid.to(torch.int64), (0, n_kblocks * BLOCK_N - S))
    shifts = torch.arange(BLOCK_N, device=kv.device, dtype=torch.int64)
    return (kv.view(B, n_kblocks, BLOCK_N) << shifts).sum(-1)  # distinct bits: the sum is the OR (wraps at bit 63)


def _check_cols(cols, S: int, causal: bool, key_valid, block_m: int) -> None:
    """ValueError naming the bad value unless cols is (B, H, T, c), block_m a tile height the kernels take, T <= S
    when causal, and key_valid (B, S) or None."""
    if cols.dim() != 4:
        raise ValueError(f"cols must be (B, H, T, c), got shape {tuple(cols.shape)}")
    if block_m not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be 16, 32, 64 or 128, got {block_m}")
    B, T = cols.shape[0], cols.shape[2]
    if causal and T > S:
        raise ValueError(f"causal needs T <= S, got T={T}, S={S}")
    if key_valid is not None and tuple(key_valid.shape) != (B, S):
        raise ValueError(f"key_valid must be (B, S) = {(B, S)}, got {tuple(key_valid.shape)}")


def sparse_attention_cols_plan(cols: torch.Tensor, K: int, S: int, causal: bool,
                               key_valid: torch.Tensor | None = None, block_m: int = 64) -> SparsePlan:
    """The block plan of the keys that kept compressed columns `cols` (B, H, T, c) stand for (spans of
    reference.column_spans, padding keys dropped): the plan `sparse_attention_plan` builds from
    `expand_columns_ref(cols, K, S, causal, key_valid)`, without ever writing idx. Two launches (count, then
    fill at the exact size) and one host sync."""
    _check_cols(cols, S, causal, key_valid, block_m)
    B, H, T, c = cols.shape
    n_tiles = triton.cdiv(T, block_m)
    n_kblocks = triton.cdiv(S, BLOCK_N)
    cnt = torch.zeros(B * H, n_tiles, device=cols.device, dtype=torch.int32)
    if c == 0 or T == 0 or S == 0:
        return SparsePlan(cnt.new_zeros(B * H, n_tiles, 1), cnt.new_zeros(B * H, n_tiles, 1, block_m,
                          dtype=torch.int64), cnt, block_m, 1)
    cols = cols.to(torch.int32).contiguous()
    kvb = _pack_key_valid(key_valid, n_kblocks).contiguous() if key_valid is not None else cnt
    grid = (n_tiles, B * H)
    args = dict(cols_ptr=cols, kvb_ptr=kvb, cnt_ptr=cnt, T=T, S=S, K=K, Hq=H, c=c, n_tiles=n_tiles,
                n_kblocks=n_kblocks, CAUSAL=bool(causal), HAS_KV=key_valid is not None, BM=block_m, BN=BLOCK_N,
                # few warps: each block step is a chain of BM-wide reductions (latency, not throughput), cheapest
                # within a warp; more programs then fit on a multiprocessor
                num_warps=_CFG["cols_plan_warps"])
    _sparse_attention_cols_plan_kernel[grid](blk_ptr=cnt, bits_ptr=cnt, cap=1, EMIT=False, **args)
    cap = max(1, int(cnt.max()))  # the one host sync of a call
    blk = torch.empty(B * H, n_tiles, cap, device=cols.device, dtype=torch.int32)
    bits = torch.empty(B * H, n_tiles, cap, block_m, device=cols.device, dtype=torch.int64)
    _sparse_attention_cols_plan_kernel[grid](blk_ptr=blk, bits_ptr=bits, cap=cap, EMIT=True, **args)
    return SparsePlan(blk, bits, cnt, block_m, cap)


def sparse_attention_plan(idx: torch.Tensor, S: int, block_m: int = 64) -> SparsePlan:
    """Build the block plan of `idx` (B, H, T, w) for keys of length S (two passes over idx)."""
    if idx.dim() != 4:
        raise ValueError(f"idx must be (B, H, T, w), got shape {tuple(idx.shape)}")
    if block_m not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be 16, 32, 64 or 128, got {block_m}")
    return _sparse_attention_plan(idx.to(torch.int32).contiguous(), S, block_m)


@triton.jit
def _attend_block(q, k_ptr, v_ptr, kv_base, nb, bits, m_i, l_i, acc, S, qk_scale,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step of the forward over key block nb, each row keeping the keys of its bitmask bits (BM,)
    int64: (BM x BN x D) products on tensor cores. Returns the updated (m_i, l_i, acc). A row whose mask is 0 stays
    exactly as it was (p = 0, alpha = 1, or all zero while it has no key yet)."""
    d = tl.arange(0, BLOCK_D)
    nb_cols = tl.arange(0, BN)
    keys = nb * BN + nb_cols  # (BN,)
    kv_off = kv_base + keys[:, None].to(tl.int64) * D + d[None, :]
    kvm = (keys < S)[:, None] & (d < D)[None, :]
    kb = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)  # (BN, BLOCK_D)
    vb = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)  # (BN, BLOCK_D)
    keep = ((bits[:, None] >> nb_cols[None, :].to(tl.int64)) & 1) != 0  # (BM, BN)
    s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale  # (BM, BN), log2 units
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: exp2(-inf) = 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _store_out(acc, l_i, m_i, o_ptr, lse_ptr, q_off, bh, T, rows, rmask, dmask):
    """out = acc / l and the row logsumexp (log2 units); a row with no key: zeros out, lse = +inf so that the
    backward's exp2(s - lse) = 0."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(o_ptr + q_off, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + bh.to(tl.int64) * T + rows, lse, mask=rmask)


@triton.jit
def _sparse_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, blk_ptr, bits_ptr, cnt_ptr,
    qk_scale, T, S, Hq, group, n_tiles, cap,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hk = (bh % Hq) // group
    rows = tile * BM + tl.arange(0, BM)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_off = (bh.to(tl.int64) * T + rows[:, None]) * D + d[None, :]
    q = tl.load(q_ptr + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0)  # (BM, BLOCK_D)
    kv_base = (b.to(tl.int64) * (Hq // group) + hk) * S * D
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    n_u = tl.load(cnt_ptr + bh * n_tiles + tile)
    base = (bh.to(tl.int64) * n_tiles + tile) * cap
    for u in range(n_u):
        nb = tl.load(blk_ptr + base + u)
        bits = tl.load(bits_ptr + (base + u) * BM + tl.arange(0, BM))  # (BM,) int64
        m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, kv_base, nb, bits, m_i, l_i, acc, S, qk_scale,
                                      D, BLOCK_D, BN, PREC)
    _store_out(acc, l_i, m_i, o_ptr, lse_ptr, q_off, bh, T, rows, rmask, dmask)


@triton.jit
def _sparse_attention_cols_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cols_ptr, kvb_ptr, order_ptr,
    qk_scale, T, S, K, Hq, group, c, n_kblocks,
    CAUSAL: tl.constexpr, HAS_KV: tl.constexpr, ORDER: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """The forward of `_sparse_attention_fwd_kernel` over the blocks `_sparse_attention_cols_plan_kernel` would list,
    found on the way: one program per (tile of BM rows, b*Hq + h) merges its rows' sorted key spans block by block
    (the plan kernel's loop) and runs each block with its key masks at once. The same blocks in the same order as
    the planned forward, so the same sums; no plan is written, and no host sync sizes it.

    ORDER: the tile's rows are slots [tile * BM, (tile + 1) * BM) of order (B * Hq, T), a permutation of each head's
    rows (`_row_order`), instead of consecutive rows. A row's result does not depend on the other rows of its tile
    (a block where its mask is 0 leaves it exactly as it was), so any order gives the same out and lse, bit for bit;
    an order that puts rows with the same columns together computes fewer blocks."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hk = (bh % Hq) // group
    r = tl.arange(0, BM)
    slot = tile * BM + r
    live = slot < T
    if ORDER:
        rows = tl.load(order_ptr + bh.to(tl.int64) * T + slot, mask=live, other=0)
    else:
        rows = slot
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_off = (bh.to(tl.int64) * T + rows[:, None]) * D + d[None, :]
    q = tl.load(q_ptr + q_off, mask=live[:, None] & dmask[None, :], other=0.0)  # (BM, BLOCK_D)
    kv_base = (b.to(tl.int64) * (Hq // group) + hk) * S * D
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    if CAUSAL:
        L = (S - T + rows + 1).to(tl.int64)
    else:
        L = tl.zeros([BM], tl.int64) + S
    row_ptr = cols_ptr + (bh.to(tl.int64) * T + rows) * c  # (BM,)
    p = tl.zeros([BM], tl.int32)
    pos, end = _span_at(row_ptr, p, c, L, K, live)  # (BM,) int64
    nb = tl.min(pos // BN, 0)
    while nb < n_kblocks:
        lo = nb * BN
        hi = lo + BN
        mask, pos, end, p = _block_masks(row_ptr, p, pos, end, c, L, K, lo, hi, BM)
        if HAS_KV:
            mask &= tl.load(kvb_ptr + b.to(tl.int64) * n_kblocks + nb)
        # a block whose masks are all 0 (only padding keys) changes no row (_attend_block), as the plan drops it
        m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, kv_base, nb, mask, m_i, l_i, acc, S, qk_scale,
                                      D, BLOCK_D, BN, PREC)
        nb = tl.min(pos // BN, 0)
    _store_out(acc, l_i, m_i, o_ptr, lse_ptr, q_off, bh, T, rows, live, dmask)


@triton.jit
def _sparse_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, blk_ptr, bits_ptr, cnt_ptr,
    qk_scale, scale, T, S, Hq, group, n_tiles, cap,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hk = (bh % Hq) // group
    rows = tile * BM + tl.arange(0, BM)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    nb_cols = tl.arange(0, BN)
    q_off = (bh.to(tl.int64) * T + rows[:, None]) * D + d[None, :]
    qm = rmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + q_off, mask=qm, other=0.0)  # (BM, BLOCK_D)
    do = tl.load(do_ptr + q_off, mask=qm, other=0.0)  # (BM, BLOCK_D)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + rows, mask=rmask, other=float("inf"))  # (BM,)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)  # (BM,)
    kv_base = (b.to(tl.int64) * (Hq // group) + hk) * S * D
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    n_u = tl.load(cnt_ptr + bh * n_tiles + tile)
    base = (bh.to(tl.int64) * n_tiles + tile) * cap
    for u in range(n_u):
        nb = tl.load(blk_ptr + base + u)
        keys = nb * BN + nb_cols
        kmask = keys < S
        kv_off = kv_base + keys[:, None].to(tl.int64) * D + d[None, :]
        kvm = kmask[:, None] & dmask[None, :]
        kb = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)  # (BN, BLOCK_D)
        vb = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)  # (BN, BLOCK_D)
        bits = tl.load(bits_ptr + (base + u) * BM + tl.arange(0, BM))
        keep = ((bits[:, None] >> nb_cols[None, :].to(tl.int64)) & 1) != 0
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)  # (BM, BN) probabilities
        dp = tl.dot(do, tl.trans(vb), input_precision=PREC)  # (BM, BN)
        ds = p * (dp - delta[:, None])  # (BM, BN) dL/dscore (before the scale)
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PREC)
        dv_b = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)  # (BN, BLOCK_D)
        dk_b = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)  # (BN, BLOCK_D)
        tl.atomic_add(dv_ptr + kv_off, dv_b, mask=kvm)
        tl.atomic_add(dk_ptr + kv_off, dk_b * scale, mask=kvm)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qm)


def _check(q, k, v, idx):
    check_attention_shapes(q, k, v, idx)
    if q.shape[-1] > 128:
        raise ValueError(f"head dim D must be <= 128, got {q.shape[-1]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _launch_cfg(q: torch.Tensor, block_m: int):
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    # fp32 inputs: full-precision dots (tf32 would be ~1e-3 off, far over torch's own fp32 error)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    num_warps = 8 if block_m >= 128 else 4
    return block_d, prec, num_warps


def _sparse_attention_fwd(q, k, v, plan: SparsePlan, scale: float):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    block_d, prec, num_warps = _launch_cfg(q, plan.block_m)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    n_tiles = triton.cdiv(T, plan.block_m)
    _sparse_attention_fwd_kernel[(n_tiles, B * Hq)](
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, lse_ptr=lse, blk_ptr=plan.blk, bits_ptr=plan.bits, cnt_ptr=plan.cnt,
        qk_scale=scale * math.log2(math.e), T=T, S=S, Hq=Hq, group=Hq // Hkv, n_tiles=n_tiles, cap=plan.cap,
        D=D, BLOCK_D=block_d, BM=plan.block_m, BN=BLOCK_N, PREC=prec, num_warps=_CFG["fwd_warps"] or num_warps,
        num_stages=_CFG["fwd_stages"],
    )
    return out, lse


def _sparse_attention_bwd(grad, q, k, v, out, lse, plan: SparsePlan, scale: float):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    block_d, prec, num_warps = _launch_cfg(q, plan.block_m)
    delta = (grad.float() * out.float()).sum(-1)  # (B, Hq, T): rowsum(dO * O), FlashAttention-2 Alg. 2
    dq = torch.empty_like(q)
    dk = torch.zeros(B, Hkv, S, D, device=q.device, dtype=torch.float32)
    dv = torch.zeros(B, Hkv, S, D, device=q.device, dtype=torch.float32)
    n_tiles = triton.cdiv(T, plan.block_m)
    _sparse_attention_bwd_kernel[(n_tiles, B * Hq)](
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=grad, lse_ptr=lse, delta_ptr=delta, dq_ptr=dq, dk_ptr=dk, dv_ptr=dv,
        blk_ptr=plan.blk, bits_ptr=plan.bits, cnt_ptr=plan.cnt,
        qk_scale=scale * math.log2(math.e), scale=scale, T=T, S=S, Hq=Hq, group=Hq // Hkv, n_tiles=n_tiles,
        cap=plan.cap, D=D, BLOCK_D=block_d, BM=plan.block_m, BN=BLOCK_N, PREC=prec, num_warps=num_warps,
        num_stages=2,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _prep(q, k, v, idx):
    _check(q, k, v, idx)
    return q.contiguous(), k.contiguous(), v.contiguous(), idx.to(torch.int32).contiguous()


def sparse_attention_triton(q, k, v, idx, scale: float, plan: SparsePlan | None = None, block_m: int = 64,
                            return_lse: bool = False):
    """Forward of sparse attention in Triton (no autograd; use sea_edge.kernels.sparse_attention for that).

    q (B, Hq, T, D), k/v (B, Hkv, S, D), idx (B, Hq, T, w) int32 ascending with -1 holes at the end.
    Returns out (B, Hq, T, D) in q's dtype (and the row logsumexp in log2 units, (B, Hq, T) fp32, if asked).
    A `plan` from `sparse_attention_plan(idx, S)` may be passed to reuse it (forward and backward, or layers that
    share a mask).
    """
    q, k, v, idx = _prep(q, k, v, idx)
    if plan is None:
        plan = _sparse_attention_plan(idx, k.shape[2], block_m)
    out, lse = _sparse_attention_fwd(q, k, v, plan, float(scale))
    return (out, lse) if return_lse else out


def sparse_attention_triton_bwd(grad, q, k, v, idx, scale: float, plan: SparsePlan | None = None,
                                block_m: int = 64):
    """Gradients (dq, dk, dv) of sparse attention; recomputes the forward (out, lse) from the same plan."""
    q, k, v, idx = _prep(q, k, v, idx)
    if plan is None:
        plan = _sparse_attention_plan(idx, k.shape[2], block_m)
    out, lse = _sparse_attention_fwd(q, k, v, plan, float(scale))
    return _sparse_attention_bwd(grad.contiguous(), q, k, v, out, lse, plan, float(scale))


def _cols_plan(q, k, cols, K, causal, key_valid, block_m):
    if tuple(cols.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"cols {tuple(cols.shape)} must start with q's (B, Hq, T) = {tuple(q.shape[:3])}")
    return sparse_attention_cols_plan(cols, K, k.shape[2], causal, key_valid, block_m)


def _row_order(cols: torch.Tensor, K: int, S: int, causal: bool) -> torch.Tensor:
    """(B * H, T) int32: each head's rows by the first key they keep (the start of their first column's span), rows
    that keep none last, ties in row order (a stable sort). SEA keeps few columns per row and head at long T (at
    k = 64: one from T = 16k bidirectional, one of three per token causal at 64k), so rows of one tile then share
    their spans. In their own order nearly every row of a tile that keeps a column in this head keeps another one,
    and the tile computes each of those columns' blocks for all its rows. Causal spans move with the row (its K
    columns split [0, position]): rows that start at the same key share most of their span, rows with the same
    column index do not."""
    B, H, T, _ = cols.shape
    first = cols[..., 0].to(torch.int64)
    L = torch.arange(S - T + 1, S + 1, device=cols.device) if causal else S  # keys the row's columns split
    key = torch.where(first >= 0, first * L // K, S)
    return torch.argsort(key.reshape(B * H, T), dim=-1, stable=True).to(torch.int32)


def _sparse_attention_cols_fwd(q, k, v, cols, K: int, causal: bool, scale: float, key_valid, block_m: int):
    """The forward straight from cols (`_sparse_attention_cols_fwd_kernel`): one launch, no plan, no host sync.
    q, k, v, cols as _prep returns them (cols starts with q's (B, Hq, T))."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    _check_cols(cols, S, causal, key_valid, block_m)
    c = cols.shape[3]
    out = torch.zeros_like(q) if c == 0 or S == 0 else torch.empty_like(q)
    lse = torch.full((B, Hq, T), float("inf"), device=q.device, dtype=torch.float32)
    if c == 0 or T == 0 or S == 0:
        return out, lse
    block_d, prec, _ = _launch_cfg(q, block_m)
    n_kblocks = triton.cdiv(S, BLOCK_N)
    cols = cols.to(torch.int32).contiguous()
    kvb = _pack_key_valid(key_valid, n_kblocks).contiguous() if key_valid is not None else cols
    # one column per row and head (SEA at k = 64 from T = 16k): the first key is the whole mask, and rows with the same
    # one share a tile. Several: rows that share the first column need not share the others, while neighbouring rows
    # of a smooth estimate share most (op bench at 64k, H100: 0.72 ms in row order against 1.33 sorted at k = 64
    # with 4 columns per head; 5.86 against 9.62 at k = 2048 with 8)
    ordered = _CFG["cols_sort_causal" if causal else "cols_sort_bidir"] and c == 1 and T > block_m
    order = _row_order(cols, K, S, causal) if ordered else cols
    _sparse_attention_cols_fwd_kernel[(triton.cdiv(T, block_m), B * Hq)](
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, lse_ptr=lse, cols_ptr=cols, kvb_ptr=kvb, order_ptr=order,
        qk_scale=scale * math.log2(math.e), T=T, S=S, K=K, Hq=Hq, group=Hq // Hkv, c=c, n_kblocks=n_kblocks,
        CAUSAL=bool(causal), HAS_KV=key_valid is not None, ORDER=ordered,
        D=D, BLOCK_D=block_d, BM=block_m, BN=BLOCK_N, PREC=prec,
        num_warps=_CFG["cols_fused_warps"],
    )
    return out, lse


def sparse_attention_cols_triton(q, k, v, cols, K: int, causal: bool, scale: float, key_valid=None,
                                 plan: SparsePlan | None = None, block_m: int | None = None,
                                 return_lse: bool = False):
    """Sparse attention over the keys that kept compressed columns stand for: equal to
    `sparse_attention_triton(q, k, v, expand_columns_ref(cols, K, S, causal, key_valid), scale)`, with the block plan
    built from cols (B, Hq, T, c) directly (sparse_attention_cols_plan): the (B, Hq, T, c * S / K) idx is never
    written or read. key_valid (B, S) bool or None. block_m: query rows per tile (None: the launch setting
    cols_fused_block_m for the fused forward, 64 with a plan)."""
    q, k, v, cols = _prep(q, k, v, cols)
    if plan is None and _CFG["cols_fused"]:
        bm = block_m or _CFG["cols_fused_block_m"]
        out, lse = _sparse_attention_cols_fwd(q, k, v, cols, K, causal, float(scale), key_valid, bm)
    else:
        block_m = block_m or 64
        if plan is None:
            plan = _cols_plan(q, k, cols, K, causal, key_valid, block_m)
        out, lse = _sparse_attention_fwd(q, k, v, plan, float(scale))
    return (out, lse) if return_lse else out


def sparse_attention_cols_triton_bwd(grad, q, k, v, cols, K: int, causal: bool, scale: float, key_valid=None,
                                     plan: SparsePlan | None = None, block_m: int = 64):
    """Gradients (dq, dk, dv) of sparse_attention_cols_triton (recomputes the forward's out and lse)."""
    q, k, v, cols = _prep(q, k, v, cols)
    if plan is None:
        plan = _cols_plan(q, k, cols, K, causal, key_valid, block_m)
    out, lse = _sparse_attention_fwd(q, k, v, plan, float(scale))
    return _sparse_attention_bwd(grad.contiguous(), q, k, v, out, lse, plan, float(scale))
