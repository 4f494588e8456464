"""Perplexity of a causal language model on a text, over non-overlapping windows.

Protocol (the same for the teacher and every SEA model, so numbers compare):
- The text is tokenized as one stream without special tokens and cut into consecutive windows of `seq_len`
  tokens (`sea_edge.data.token_windows`); the incomplete tail is dropped, and `max_windows` keeps the first N.
- Each window is scored independently: no state or cache carries across windows. The first token of a window has
  no context and is not scored, so tokens scored = windows * (seq_len - 1); every other token is predicted from
  all the tokens before it in its window. This is stricter than a sliding window with a long prefix (later tokens
  see between 1 and seq_len - 1 tokens of context), so it rises as seq_len falls.
- ppl = exp(total next-token negative log-likelihood / tokens scored), NLL in nats, summed in float64.

Peak memory is the process's resident-set high-water mark, `resource.getrusage(RUSAGE_SELF).ru_maxrss` (Linux
reports KiB), read after the last window: it covers everything the process has held so far, the loaded model
included, and cannot be reset, so it is an upper bound on what the evaluation itself needed. Where `resource` is
missing (Windows) psutil's current RSS is reported instead.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sea_edge.data import SPLITS, load_corpus, token_windows
from sea_edge.errors import SeaEdgeError
from sea_edge.runtime.perplexity import PerplexityResult, peak_rss_mib  # shared with the torch-free runtime
from sea_edge.teacher import DEFAULT_TEACHER, TeacherInfo, load_teacher, teacher_info

if TYPE_CHECKING:
    import torch

__all__ = ["EvalConfig", "EvalReport", "PerplexityResult", "evaluate", "peak_rss_mib", "perplexity"]


def perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of the causal LM `model` on `text` over non-overlapping `seq_len`-token windows (module docstring).

    `batch_size` windows go through the model at once (more memory, same result up to float rounding);
    `progress` shows a rich progress bar on stderr."""
    import torch

    info = teacher_info(model)
    if model.get_output_embeddings() is None or not info.causal:
        raise SeaEdgeError(
            f"perplexity needs a causal language model with an LM head; {info.name!r} is {type(model).__name__}"
        )
    if seq_len < 2:
        raise SeaEdgeError(f"seq_len must be >= 2 (the first token of each window is context only), got {seq_len}")
    if info.max_positions and seq_len > info.max_positions:
        raise SeaEdgeError(f"seq_len {seq_len} exceeds {info.name!r}'s maximum of {info.max_positions} positions")
    if batch_size < 1:
        raise SeaEdgeError(f"batch_size must be >= 1, got {batch_size}")

    windows = token_windows(tokenizer, text, seq_len, max_windows)  # (N, T)
    device = next(model.parameters()).device
    nll_sum = 0.0
    start = time.perf_counter()
    with torch.no_grad(), _progress_bar(progress, len(windows), f"perplexity T={seq_len}") as advance:
        for batch in windows.split(batch_size):
            nll_sum += _window_nll_sum(model, batch.to(device))
            advance(len(batch))
    seconds = time.perf_counter() - start

    n = len(windows)
    tokens = n * (seq_len - 1)
    nll = nll_sum / tokens
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=n * seq_len / seconds,
        peak_rss_mib=peak_rss_mib(),
        windows=n,
        seq_len=seq_len,
    )


def _window_nll_sum(model, ids: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows (B, T): position t predicts token t + 1."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    vocab = logits.shape[-1]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll.double())


class _progress_bar:
    """Context manager yielding `advance(n)`; a rich bar on stderr when enabled, a no-op otherwise."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._progress.__enter__()
        task = self._progress.add_task(self.description, total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


@dataclass
class EvalConfig:
    """What `sea-edge eval` measures."""

    model: str = DEFAULT_TEACHER  # known teacher name or local HF model directory
    split: str = "validation"  # held-out plays: the teacher never saw our split, and distillation trains on 'train'
    seq_len: int = 2048  # the context SEA is meant for; long enough that dense attention's T x T cost shows
    max_windows: int | None = None  # None: every window of the split
    batch_size: int = 1  # one window at a time keeps peak memory lowest on a small device
    estimator: str | None = None  # SEA estimator folder; None: the dense teacher
    k: int | None = None  # SEA budget override (keys per query); None: the estimator's own
    device: str = "cpu"

    def __post_init__(self):
        if self.split not in SPLITS:
            raise SeaEdgeError(f"unknown split {self.split!r}: expected one of {', '.join(SPLITS)}")
        if self.seq_len < 2:
            raise SeaEdgeError(
                f"seq_len must be >= 2 (the first token of each window is context only), got {self.seq_len}"
            )
        if self.max_windows is not None and self.max_windows < 1:
            raise SeaEdgeError(f"max_windows must be >= 1, got {self.max_windows}")
        if self.batch_size < 1:
            raise SeaEdgeError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.k is not None and self.k < 1:
            raise SeaEdgeError(f"k must be >= 1, got {self.k}")
        if self.k is not None and self.estimator is None:
            raise SeaEdgeError("--k applies to a SEA model: give --estimator too")
        if self.device not in ("cpu", "cuda"):
            raise SeaEdgeError(f"unknown device {self.device!r}: use cpu or cuda")


@dataclass(frozen=True)
class EvalReport:
    config: EvalConfig
    teacher: TeacherInfo
    result: PerplexityResult
    load_seconds: float


def evaluate(config: EvalConfig, progress: bool = False) -> EvalReport:
    """Load the model named in `config` and measure its perplexity on the corpus split (`sea-edge eval`)."""
    import contextlib

    status = contextlib.nullcontext()
    if progress:
        from rich.console import Console

        # bound to the real stderr now: load_teacher swallows sys.stderr while transformers prints its own bars
        status = Console(file=sys.stderr).status(f"loading {config.model} ...")
    start = time.perf_counter()
    with status:
        model, tokenizer = load_teacher(config.model)
        text = load_corpus(config.split)
        if config.estimator is not None:
            from sea_edge.estimator_io import apply_estimator, resolve_estimator

            path = resolve_estimator(config.model, config.estimator)
            apply_estimator(model, path, None if config.k is None else {"k": config.k})
        model.to(_device(config.device))
    load_seconds = time.perf_counter() - start
    result = perplexity(
        model,
        tokenizer,
        text,
        config.seq_len,
        max_windows=config.max_windows,
        batch_size=config.batch_size,
        progress=progress,
    )
    return EvalReport(config=config, teacher=teacher_info(model), result=result, load_seconds=load_seconds)


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SeaEdgeError("--device cuda asked for, but no CUDA GPU is available")
    return torch.device(name)
