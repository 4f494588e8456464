"""Triton mask construction (select_columns, expand_columns, sparse_index) against the references: the int outputs
must be identical, ties included. CPU under TRITON_INTERPRET=1; GPU (`-m gpu`) at real shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import expand_columns_ref, select_columns_ref, sparse_index_ref
from sea_edge.kernels.mask import expand_columns, select_columns, sparse_index

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def make_probs(B, H, T, K, ties, g):
    probs = torch.rand(B, H, T, K, generator=g, device=DEV).softmax(-1)
    if ties:  # few distinct values: most comparisons are ties, exercising the order rules
        probs = (torch.rand(B, H, T, K, generator=g, device=DEV) * 4).floor() / 4
    return probs


# (B, H, T, K, S, causal, n_cols, head_cap, ties)
CASES = [
    (2, 3, 13, 16, 50, True, 10, 6, True),  # S not a multiple of K, early causal rows with L < K
    (1, 12, 7, 256, 300, False, 40, 8, False),  # H*K = 12*256
    (1, 9, 5, 256, 1000, True, 100, 300, True),  # H*K = 9*256, head_cap > K
    (2, 4, 31, 8, 100, True, 5, 3, False),
    (1, 2, 7, 32, 7, True, 64, 64, False),  # budget larger than every selectable column
    (1, 3, 9, 16, 40, False, 48, 2, True),  # budget larger than the heads' caps: each head keeps exactly its cap
    (2, 4, 11, 16, 30, True, 64, 3, False),
    (1, 12, 9, 64, 200, True, 3, 1, True),  # cap 1 (the layer's at long T): step (1) is one max per head
    (1, 12, 9, 64, 200, False, 3, 1, False),
    (2, 4, 11, 16, 30, True, 6, 2, False),  # cap 2 without ties: the second level is the threshold
    (1, 5, 9, 32, 90, False, 20, 16, True),  # the largest cap walked by levels (kernels/mask.py _ITER_MAX_C)
    (1, 5, 9, 32, 90, True, 20, 17, False),  # the smallest cap bisected
]


def cid(c):
    B, H, T, K, S, causal, n, cap, ties = c
    return f"B{B}-H{H}-T{T}-K{K}-S{S}-n{n}-cap{cap}-{'causal' if causal else 'bidir'}{'-ties' if ties else ''}"


@pytest.mark.parametrize("case", CASES, ids=cid)
def test_select_expand_identical(case):
    B, H, T, K, S, causal, n, cap, ties = case
    g = torch.Generator(DEV).manual_seed(hash(case) % 2**31)
    probs = make_probs(B, H, T, K, ties, g)
    cols = select_columns(probs, n, cap, S, causal)
    want = select_columns_ref(probs, n, cap, S, causal)
    assert cols.dtype == torch.int32 and torch.equal(cols, want)
    # a key budget instead of a column count: the per-row count (reference.row_columns) must match too
    n_keys = 3 * n
    per_row = select_columns_ref(probs, n, cap, S, causal, n_keys=n_keys)
    assert torch.equal(select_columns(probs, n, cap, S, causal, n_keys=n_keys), per_row)
    key_valid = torch.rand(B, S, generator=g, device=DEV) > 0.2
    for kv in (None, key_valid):
        got = expand_columns(want, K, S, causal, kv)
        assert got.dtype == torch.int32 and torch.equal(got, expand_columns_ref(want, K, S, causal, kv))
    wide = -(-S // K) + 2  # a layout wider than the keys need (SEAConfig.budget_length): same keys, more holes
    assert torch.equal(expand_columns(want, K, S, causal, key_valid, span=wide),
                       expand_columns_ref(want, K, S, causal, key_valid, span=wide))
    assert torch.equal(sparse_index(probs, n, cap, S, causal), sparse_index_ref(probs, n, cap, S, causal))


def test_select_ties_beyond_the_cap_in_heads_of_different_maxima():
    """Each head holds more ties at its top value than its cap, and the heads' tops differ: the budget must count
    only cap columns per head (not every tie), or a head with a higher top takes the whole budget."""
    g = torch.Generator(DEV).manual_seed(5)
    H, K = 4, 8
    probs = torch.stack([(torch.randint(0, 2, (2, 5, K), generator=g, device=DEV) + 2 * h) / 10 for h in range(H)], 1)
    for n in range(1, 2 * H + 1):
        assert torch.equal(select_columns(probs, n, 2, 40, False), select_columns_ref(probs, n, 2, 40, False)), n


@pytest.mark.parametrize("cap", [1, 3])
def test_select_never_keeps_minus_inf(cap):
    """A head whose estimate is -inf everywhere (masked out) keeps no column, even where the budget has room."""
    g = torch.Generator(DEV).manual_seed(cap)
    probs = torch.rand(1, 3, 6, 8, generator=g, device=DEV)
    probs[:, 1] = float("-inf")
    want = select_columns_ref(probs, 9, cap, 40, False)
    assert (want[:, 1] == -1).all() and torch.equal(select_columns(probs, 9, cap, 40, False), want)


def test_expand_unsorted_and_holes_in_the_middle():
    """expand keeps slot order like the reference, also for cols that are not ascending or have -1 inside."""
    cols = torch.tensor([[[[5, -1, 2, 9], [-1, -1, -1, -1], [0, 1, 2, 3]]]], dtype=torch.int32, device=DEV)
    for causal in (False, True):
        assert torch.equal(expand_columns(cols, 10, 37, causal), expand_columns_ref(cols, 10, 37, causal))


def test_select_handles_negative_zero_and_bf16():
    g = torch.Generator(DEV).manual_seed(5)
    probs = make_probs(1, 4, 9, 16, True, g)
    probs[..., ::3] = -0.0
    assert torch.equal(select_columns(probs, 12, 5, 40, False), select_columns_ref(probs, 12, 5, 40, False))
    pb = probs.to(torch.bfloat16)
    assert torch.equal(select_columns(pb, 12, 5, 40, True), select_columns_ref(pb, 12, 5, 40, True))


def test_mask_rejects_bad_inputs():
    with pytest.raises(ValueError, match="n_cols"):
        select_columns(torch.rand(1, 1, 2, 4, device=DEV), 0, 1, 8, False)
    with pytest.raises(ValueError, match="key_valid"):
        expand_columns(torch.zeros(1, 1, 2, 1, dtype=torch.int32, device=DEV), 4, 8, False,
                       torch.ones(2, 8, dtype=torch.bool, device=DEV))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("cap", [8, 1], ids=["cap8", "cap1"])
@pytest.mark.parametrize("H,T,causal", [(12, 4096, True), (9, 4093, False), (12, 16384, True)],
                         ids=["H12-T4096-causal", "H9-T4093-bidir", "H12-T16384-causal"])
def test_sparse_index_gpu(H, T, causal, cap):
    g = torch.Generator(DEV).manual_seed(T + H)
    probs = make_probs(1, H, T, 256, False, g)
    n = H * 4 if cap > 1 else 3  # cap 1: the layer's budget at long T (3 columns over the heads)
    cols = select_columns(probs, n, cap, T, causal)
    want = select_columns_ref(probs, n, cap, T, causal)
    assert torch.equal(cols, want)
    assert torch.equal(expand_columns(want, 256, T, causal), expand_columns_ref(want, 256, T, causal))
