"""Perplexity on a device: the protocol of `sea_edge.evaluation.perplexity` (read its module docstring), rebuilt on
NumPy and the `tokenizers` package so that no torch is needed.

- The text is tokenized as one stream without special tokens and cut into consecutive windows of `seq_len` tokens,
  the tail dropped, the first `max_windows` kept (`token_windows`: sea_edge.data.window_ids, the same code as
  sea_edge.data.token_windows, including its shortcut of tokenizing only a prefix of a long text).
- Each window is scored independently; its first token is context only: tokens = windows * (seq_len - 1).
- ppl = exp(summed next-token NLL / tokens), NLL in nats summed in float64.
- Peak memory is the process's ru_maxrss after the run (loaded model included), as in sea_edge.evaluation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from sea_edge.data import window_ids

__all__ = ["PerplexityResult", "peak_rss_mib", "token_windows", "window_nll_sum"]

_ROWS = 256  # logit rows promoted to float64 at a time: (256, V) float64 is 100 MB at V = 49152


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity run (sea_edge.evaluation.perplexity and SeaSession.perplexity both return it)."""

    ppl: float  # exp(nll)
    nll: float  # mean next-token negative log-likelihood over the scored tokens, nats
    tokens: int  # tokens scored = windows * (seq_len - 1)
    seconds: float  # wall time of the forward passes (tokenization excluded)
    tokens_per_s: float  # tokens through the model per second, windows * seq_len / seconds (unscored ones too)
    peak_rss_mib: float  # process peak RSS after the run (peak_rss_mib)
    windows: int
    seq_len: int


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens from the start of `text`: int64 (N, seq_len), for a
    `tokenizers.Tokenizer`: sea_edge.data.window_ids (pure Python and NumPy) with that tokenizer's encoding."""
    return window_ids(lambda s: tokenizer.encode(s, add_special_tokens=False).ids, text, seq_len, max_windows)


def peak_rss_mib() -> float:
    """The process's peak resident set size in MiB (ru_maxrss; current RSS via psutil where resource is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # macOS: bytes, Linux: KiB


def window_nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL (nats, float64) of windows ids (B, T) under logits (B, T, V): position t predicts t + 1.
    Log-sum-exp in float64, a few hundred rows at a time so the float64 copy stays small."""
    B, T, _ = logits.shape
    total = 0.0
    for b in range(B):
        for s in range(0, T - 1, _ROWS):
            e = min(s + _ROWS, T - 1)
            x = logits[b, s:e].astype(np.float64)  # (rows, V)
            m = x.max(-1)
            lse = m + np.log(np.exp(x - m[:, None]).sum(-1))
            total += float((lse - x[np.arange(e - s), ids[b, s + 1:e + 1]]).sum())
    return total
