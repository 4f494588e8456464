"""Plain-torch references for SEA's sparse attention and mask construction (fp32 inside, obvious, never fast).

Layout, stated once for the whole kernels package:
    q    (B, Hq, T, D)    queries; the T queries are the *last* T positions of the S keys (prefill: T == S,
                          one decode step: T == 1), so query t sits at absolute position S - T + t.
    k, v (B, Hkv, S, D)   keys and values; Hq is a multiple of Hkv (grouped-query attention: query head h reads
                          key/value head h // (Hq // Hkv)).
    probs (B, Hq, T, K)   estimated compressed attention probabilities (softmax over K per head), SEA.md step 3.
    cols (B, Hq, T, c)    kept compressed columns per head, ascending, -1 in unused slots (c = per-head cap).
    idx  (B, Hq, T, w)    kept key indices per query row, ascending, -1 in unused slots, all -1 at the end.
    img  (N, C, T, W)     the estimator's decoder image, N = B * Hq, C channels, W = K / r (decoder_ref).
    kv   (B, Hkv, m, D+E+1)  bidirectional Performer state: sum over keys of phi(k) [v, eye, 1] (performer_query_ref);
                          causal: the same sum over the keys before the first query (performer_causal_ref).

Compressed column j of a query row covers the keys [floor(j * L / K), floor((j + 1) * L / K)) where L = S for
bidirectional attention and L = pos + 1 for causal attention (the row's K columns cover only keys [0, pos],
SEA.md step 5). These half-open spans partition [0, L) exactly, so no key is ever listed twice; when L < K some
spans are empty and those columns can never be selected.

Nothing here allocates a (T x S) tensor: the largest intermediates are (B, H, T, K), (B, H, T, w) and a block of
rows' (B, Hkv, chunk, K + 1, D) gathered prefix sums (column_scores_ref).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "column_spans",
    "cumsum_rows",
    "row_columns",
    "select_columns_ref",
    "expand_columns_ref",
    "sparse_index_ref",
    "sparse_attention_ref",
    "sparse_attention_bwd_ref",
    "sparse_attention_cols_ref",
    "check_attention_shapes",
    "column_scores_ref",
    "column_scores_bwd_ref",
    "decoder_ref",
    "performer_features_ref",
    "performer_query_ref",
    "causal_linear_attention_ref",
    "performer_causal_ref",
    "performer_values",
    "performer_kv_ref",
    "encoder_ref",
    "mix_output_ref",
    "average_from_parts",
    "column_means",
]


def _query_lengths(T: int, S: int, causal: bool, device: torch.device) -> torch.Tensor:
    """L per query row: how many keys its K compressed columns span.  # (T,) int64"""
    if causal:
        return torch.arange(S - T + 1, S + 1, device=device, dtype=torch.int64)
    return torch.full((T,), S, device=device, dtype=torch.int64)


def column_spans(cols: torch.Tensor, K: int, S: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Key span [start, end) of each compressed column in `cols` (..., T, c); int64, computed in int64 so that
    j * L never overflows at long context."""
    T = cols.shape[-2]
    L = _query_lengths(T, S, causal, cols.device).view(T, 1)  # (T, 1)
    j = cols.to(torch.int64)
    return torch.div(j * L, K, rounding_mode="floor"), torch.div((j + 1) * L, K, rounding_mode="floor")


def row_columns(n_cols: int, n_keys: int | None, T: int, S: int, K: int, causal: bool, device) -> torch.Tensor:
    """Columns each query row keeps over all heads: `n_cols`, or with a key budget `n_keys`,
    max(1, n_keys // ceil(L / K)) where L is the row's key count: a causal row whose columns span fewer keys
    keeps more of them, so every row spends the same key budget (the last row of a causal prefill and every
    bidirectional row get exactly n_cols = n_keys // ceil(S / K)).  # (T,) int64"""
    if n_keys is None:
        return torch.full((T,), n_cols, device=device, dtype=torch.int64)
    L = _query_lengths(T, S, causal, device)
    span = torch.div(L + K - 1, K, rounding_mode="floor")
    return torch.clamp(torch.div(n_keys, span, rounding_mode="floor"), min=1)


def select_columns_ref(probs: torch.Tensor, n_cols: int, head_cap: int, S: int, causal: bool,
                       n_keys: int | None = None) -> torch.Tensor:
    """Grouped top-k (SEA.md step 4): per query token keep the `n_cols` largest entries of `probs` over all heads
    and columns together (budget shared across heads), with at most `head_cap` columns in any one head. With
    `n_keys`, the count varies per row instead (row_columns).

    The capped flattened top-k equals a greedy pass over all H*K entries in descending order that skips a head once
    it is full; we compute it as (1) each head's top `head_cap` columns, then (2) the top `n_cols` of those H*cap
    candidates. Ties: equal probabilities are taken lower column first within a head and lower head first across
    heads (stable sorts). Empty-span columns (L < K) are never selected; if fewer than `n_cols` columns are
    selectable, the rest of the budget stays unused.

    probs: (B, H, T, K) float. Returns cols (B, H, T, c) int32, c = min(head_cap, K), ascending, -1 padded.
    """
    B, H, T, K = probs.shape
    if n_cols < 1 or head_cap < 1:
        raise ValueError(f"n_cols and head_cap must be >= 1, got {n_cols} and {head_cap}")
    c = min(head_cap, K)
    allc = torch.arange(K, device=probs.device).expand(T, K)
    start, end = column_spans(allc, K, S, causal)  # (T, K)
    selectable = end > start  # (T, K)
    p = probs.float().masked_fill(~selectable, float("-inf"))  # (B, H, T, K)
    vals, cols = torch.sort(p, dim=-1, descending=True, stable=True)
    vals, cols = vals[..., :c], cols[..., :c]  # (B, H, T, c)
    flat = vals.permute(0, 2, 1, 3).reshape(B, T, H * c)  # (B, T, H*c), head-major
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices  # (B, T, H*c)
    n_row = row_columns(n_cols, n_keys, T, S, K, causal, probs.device)  # (T,)
    in_budget = torch.arange(H * c, device=probs.device) < n_row[:, None]  # (T, H*c), by rank
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, in_budget.expand(B, T, H * c))
    keep &= torch.isfinite(flat)
    keep = keep.view(B, T, H, c).permute(0, 2, 1, 3)  # (B, H, T, c)
    cols = torch.where(keep, cols, K)  # K sorts after every real column
    cols = torch.sort(cols, dim=-1).values
    return torch.where(cols == K, -1, cols).to(torch.int32)


def _span(S: int, K: int, span: int | None) -> int:
    need = max(1, math.ceil(S / K))
    if span is None:
        return need
    if span < need:
        raise ValueError(f"span {span} is narrower than a column of {S} keys over K={K} ({need})")
    return span


def expand_columns_ref(
    cols: torch.Tensor, K: int, S: int, causal: bool, key_valid: torch.Tensor | None = None, span: int | None = None
) -> torch.Tensor:
    """Mask interpolation (SEA.md step 5): turn kept compressed columns into per-row key indices.

    cols: (B, H, T, c) int, ascending with -1 padding. key_valid: optional (B, S) bool, False for padding keys,
    which are dropped. span: key slots per column, default ceil(S / K) (a fixed larger one keeps the output width
    independent of S). Returns idx (B, H, T, c * span) int32, ascending, -1 padded at the end.
    """
    B, H, T, c = cols.shape
    span = _span(S, K, span)
    start, end = column_spans(cols.clamp(min=0), K, S, causal)  # (B, H, T, c)
    key = start.unsqueeze(-1) + torch.arange(span, device=cols.device)  # (B, H, T, c, span)
    ok = (cols >= 0).unsqueeze(-1) & (key < end.unsqueeze(-1))
    if key_valid is not None:
        kv = key_valid.to(torch.bool)
        b = torch.arange(B, device=cols.device).view(B, 1, 1, 1, 1)
        ok &= kv[b, key.clamp(max=S - 1)]
    key = torch.where(ok, key, -1).reshape(B, H, T, c * span)
    # Compact: valid keys keep their ascending order, holes move to the end (stable sort on "is hole").
    hole = (key < 0).to(torch.int8)
    perm = torch.sort(hole, dim=-1, stable=True).indices
    return key.gather(-1, perm).to(torch.int32)


def sparse_index_ref(
    probs: torch.Tensor,
    n_cols: int,
    head_cap: int,
    S: int,
    causal: bool,
    key_valid: torch.Tensor | None = None,
    n_keys: int | None = None,
    span: int | None = None,
) -> torch.Tensor:
    """select_columns_ref then expand_columns_ref: compressed probabilities -> idx (B, H, T, w)."""
    K = probs.shape[-1]
    cols = select_columns_ref(probs, n_cols, head_cap, S, causal, n_keys)
    return expand_columns_ref(cols, K, S, causal, key_valid, span)


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
    """ValueError naming the bad shape unless q (B, Hq, T, D), k = v (B, Hkv, S, D), Hkv | Hq, idx (B, Hq, T, w)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or idx.dim() != 4:
        raise ValueError(f"expected 4-d q, k, v, idx; got {q.dim()}, {k.dim()}, {v.dim()}, {idx.dim()}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if tuple(idx.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"idx {tuple(idx.shape)} must start with q's (B, Hq, T) = {tuple(q.shape[:3])}")


def _row_chunks(k, v, idx, chunk):
    """Per block of `chunk` query rows: (t0, t1, kg, vg, valid, flat) with the rows' keys and values gathered,
    (B, Hq, t, w, D) in fp32, their validity (B, Hq, t, w) and the flat gather index (for scatters)."""
    B, Hq, T, w = idx.shape
    Hkv, D = k.shape[1], k.shape[-1]
    heads = torch.arange(Hq, device=k.device) // (Hq // Hkv)
    kh, vh = k[:, heads].float(), v[:, heads].float()  # (B, Hq, S, D)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        ii = idx[:, :, t0:t1].long()  # (B, Hq, t, w)
        flat = ii.clamp(min=0).reshape(B, Hq, -1, 1).expand(-1, -1, -1, D)
        kg = kh.gather(2, flat).view(B, Hq, t1 - t0, w, D)
        vg = vh.gather(2, flat).view(B, Hq, t1 - t0, w, D)
        yield t0, t1, kg, vg, ii >= 0, flat


def _probs(qc, kg, valid, scale):
    """Softmax over each row's kept keys (B, Hq, t, w); a row with no key at all is all zero."""
    s = torch.einsum("bhtd,bhtwd->bhtw", qc, kg) * scale
    return torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)  # all -inf -> NaN -> 0


def sparse_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float, chunk: int = 256
) -> torch.Tensor:
    """Attention restricted to the keys in `idx` (SEA.md step 6): softmax(q . k[idx] * scale) @ v[idx].

    q (B, Hq, T, D), k/v (B, Hkv, S, D), idx (B, Hq, T, w) with -1 for empty slots. A row with no key at all
    outputs zeros. Computed in fp32 and returned in q's dtype; rows are processed `chunk` at a time so the
    gathered keys, (B, Hq, chunk, w, D), bound the memory.
    """
    check_attention_shapes(q, k, v, idx)
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    for t0, t1, kg, vg, valid, _ in _row_chunks(k, v, idx, chunk):
        p = _probs(q[:, :, t0:t1].float(), kg, valid, scale)
        out[:, :, t0:t1] = torch.einsum("bhtw,bhtwd->bhtd", p, vg)
    return out.to(q.dtype)


def sparse_attention_bwd_ref(grad, q, k, v, idx, scale: float, chunk: int = 256):
    """Gradients (dq, dk, dv) of sparse_attention_ref, written out (fp32 inside, rows `chunk` at a time).

    Not autograd through the forward: inside a custom op's implementation the dispatcher is already below the
    autograd key, so `torch.enable_grad()` there records no graph. Softmax backward: ds = p * (dp - sum(p * dp)).
    Keys and values shared by several query heads (GQA) and rows sum their gradients.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dq = torch.empty(B, Hq, T, D, device=q.device, dtype=torch.float32)
    dkh = torch.zeros(B, Hq, S, D, device=q.device, dtype=torch.float32)
    dvh = torch.zeros(B, Hq, S, D, device=q.device, dtype=torch.float32)
    for t0, t1, kg, vg, valid, flat in _row_chunks(k, v, idx, chunk):
        qc, gc = q[:, :, t0:t1].float(), grad[:, :, t0:t1].float()
        p = _probs(qc, kg, valid, scale)  # (B, Hq, t, w)
        dp = torch.einsum("bhtd,bhtwd->bhtw", gc, vg)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale  # zero at holes since p = 0 there
        dq[:, :, t0:t1] = torch.einsum("bhtw,bhtwd->bhtd", ds, kg)
        dkh.scatter_add_(2, flat, torch.einsum("bhtw,bhtd->bhtwd", ds, qc).reshape(B, Hq, -1, D))
        dvh.scatter_add_(2, flat, torch.einsum("bhtw,bhtd->bhtwd", p, gc).reshape(B, Hq, -1, D))
    dk = dkh.view(B, Hkv, group, S, D).sum(2)
    dv = dvh.view(B, Hkv, group, S, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def sparse_attention_cols_ref(q, k, v, cols, K: int, causal: bool, scale: float, key_valid=None):
    """Sparse attention over the keys that kept compressed columns cols (B, Hq, T, c) stand for (SEA.md steps 5
    and 6 together): sparse_attention_ref over expand_columns_ref(cols, K, S, causal, key_valid)."""
    return sparse_attention_ref(q, k, v, expand_columns_ref(cols, K, k.shape[2], causal, key_valid), scale)


def cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum over dim 2 (T or S) of x (B, H, T, D): the causal average context, the keys' prefix sums.

    CUDA: scanned with T as the innermost dim. torch's CUDA scan over an outer dim runs one sequential loop per
    inner element, here B*H*D = 768 loops of length T: 24 ms per causal layer at T = 64k on an H200 (a quarter of
    the whole layer, torch.profiler, 2026-12-01; the keys' prefix sums of column_scores: 357 ms of a 3.27 s runtime
    prefill at S = 32768 on an H100, 2026-12-06), against a memory-bound pass over a transposed copy. CPU and ONNX
    export keep the plain form (same sums, and the exported graph stays as calibrated by the memory budget)."""
    if x.is_cuda:
        return x.transpose(2, 3).contiguous().cumsum(-1).transpose(2, 3)
    return x.cumsum(2)


def column_means(k, key_valid, K: int):
    """The mean valid row of each of the K bidirectional columns of k (B, Hkv, S, D), keys or values: (B, Hkv, K, D)
    fp32, 0 for a column without a valid key. When K divides S every column holds S / K keys and the sums are one
    reduction over a (K, S / K) view of k in its own dtype (fp32 accumulation); otherwise from the prefix sums at
    the K + 1 boundaries."""
    B, Hkv, S, D = k.shape
    if S % K == 0:
        kk = k if key_valid is None else k * key_valid[:, None, :, None].to(k.dtype)
        sums = torch.sum(kk.view(B, Hkv, K, S // K, D), dim=3, dtype=torch.float32)  # (B, Hkv, K, D)
        n = torch.full((B, K), S // K, device=k.device) if key_valid is None else \
            key_valid.view(B, K, S // K).sum(-1)  # (B, K)
    else:
        P, C = _key_prefix(k, key_valid)
        bounds = torch.div(torch.arange(K + 1, device=k.device) * S, K, rounding_mode="floor")  # (K + 1,)
        sums = P[:, :, bounds[1:]] - P[:, :, bounds[:-1]]  # (B, Hkv, K, D)
        n = (bounds[1:] - bounds[:-1]).expand(B, K) if C is None else C[:, bounds[1:]] - C[:, bounds[:-1]]  # (B, K)
    return torch.where(n[:, None, :, None] > 0, sums / n.clamp(min=1)[:, None, :, None].to(sums.dtype), 0.0)


def _key_prefix(k, key_valid, dtype=torch.float32):
    """Prefix sums of the valid keys P (B, Hkv, S + 1, D) in `dtype` and the valid-key counts C (B, S + 1) int64 (None
    without padding: a column's count is then its span), what column_scores needs besides q."""
    kf = k.to(dtype) if key_valid is None else k.to(dtype) * key_valid[:, None, :, None].to(dtype)
    P = torch.nn.functional.pad(cumsum_rows(kf), (0, 0, 1, 0))  # (B, Hkv, S + 1, D)
    C = None if key_valid is None else torch.nn.functional.pad(key_valid.to(torch.int64).cumsum(1), (1, 0))
    return P, C


def _column_bounds(T: int, S: int, K: int, causal: bool, device) -> torch.Tensor:
    """Each row's K + 1 column boundaries (T, K + 1) int64: column j of a row is [b_j, b_j+1) (column_spans)."""
    return column_spans(torch.arange(K + 1, device=device).expand(T, K + 1), K, S, causal)[0]


def _column_counts(C, bounds, B: int, dtype):
    """Valid keys per column (B, 1, T, K) in `dtype` (from the spans when there is no padding)."""
    if C is None:
        n = (bounds[:, 1:] - bounds[:, :-1]).expand(B, 1, -1, -1)
    else:
        cb = C[:, bounds]  # (B, T, K + 1)
        n = (cb[..., 1:] - cb[..., :-1]).unsqueeze(1)
    return n.to(dtype)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 inside, fp64 for fp64 inputs (the tests' exact answer)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def column_scores_ref(q: torch.Tensor, k: torch.Tensor, K: int, causal: bool, scale: float,
                      key_valid: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """The content term of the estimate: each query row's score against the mean key of each of its K compressed
    columns, scale * q . mean(k over the column's valid keys); 0 for a column without a valid key.

    q (B, Hq, T, D), k (B, Hkv, S, D), key_valid (B, S) bool or None. Returns (B, Hq, T, K) fp32 (fp64 for fp64
    inputs). A column's key sum
    is P[b_j+1] - P[b_j] with P the prefix sum of the keys, so a row needs only its K + 1 dot products
    Z_j = q . P[b_j], and the scores are (Z_j+1 - Z_j) / n_j: the prefix sums gathered at a block of `chunk` rows'
    boundaries, (B, Hkv, chunk, K + 1, D), bound the memory (linear in T; nothing is (T x S)).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    wd = _work_dtype(q)
    P, C = _key_prefix(k, key_valid, wd)
    bounds = _column_bounds(T, k.shape[2], K, causal, q.device)  # (T, K + 1)
    n = _column_counts(C, bounds, B, wd)  # (B, 1, T, K)
    out = torch.empty(B, Hq, T, K, device=q.device, dtype=wd)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        Pg = P[:, :, bounds[t0:t1]]  # (B, Hkv, c, K + 1, D)
        qc = q[:, :, t0:t1].to(wd).view(B, Hkv, g, t1 - t0, D)
        Z = torch.einsum("bhgcd,bhckd->bhgck", qc, Pg).reshape(B, Hq, t1 - t0, K + 1)
        out[:, :, t0:t1] = (Z[..., 1:] - Z[..., :-1]) * scale / n[:, :, t0:t1].clamp(min=1)
    return out


def column_scores_bwd_ref(grad, q, k, K: int, causal: bool, scale: float, key_valid=None, chunk: int = 256):
    """Gradients (dq, dk) of column_scores_ref, written out (fp32 inside; see sparse_attention_bwd_ref for why not
    autograd). With a_j = grad_j * scale / n_j: dZ_j = a_j-1 - a_j, dq = sum_j dZ_j P[b_j], dP[b_j] += dZ_j q, and a
    key s enters every P[x] with x > s, so dk_s = valid_s * sum_{x > s} dP[x] (a reversed cumulative sum)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    wd = _work_dtype(q)
    P, C = _key_prefix(k, key_valid, wd)
    bounds = _column_bounds(T, S, K, causal, q.device)  # (T, K + 1)
    n = _column_counts(C, bounds, B, wd)
    a = torch.where(n > 0, grad.to(wd) * scale / n.clamp(min=1), 0.0)  # (B, Hq, T, K)
    dZ = torch.nn.functional.pad(a, (1, 0)) - torch.nn.functional.pad(a, (0, 1))  # (B, Hq, T, K + 1)
    dq = torch.empty(B, Hq, T, D, device=q.device, dtype=wd)
    dP = torch.zeros(B, Hkv, S + 1, D, device=q.device, dtype=wd)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        b = bounds[t0:t1]  # (c, K + 1)
        dz = dZ[:, :, t0:t1].reshape(B, Hkv, g, t1 - t0, K + 1)
        dq[:, :, t0:t1] = torch.einsum("bhgck,bhckd->bhgcd", dz, P[:, :, b]).reshape(B, Hq, t1 - t0, D)
        qc = q[:, :, t0:t1].to(wd).view(B, Hkv, g, t1 - t0, D)
        contrib = torch.einsum("bhgck,bhgcd->bhckd", dz, qc).reshape(B, Hkv, -1, D)
        dP.index_add_(2, b.reshape(-1), contrib)
    dk = dP.flip(2).cumsum(2).flip(2)[:, :, 1:]  # dk_s = sum_{x >= s + 1} dP[x]
    if key_valid is not None:
        dk = dk * key_valid[:, None, :, None].to(wd)
    return dq.to(q.dtype), dk.to(k.dtype)


def _conv_rows(x: torch.Tensor, weight, bias, causal: bool, rows=None):
    """3x3 conv over the (T x W) image x (N, C, T, W), zero padding in W. Bidirectional: one zero row above and below.
    Causal in T: output row t sees rows t-2..t; `rows` (N, C, 2, W) are the two image rows before x (a decode step's
    state, zeros at the start). Returns the conv output and x's last two rows after them (None if bidirectional)."""
    F = torch.nn.functional
    if not causal:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias), None
    x = F.pad(x, (0, 0, 2, 0)) if rows is None else torch.cat([rows.to(x.dtype), x], dim=2)
    return F.conv2d(F.pad(x, (1, 1, 0, 0)), weight, bias), x[:, :, -2:]


def decoder_ref(img, w1, b1, ln_w, ln_b, w2, b2, causal: bool, rows1=None, rows2=None, eps: float = 1e-5,
                content=None, content_weight=None, selectable=None, heads: int = 1):
    """The estimator's decoder CNN (SEA.md step 3) on its (T x W) image of C channels, and what the logits get after it:

        z = LayerNorm_W(img + GELU(conv1(img)));  sub = conv2(z)  (r channels);  logits[..., x * r + i] = sub[i, :, x]
        logits += content_weight[h] * content;  logits = -inf where not selectable

    img (N, C, T, W) with N = B * heads (any strides); w1 (C, C, 3, 3), b1 (C,), ln_w, ln_b (W,), w2 (r, C, 3, 3),
    b2 (r,); rows1, rows2 (N, C, 2, W): causal only, the two rows of img and of z before these T rows (None: zeros);
    content (B, heads, T, K) and content_weight (heads,) or None; selectable (T, K) or (B, 1, T, K) bool or None.
    Returns logits (B, heads, T, K) and the new rows1, rows2 (None when bidirectional). Computes in img's dtype (the
    estimator runs it under autocast too); the pixel shuffle makes the full-width logits from r sub-columns per
    pixel, r times less convolution than convolving a (T x K) image.
    """
    N, C, T, W = img.shape
    y, rows1 = _conv_rows(img, w1, b1, causal, rows1)
    z = torch.nn.functional.layer_norm(img + torch.nn.functional.gelu(y), (W,), ln_w, ln_b, eps)
    sub, rows2 = _conv_rows(z, w2, b2, causal, rows2)  # (N, r, T, W)
    logits = sub.permute(0, 2, 3, 1).reshape(N // heads, heads, T, W * sub.shape[1])  # column x * r + i <- channel i
    if content is not None:
        logits = logits + content_weight.view(1, heads, 1, 1) * content
    if selectable is not None:
        logits = logits.masked_fill(~selectable, float("-inf"))
    return logits, rows1, rows2


PERFORMER_CLAMP = 30.0  # exp(30) * 64k keys stays far below fp32's max: the Performer's sums never overflow


def performer_features_ref(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Positive random features (FAVOR+, SEA.md step 1) of x (..., D) with projection proj (m, D) -> (..., m) fp32
    (fp64 for fp64 inputs).

    x is first scaled to norm D^(1/4), so the kernel approximated is exp(sqrt(D) cos(q, k)): a softmax over cosine
    similarity. With bounded norms the exponent is bounded, so no data-dependent stabiliser is needed; that keeps
    the causal prefix sums exactly causal and lets a decode step carry them as plain state."""
    D = x.shape[-1]
    wd = _work_dtype(x)
    xt = torch.nn.functional.normalize(x.to(wd), dim=-1) * D**0.25
    z = xt @ proj.to(wd).T - 0.5 * math.sqrt(D)
    return torch.exp(z.clamp(max=PERFORMER_CLAMP))


def performer_query_ref(q, proj, kv, ln_w, ln_b, eps: float = 1e-5):
    """What a bidirectional SEA estimator makes of its queries before the encoder MLP (SEA.md steps 1-2):

        num = phi(q) @ kv;  ctx = num[:-1] / num[-1];  x = LayerNorm([ctx, q / |q|])

    q (B, H, T, D); proj (m, D); kv (B, Hkv, m, D + E + 1) with H a multiple of Hkv (query head h reads kv head
    h // (H / Hkv)); ln_w, ln_b (2D + E,). Returns x (B, H, T, 2D + E) fp32 (fp64 for fp64 inputs)."""
    B, H, T, D = q.shape
    Hkv, m = kv.shape[1], kv.shape[2]
    qf = performer_features_ref(q, proj).view(B, Hkv, H // Hkv, T, m)
    wd = _work_dtype(q)
    num = (qf @ kv.to(wd).unsqueeze(2)).reshape(B, H, T, -1)  # (B, H, T, D + E + 1)
    ctx = num[..., :-1] / num[..., -1:].clamp(min=1e-30)
    x = torch.cat([ctx, torch.nn.functional.normalize(q.to(wd), dim=-1)], dim=-1)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)


def causal_linear_attention_ref(qf: torch.Tensor, kf: torch.Tensor, vals: torch.Tensor, state0: torch.Tensor,
                                chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention: out_t = qf_t @ (state0 + sum over s <= t of kf_s^T vals_s), query t and key t at the
    same position. qf (B, Hkv, g, T, m), kf (B, Hkv, T, m), vals (B, Hkv, T, W), state0 (B, Hkv, m, W). Returns
    out (B, Hkv, g, T, W) and the state after the last key (B, Hkv, m, W).

    Prefix sums in blocks of `chunk` tokens, all blocks at once (a handful of launches, not T / chunk): keys of
    earlier blocks enter through an exclusive prefix sum of per-block (m x W) states, keys of the same block through
    a (chunk x chunk) lower-triangular product. Memory is linear in T; nothing is (T x T)."""
    B, Hkv, g, T, m = qf.shape
    W = vals.shape[-1]
    c = torch.sym_min(chunk, T)  # sym_min: T may be a symbolic size under export
    N = (T + c - 1) // c
    pad = N * c - T
    kc = torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(B, Hkv, N, c, m)
    vc = torch.nn.functional.pad(vals, (0, 0, 0, pad)).view(B, Hkv, N, c, W)
    qc = torch.nn.functional.pad(qf, (0, 0, 0, pad)).view(B, Hkv, g, N, c, m)
    blocks = kc.transpose(-1, -2) @ vc  # (B, Hkv, N, m, W)
    before = blocks.cumsum(2) - blocks + state0.unsqueeze(2)  # exclusive prefix: keys of earlier blocks
    tri = torch.ones(c, c, device=qf.device, dtype=torch.bool).tril()
    scores = (qc @ kc.transpose(-1, -2).unsqueeze(2)) * tri  # (B, Hkv, g, N, c, c)
    out = scores @ vc.unsqueeze(2) + qc @ before.unsqueeze(2)  # (B, Hkv, g, N, c, W)
    rows = torch.arange(T, device=qf.device)  # index_select, not [:T]: a slice of a padded symbolic length
    return out.view(B, Hkv, g, N * c, W).index_select(3, rows), state0 + blocks.sum(2)  # is a guard to export


def performer_values(v: torch.Tensor, pos0: int, E: int, L: int) -> torch.Tensor:
    """What each key carries in a causal Performer: [v, eye, 1] (B, Hkv, T, D + E + 1) for the keys at positions
    pos0 .. pos0 + T - 1; eye is the one-hot of the key's column min(pos * E // L, E - 1) (SEA.md step 1)."""
    B, Hkv, T, _ = v.shape
    pos = torch.arange(pos0, pos0 + T, device=v.device)
    col = torch.clamp(torch.div(pos * E, L, rounding_mode="floor"), max=E - 1)
    eye = torch.nn.functional.one_hot(col, E).to(_work_dtype(v))
    ones = torch.ones(B, Hkv, T, 1, device=v.device, dtype=eye.dtype)
    return torch.cat([v.to(eye.dtype), eye.expand(B, Hkv, T, E), ones], dim=-1)


def performer_kv_ref(k, v, proj, E: int, L: int, pos0: int = 0, key_valid: torch.Tensor | None = None):
    """The keys' Performer state: sum over the keys of phi(k)^T [v, eye, 1] (B, Hkv, m, D + E + 1), fp32 (fp64 for
    fp64 inputs). k, v (B, Hkv, S, D) at positions pos0 .. pos0 + S - 1; padding keys (key_valid False) add nothing.
    Bidirectional: L = S (kv of performer_query_ref); causal: the keys before the first query (state0 of
    performer_causal_ref)."""
    kf = performer_features_ref(k, proj)
    if key_valid is not None:
        kf = kf * key_valid[:, None, :, None].to(kf.dtype)
    return kf.transpose(-1, -2) @ performer_values(v.to(kf.dtype), pos0, E, L)


def performer_causal_ref(q, k, v, proj, state0, ln_w, ln_b, eps: float, E: int, L: int, pos0: int,
                         key_valid: torch.Tensor | None = None, chunk: int = 128):
    """What a causal SEA estimator makes of its queries before the encoder MLP (SEA.md steps 1-2), the causal
    counterpart of performer_query_ref:

        num_t = phi(q_t) @ (state0 + sum over s <= t of phi(k_s) [v_s, eye_s, 1]);  ctx = num[:-1] / num[-1];
        x = LayerNorm([ctx, q / |q|])

    q (B, H, T, D); k, v (B, Hkv, T, D): the T keys at the queries' positions pos0 .. pos0 + T - 1; state0
    (B, Hkv, m, D + E + 1): the same sum over the keys before pos0 (zeros if none); key_valid (B, T) bool: padding
    keys add nothing; E eye columns over L positions. Returns x (B, H, T, 2D + E) and the state after the last key
    (B, Hkv, m, D + E + 1), fp32 (fp64 for fp64 inputs)."""
    B, H, T, _ = q.shape
    Hkv, m = k.shape[1], proj.shape[0]
    wd = _work_dtype(q)
    qf = performer_features_ref(q, proj).view(B, Hkv, H // Hkv, T, m)
    kf = performer_features_ref(k, proj)
    if key_valid is not None:
        kf = kf * key_valid[:, None, :, None].to(kf.dtype)
    vals = performer_values(v.to(wd), pos0, E, L)
    num, state = causal_linear_attention_ref(qf, kf, vals, state0.to(wd), chunk)
    num = num.reshape(B, H, T, -1)
    ctx = num[..., :-1] / num[..., -1:].clamp(min=1e-30)
    x = torch.cat([ctx, torch.nn.functional.normalize(q.to(wd), dim=-1)], dim=-1)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), ln_w.to(wd), ln_b.to(wd), eps), state


def encoder_ref(x, w1, b1, w2, b2, head_embed, w_rows, b_rows, w_mix, b_mix):
    """A SEA estimator's encoder MLP, its decoder's input rows and its output-mix scalars (SEA.md steps 2, 3 and 7):

        feat = Linear2(GELU(Linear1(x))) + head_embed[h];  img = to_rows(feat);  mix, gain = sigmoid(mixer(feat))

    x (B, H, T, F) the normalised encoder input; w1 (Wd, F), b1 (Wd,), w2 (Wd, Wd), b2 (Wd,), head_embed (H, Wd),
    w_rows (N, Wd), b_rows (N,), w_mix (2, Wd), b_mix (2,) as nn.Linear stores them (GELU: the exact erf form).
    Returns img (B, H, T, N), mix (B, H, T), gain (B, H, T) in x's dtype."""
    f = torch.nn.functional
    feat = f.linear(f.gelu(f.linear(x, w1, b1)), w2, b2) + head_embed[:, None, :]  # (B, H, T, Wd)
    mix, gain = torch.sigmoid(f.linear(feat, w_mix, b_mix)).unbind(-1)
    return f.linear(feat, w_rows, b_rows), mix, gain


def mix_output_ref(sparse, mix, gain, num, cnt, group: int, dtype):
    """A SEA layer's output (SEA.md step 7): mix * gain * sparse + (1 - mix) * avg, cast to `dtype`, where the
    average context avg of query head h is num[:, h // group] / max(cnt, 1).

    sparse (B, H, T, D); mix, gain (B, H, T, 1); num (B, H / group, T or 1, D) fp32 (T-stride 0 allowed: one
    average per head); cnt (B, T) or None (no division)."""
    avg = average_from_parts(num, cnt, group, sparse.shape[1])
    return (mix * gain * sparse.float() + (1.0 - mix) * avg).to(dtype)


def average_from_parts(num, cnt, group: int, n_heads: int):
    """The average context of each of n_heads query heads from its parts: num[:, h // group] / max(cnt, 1) (no
    division without cnt). num (B, n_heads / group, T or 1, D), cnt (B, T) or None -> (B, n_heads, T or 1, D)."""
    avg = num if cnt is None else num / cnt.clamp(min=1)[:, None, :, None]
    if group > 1:
        avg = avg[:, torch.arange(n_heads, device=avg.device) // group]
    return avg
