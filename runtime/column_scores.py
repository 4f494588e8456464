"""NumPy twin of sea_edge.kernels.reference.column_scores_ref, for the runtime's segmented graphs on a device without
torch: the estimate's content term, each query row's score against the mean valid key of each of its K compressed
columns, scale * q . mean(k over the column), 0 for a column without a valid key.

q (B, Hq, T, D), k (B, Hkv, S, D), key_valid (B, S) bool; query head h reads key head h // (Hq / Hkv). A causal row
t sees the last T - t keys less (its keys are the first S - T + t + 1), and its column j spans
[floor(j L / K), floor((j + 1) L / K)) of them, L its key count. With P the prefix sums of the valid keys, a row
needs only its K + 1 dot products Z_j = q . P[b_j]; rows are processed `chunk` at a time, so the gathered prefix
sums, (B, Hkv, chunk, K + 1, D), bound the memory (nothing is T x S). fp32 inside and out.
"""

from __future__ import annotations

import numpy as np

__all__ = ["column_bounds", "column_scores_np"]


def column_bounds(T: int, S: int, K: int, causal: bool) -> np.ndarray:
    """Each row's K + 1 column boundaries (T, K + 1) int64 (kernels.reference._column_bounds)."""
    L = np.arange(S - T + 1, S + 1, dtype=np.int64) if causal else np.full(T, S, np.int64)
    return (np.arange(K + 1, dtype=np.int64)[None, :] * L[:, None]) // K


def column_scores_np(q: np.ndarray, k: np.ndarray, key_valid: np.ndarray, K: int, causal: bool, scale: float,
                     chunk: int = 256) -> np.ndarray:
    if q.ndim != 4 or k.ndim != 4 or key_valid.ndim != 2:
        raise ValueError(f"expected 4-d q and k and 2-d key_valid; got {q.ndim}, {k.ndim}, {key_valid.ndim}")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hq % Hkv or key_valid.shape != (B, S) or (causal and T > S):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, key_valid {key_valid.shape}, causal {causal}")
    g = Hq // Hkv
    valid = key_valid.astype(bool, copy=False)
    kf = k.astype(np.float32, copy=False) * valid[:, None, :, None]
    P = np.zeros((B, Hkv, S + 1, D), np.float32)
    np.cumsum(kf, axis=2, out=P[:, :, 1:])
    C = np.zeros((B, S + 1), np.int64)
    np.cumsum(valid, axis=1, out=C[:, 1:])
    bounds = column_bounds(T, S, K, causal)  # (T, K + 1)
    qv = q.astype(np.float32, copy=False).reshape(B, Hkv, g, T, D)
    out = np.empty((B, Hkv, g, T, K), np.float32)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        b = bounds[t0:t1]  # (c, K + 1)
        Z = np.einsum("bhgcd,bhckd->bhgck", qv[:, :, :, t0:t1], P[:, :, b])  # (B, Hkv, g, c, K + 1)
        cb = C[:, b]  # (B, c, K + 1)
        n = (cb[..., 1:] - cb[..., :-1])[:, None, None].astype(np.float32)  # (B, 1, 1, c, K)
        out[:, :, :, t0:t1] = (Z[..., 1:] - Z[..., :-1]) * np.float32(scale) / np.maximum(n, 1)
    return out.reshape(B, Hq, T, K)
