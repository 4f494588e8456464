"""NumPy twin of sea_edge.kernels.reference.sparse_attention_ref, for the runtime's segmented graphs on a device
without torch (and for the tests of the segmented executor): attention of each query row over the keys its idx row
lists, softmax(q . k[idx] * scale) @ v[idx].

Layout (kernels/reference.py): q (B, Hq, T, D); k, v (B, Hkv, S, D), query head h reads key/value head
h // (Hq / Hkv); idx (B, Hq, T, w) int32/int64, -1 = empty slot. A row with no key at all is 0. fp32 inside,
returned in q's dtype. Rows are processed `chunk` at a time, so the gathered keys, (B, Hq, chunk, w, D), bound the
memory; grouped-query heads are not expanded (q is viewed as (B, Hkv, g, T, D)), as in the export's function body.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sparse_attention_np"]


def sparse_attention_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, idx: np.ndarray, scale: float,
                        chunk: int = 256) -> np.ndarray:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or idx.ndim != 4:
        raise ValueError(f"expected 4-d q, k, v, idx; got {q.ndim}, {k.ndim}, {v.ndim}, {idx.ndim}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % Hkv or idx.shape[:3] != (B, Hq, T):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}, idx {idx.shape}")
    g, w = Hq // Hkv, idx.shape[3]
    kf, vf = k.astype(np.float32, copy=False), v.astype(np.float32, copy=False)
    qv = q.astype(np.float32, copy=False).reshape(B, Hkv, g, T, D)
    iv = idx.reshape(B, Hkv, g, T, w)
    out = np.empty((B, Hkv, g, T, D), np.float32)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        ii = iv[:, :, :, t0:t1].astype(np.int64)  # (B, Hkv, g, t, w)
        valid = ii >= 0
        flat = np.maximum(ii, 0).reshape(B, Hkv, -1, 1)  # (B, Hkv, g t w, 1)
        kg = np.take_along_axis(kf, flat, axis=2).reshape(B, Hkv, g, t1 - t0, w, D)
        vg = np.take_along_axis(vf, flat, axis=2).reshape(B, Hkv, g, t1 - t0, w, D)
        s = np.einsum("bhgtd,bhgtwd->bhgtw", qv[:, :, :, t0:t1], kg) * np.float32(scale)
        s = np.where(valid, s, -np.inf)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)  # a row with no key: exp(-inf) = 0 everywhere
        p = np.exp(s - m)
        den = p.sum(-1, keepdims=True)
        p = p / np.where(den > 0, den, 1.0)
        out[:, :, :, t0:t1] = np.einsum("bhgtw,bhgtwd->bhgtd", p, vg)
    return out.reshape(B, Hq, T, D).astype(q.dtype, copy=False)
