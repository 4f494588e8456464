"""SEAConfig: the one configuration of SEA attention (paper defaults; SEA.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["SEAConfig", "budget"]


@dataclass(frozen=True)
class SEAConfig:
    """How each attention layer is replaced by SEA. Defaults are the paper's recommended values."""

    k: int = 64
    """Attention budget: real keys each query attends on average (64 in the paper's main runs)."""
    compressed_width: int | None = None
    """K, width of the estimated compressed attention; None = 256 for causal LMs, 128 for encoders (paper)."""
    n_features: int | None = None
    """Performer random features; None = round(D ln D), FAVOR+'s recommendation for head dim D."""
    mix: bool = True
    """Output mix of the sparse context with the average context (SEA.md step 7); False = sparse path only."""
    decoder_channels: int = 4
    """Channels of the decoder CNN over the (T x K) image (a few suffice: it sharpens, it does not reason)."""
    decoder_ratio: int = 4
    """r: the decoder's Linear emits rows of width K / r that are upsampled to K (cuts its parameters by r)."""
    head_cap_factor: float = 2.0
    """A head may take at most this many times its fair share of the shared budget; this bounds the width of the
    per-row key lists (ELL layout) while heads that need more keys still get more (SEA.md step 4)."""
    eye_width: int | None = None
    """Columns of the Performer's "eye" basis (SEA.md step 1); None = K. Causal: the columns split the model's
    max positions, so one holds max_positions / eye_width keys (32 for SmolLM2 at K = 256), while a mask column
    of a row at T holds T / K keys (8 at T = 2048): the estimate cannot tell apart the mask columns inside one eye
    column. A wider eye resolves them, at (D + eye_width + 1) / (D + K + 1) times the Performer's cost."""
    key_scores: bool = True
    """Add each query's score against the mean key of each compressed column (sea_edge::column_scores, a learned
    weight per head) to the estimate's logits: the content term that the Performer's random features miss. In
    SmolLM2's layers 3-10, which attend by content, it alone lifts mass recall at T = 2048, k = 64 from 0.22 to 0.50
    and SEA's perplexity from 1.32x to 1.11x the teacher's, before any training (estimators/NOTES.md)."""
    performer_chunk: int = 128
    """Tokens per block of the causal Performer prefix sum: bounds memory at (chunk x chunk) per head."""
    budget_length: int | None = None
    """Lay the mask out for up to this many keys (S <= budget_length) instead of the actual S, so that the idx
    width, and every shape after it, depends on no arithmetic on S: what a graph export with a dynamic sequence
    length needs (set it to the exported maximum context). None = from the actual S (eager use)."""
    causal: bool | None = None
    """None = take it from the teacher (decoder LM: causal, encoder: bidirectional)."""
    seed: int = 0
    """Seed of every estimator's initial weights (Performer projection included): same config, same model."""

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k (keys per query) must be >= 1, got {self.k}")
        if self.compressed_width is not None and self.compressed_width < 2:
            raise ValueError(f"compressed_width must be >= 2, got {self.compressed_width}")
        if self.n_features is not None and self.n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        if self.decoder_channels < 1:
            raise ValueError(f"decoder_channels must be >= 1, got {self.decoder_channels}")
        if self.decoder_ratio < 1:
            raise ValueError(f"decoder_ratio must be >= 1, got {self.decoder_ratio}")
        K = self.compressed_width
        if K is not None and K % self.decoder_ratio:
            raise ValueError(f"compressed_width {K} must be a multiple of decoder_ratio {self.decoder_ratio}")
        if self.head_cap_factor < 1.0:
            raise ValueError(f"head_cap_factor must be >= 1, got {self.head_cap_factor}")
        if self.budget_length is not None and self.budget_length < 1:
            raise ValueError(f"budget_length must be >= 1, got {self.budget_length}")
        if self.eye_width is not None and self.eye_width < 1:
            raise ValueError(f"eye_width must be >= 1, got {self.eye_width}")
        if self.performer_chunk < 1:
            raise ValueError(f"performer_chunk must be >= 1, got {self.performer_chunk}")

    def resolve(self, causal: bool, head_dim: int) -> SEAConfig:
        """A copy with every None filled in for a teacher (causal or not, head dim D)."""
        causal = self.causal if self.causal is not None else causal
        K = self.compressed_width or (256 if causal else 128)
        m = self.n_features or max(1, round(head_dim * math.log(head_dim)))
        out = dataclasses.replace(self, causal=causal, compressed_width=K, n_features=m)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SEAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SEAConfig fields: {sorted(unknown)}")
        return cls(**d)


def budget(cfg: SEAConfig, n_heads: int, S: int) -> tuple[int, int, int]:
    """(n_cols, head_cap, span): compressed columns kept per token over all heads, the most one head may take, and
    the widest key span of a column, ceil(S / K) (S = cfg.budget_length when set).

    Each column stands for up to `span` keys, so n_cols = floor(H k / span) keeps at most H*k keys per token (the
    paper's k*K/S columns per head, flattened over heads, SEA.md step 4); at least one column is always kept.
    """
    import torch  # lazy: the config itself is plain data

    K = cfg.compressed_width
    if cfg.budget_length is not None:
        if S > cfg.budget_length:
            raise ValueError(f"{S} keys exceed budget_length {cfg.budget_length}")
        S = cfg.budget_length
    # Integer arithmetic with torch.sym_min / sym_max only, so that under graph capture (torch.export, ONNX) S may be
    # a symbolic size: the budget becomes a few graph ops instead of a guard that specialises the length.
    span = (S + K - 1) // K  # S >= 1, so span >= 1
    n_cols = torch.sym_max(1, (n_heads * cfg.k) // span)
    fair = (n_cols + n_heads - 1) // n_heads
    f = Fraction(cfg.head_cap_factor)
    capped = (f.numerator * n_cols + f.denominator * n_heads - 1) // (f.denominator * n_heads)  # ceil(f n / H)
    head_cap = torch.sym_min(torch.sym_min(K, n_cols), torch.sym_max(fair, capped))
    return n_cols, head_cap, span
