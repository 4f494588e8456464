"""Choosing the next token from a step's logits, NumPy only: greedy, or temperature sampling narrowed by top-k and
top-p (nucleus). Rows of a batch are independent; one numpy Generator carries the seed across steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sea_edge.errors import SeaEdgeError

__all__ = ["SamplingConfig", "next_tokens"]


@dataclass(frozen=True)
class SamplingConfig:
    """How `generate` picks tokens. Defaults: greedy, the reproducible choice (and what the tests compare)."""

    temperature: float = 0.0
    """0 = greedy (argmax); > 0 divides the logits before sampling."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (None = all)."""
    top_p: float | None = None
    """Sample among the smallest set of tokens whose probability reaches p (None = all)."""
    seed: int | None = None
    """Seed of the sampler (None: fresh entropy each call)."""

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise SeaEdgeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SeaEdgeError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise SeaEdgeError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) -> token ids (B,) int64."""
    if cfg.temperature == 0.0:
        return logits.argmax(-1).astype(np.int64)
    x = logits.astype(np.float64) / cfg.temperature  # (B, V), float64: exp of a sharp temperature stays finite
    if cfg.top_k is not None and cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]  # (B, 1)
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")  # (B, V) most likely first
        sorted_p = np.take_along_axis(p, order, -1)
        # keep a token while the mass before it is < p: the most likely token always stays
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < cfg.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))  # inverse-CDF sampling, one uniform per row
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)
