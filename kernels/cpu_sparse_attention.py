"""The CPU implementation of `sea_edge::sparse_attention`: reference.sparse_attention_ref (and its backward) computed
over all S keys, with each row's idx turned into a count per key.

Why: the reference gathers each row's w keys and values, (B, Hq, t, w, D) in fp32, and a CPU gathers at about
0.7 G floats/s (2 cores, 2026-12-06): at T = S = 512, w = 128 (the default teacher's SEA layer in the test suite)
that was 26 ms of every 30 ms layer call. Over all keys the same rows are two BLAS GEMMs and a few (t, S) passes.
The row softmax is taken over logits q.k * scale + log(count): a key listed twice weighs twice and an unlisted key
(count 0) gets -inf, so the result is the reference's for any idx, duplicates and holes included (SEA's own idx has
neither duplicates nor gaps: reference.py). A row with no key outputs zeros, as in the reference.

Picked per call by `dense_pays(S, w)`: per row, the dense form's (S) passes cost about what the reference's
(w, D) gathers cost at S ~ 16 w. Rows go `rows_per_chunk` at a time so a chunk's (B, Hq, t, S) scores stay
near 2**24 floats (64 MB). Layout: reference.py.
"""

from __future__ import annotations

import torch

from .reference import check_attention_shapes, sparse_attention_bwd_ref, sparse_attention_ref

__all__ = ["DENSE_MAX_RATIO", "dense_pays", "sparse_attention_cpu", "sparse_attention_cpu_bwd",
           "sparse_attention_dense", "sparse_attention_dense_bwd"]

# S / w up to which the dense form is the faster one on a CPU. Measured on 2 cores (2026-12-06, 9/3 heads, D = 64,
# T = S): 4.7x faster at S / w = 4 (29 vs 137 ms at S = 512), even at 16 (623 vs 648 ms at S = 2048), 2x and 3x
# slower at 32 and 64
DENSE_MAX_RATIO = 8
_CHUNK_FLOATS = 1 << 24


def dense_pays(S: int, w: int) -> bool:
    """Whether the dense form beats the reference's gathers for rows of w slots over S keys."""
    return S <= DENSE_MAX_RATIO * max(w, 1)


def sparse_attention_cpu(q, k, v, idx, scale: float) -> torch.Tensor:
    """The op's CPU forward: the dense form where it pays (dense_pays), else the reference."""
    if dense_pays(k.shape[2], idx.shape[-1]):
        return sparse_attention_dense(q, k, v, idx, scale)
    return sparse_attention_ref(q, k, v, idx, scale)


def sparse_attention_cpu_bwd(grad, q, k, v, idx, scale: float):
    """The op's CPU backward, (dq, dk, dv) contiguous: the dense form where it pays, else the reference."""
    bwd = sparse_attention_dense_bwd if dense_pays(k.shape[2], idx.shape[-1]) else sparse_attention_bwd_ref
    return tuple(g.contiguous() for g in bwd(grad, q, k, v, idx, scale))


def _rows_per_chunk(B: int, Hq: int, S: int) -> int:
    return max(1, _CHUNK_FLOATS // max(1, B * Hq * S))


def _chunk_probs(q, kt, idx, scale):
    """Softmax over all S keys with the row's idx as multiplicities: (B, Hkv, G, t, S) fp32.
    q (B, Hkv, G, t, D) fp32, kt (B, Hkv, 1, D, S) fp32, idx (B, Hkv, G, t, w)."""
    s = torch.matmul(q, kt) * scale  # (B, Hkv, G, t, S)
    counts = torch.zeros_like(s).scatter_add_(-1, idx.long().clamp(min=0), (idx >= 0).to(s.dtype))
    return torch.softmax(s + counts.log(), dim=-1).nan_to_num(0.0)  # log 0 = -inf; an all -inf row -> NaN -> 0


def _grouped(x, Hkv):
    """(B, Hq, ...) -> (B, Hkv, G, ...): query head h reads key/value head h // G."""
    return x.view(x.shape[0], Hkv, x.shape[1] // Hkv, *x.shape[2:])


def sparse_attention_dense(q, k, v, idx, scale: float) -> torch.Tensor:
    """reference.sparse_attention_ref, computed over all keys (module docstring); fp32 inside, q's dtype out."""
    check_attention_shapes(q, k, v, idx)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kt = k.float().transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, D, S)
    vf = v.float().unsqueeze(2)  # (B, Hkv, 1, S, D)
    qg, ig = _grouped(q, Hkv), _grouped(idx, Hkv)
    out = torch.empty(B, Hkv, Hq // Hkv, T, D, dtype=torch.float32, device=q.device)
    step = _rows_per_chunk(B, Hq, S)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        p = _chunk_probs(qg[:, :, :, t0:t1].float(), kt, ig[:, :, :, t0:t1], scale)
        out[:, :, :, t0:t1] = torch.matmul(p, vf)
    return out.view(B, Hq, T, D).to(q.dtype)


def sparse_attention_dense_bwd(grad, q, k, v, idx, scale: float):
    """reference.sparse_attention_bwd_ref over all keys: (dq, dk, dv) in q's, k's and v's dtypes. With p the
    multiplicity-weighted softmax, ds = p * (dp - sum(p * dp)) holds as in the reference (a key listed c times has
    c equal logits, whose gradients add up to that of its one weighted term)."""
    check_attention_shapes(q, k, v, idx)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)  # (B, Hkv, 1, S, D)
    kt, vt = kf.transpose(-1, -2), vf.transpose(-1, -2)
    qg, gg, ig = _grouped(q, Hkv), _grouped(grad, Hkv), _grouped(idx, Hkv)
    dq = torch.empty(B, Hkv, Hq // Hkv, T, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, Hkv, S, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    step = _rows_per_chunk(B, Hq, S)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        qc, gc = qg[:, :, :, t0:t1].float(), gg[:, :, :, t0:t1].float()
        p = _chunk_probs(qc, kt, ig[:, :, :, t0:t1], scale)  # (B, Hkv, G, t, S)
        dp = torch.matmul(gc, vt)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale  # zero where p is zero
        dq[:, :, :, t0:t1] = torch.matmul(ds, kf)
        # the group's heads and the chunk's rows all sum into the shared keys: one GEMM over G * t
        dk += torch.matmul(ds.permute(0, 1, 4, 2, 3).flatten(3), qc.flatten(2, 3))  # (B, Hkv, S, D)
        dv += torch.matmul(p.permute(0, 1, 4, 2, 3).flatten(3), gc.flatten(2, 3))
    return dq.view(B, Hq, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
