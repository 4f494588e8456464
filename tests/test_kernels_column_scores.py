"""`sea_edge::column_scores` (the estimate's content term: q against the mean key of each compressed column): the
prefix-sum reference against an obvious one, the Triton kernel against the reference, gradients, the op's
registration.

CPU: TRITON_INTERPRET=1 at tiny odd shapes. GPU (`-m gpu`): real shapes in fp16/bf16/fp32, error bounded by twice
torch's own error in that dtype against fp64 (sea_edge.testing).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import column_scores, column_scores_bwd_ref, column_scores_ref, column_spans
from sea_edge.kernels.triton_column_scores import column_scores_triton

from sea_edge.testing import assert_close_to_ref, assert_rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def column_scores_naive(q, k, K, causal, scale, key_valid=None, dtype=torch.float64):
    """The definition, spelled out: a (T, K, S) membership of each key in each row's columns, the mean of the valid
    keys in each, and its dot product with the query. Quadratic: tiny shapes only."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    start, end = column_spans(torch.arange(K, device=q.device).expand(T, K), K, S, causal)  # (T, K)
    s = torch.arange(S, device=q.device)
    member = ((s >= start[..., None]) & (s < end[..., None])).to(dtype)  # (T, K, S)
    member = member.expand(B, T, K, S)
    if key_valid is not None:
        member = member * key_valid[:, None, None, :].to(dtype)
    n = member.sum(-1)  # (B, T, K)
    heads = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    kbar = torch.einsum("btks,bhsd->bhtkd", member, k[:, heads].to(dtype)) / n.clamp(min=1)[:, None, ..., None]
    out = torch.einsum("bhtd,bhtkd->bhtk", q.to(dtype), kbar) * scale
    return torch.where(n[:, None] > 0, out, 0.0)


def make_inputs(B, Hq, Hkv, T, S, D, dtype, g, pad=False):
    q = torch.randn(B, Hq, T, D, generator=g, device=DEV).to(dtype)
    k = (torch.randn(B, Hkv, S, D, generator=g, device=DEV) + 0.5).to(dtype)  # a mean: prefix sums grow with S
    key_valid = None
    if pad:
        key_valid = torch.ones(B, S, dtype=torch.bool, device=DEV)
        key_valid[0, : S // 3] = False  # left padding of the first sequence
        key_valid[-1, S // 2:: 3] = False  # and holes in the last
    return q, k, key_valid


CASES = [  # (B, Hq, Hkv, T, S, D, K, causal, pad)
    (1, 2, 2, 17, 17, 8, 4, True, False),
    (2, 4, 2, 23, 23, 12, 8, True, True),  # GQA, D not a power of two, padding
    (1, 3, 1, 5, 29, 16, 8, True, False),  # the last 5 of 29 positions (a decode-like chunk)
    (2, 2, 1, 1, 13, 8, 32, True, True),  # one row, K > S: empty columns
    (1, 2, 2, 31, 31, 10, 8, False, False),
    (2, 4, 2, 19, 19, 16, 32, False, True),  # bidirectional, K > S, padding
    (1, 2, 2, 32, 32, 10, 8, False, False),  # bidirectional, K divides S: the column sums as one reduction
    (2, 4, 2, 24, 24, 16, 8, False, True),  # the same with padding (a column of only padding keys)
]
IDS = [f"B{c[0]}-H{c[1]}/{c[2]}-T{c[3]}-S{c[4]}-D{c[5]}-K{c[6]}-{'causal' if c[7] else 'bidir'}"
       f"{'-pad' if c[8] else ''}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_definition(case):
    B, Hq, Hkv, T, S, D, K, causal, pad = case
    g = torch.Generator(DEV).manual_seed(1)
    q, k, key_valid = make_inputs(B, Hq, Hkv, T, S, D, torch.float32, g, pad)
    ref = column_scores_ref(q, k, K, causal, 0.3, key_valid, chunk=7)  # several row chunks
    exact = column_scores_naive(q.double(), k.double(), K, causal, 0.3, key_valid)
    assert ref.dtype == torch.float32 and ref.shape == (B, Hq, T, K)
    assert_rel_err(ref, exact, 1e-5)
    # a column without a valid key scores exactly 0
    start, end = column_spans(torch.arange(K, device=DEV).expand(T, K), K, S, causal)
    if (end <= start).any():
        assert (ref[..., end <= start] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_reference(case):
    B, Hq, Hkv, T, S, D, K, causal, pad = case
    g = torch.Generator(DEV).manual_seed(2)
    q, k, key_valid = make_inputs(B, Hq, Hkv, T, S, D, torch.float32, g, pad)
    out = column_scores_triton(q, k, K, causal, 0.3, key_valid)
    assert_rel_err(out, column_scores_ref(q, k, K, causal, 0.3, key_valid), 1e-5)


@pytest.mark.parametrize("block_m", [16, 64], ids=["tile16", "tile64"])
@pytest.mark.parametrize("pad", [False, True], ids=["", "pad"])
@pytest.mark.parametrize("K", [3, 8, 32])
def test_triton_causal_tiles(monkeypatch, K, pad, block_m):
    """Several row tiles of 16 (the kernel's window over each boundary's moves inside a tile), or tiles of 64 whose
    first boundaries take windows of 16 and 32 keys; K not a power of two and K above the tile, GQA, odd D, the
    last 70 of 90 positions."""
    from sea_edge.kernels import triton_column_scores

    monkeypatch.setitem(triton_column_scores._CFG, "scores_block_m", block_m)
    g = torch.Generator(DEV).manual_seed(K)
    q, k, key_valid = make_inputs(2, 4, 2, 70, 90, 20, torch.float32, g, pad)
    out = column_scores_triton(q, k, K, True, 0.3, key_valid)
    assert_rel_err(out, column_scores_ref(q, k, K, True, 0.3, key_valid), 1e-5)


@pytest.mark.parametrize("case", CASES[1::2], ids=IDS[1::2])
def test_gradients_match_autograd_of_definition(case):
    B, Hq, Hkv, T, S, D, K, causal, pad = case
    g = torch.Generator(DEV).manual_seed(3)
    q, k, key_valid = make_inputs(B, Hq, Hkv, T, S, D, torch.float32, g, pad)
    grad = torch.randn(B, Hq, T, K, generator=g, device=DEV)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    column_scores_naive(q64, k64, K, causal, 0.3, key_valid).backward(grad.double())
    dq, dk = column_scores_bwd_ref(grad, q, k, K, causal, 0.3, key_valid, chunk=5)
    assert_rel_err(dq, q64.grad, 1e-5, "dq")
    assert_rel_err(dk, k64.grad, 1e-5, "dk")
    # and through the op's registered autograd
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    column_scores(qa, ka, K, causal, 0.3, key_valid).backward(grad)
    assert_rel_err(qa.grad, q64.grad, 1e-5, "op dq")
    assert_rel_err(ka.grad, k64.grad, 1e-5, "op dk")


def test_op_registration():
    """Fake (meta) implementation, schema and autograd registration as torch.library checks them."""
    g = torch.Generator(DEV).manual_seed(4)
    q, k, key_valid = make_inputs(2, 4, 2, 9, 9, 8, torch.float32, g, pad=True)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.sea_edge.column_scores.default, (q, k, key_valid, 8, True, 0.25))
    torch.library.opcheck(torch.ops.sea_edge.column_scores.default, (q, k, None, 4, False, 0.25))


def test_bad_shapes_name_the_value():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        column_scores(q, torch.zeros(1, 2, 4, 8), 4, True, 1.0)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 8\)"):
        column_scores(q, torch.zeros(1, 3, 4, 6), 4, True, 1.0)


# -- GPU: real shapes ----------------------------------------------------------------------------------------------

GPU_CASES = [(1, 12, 12, 4096, 256, True), (1, 9, 3, 8191, 256, True), (2, 9, 3, 2047, 256, False),
             (1, 12, 12, 16384, 256, False)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dt", list(DT))
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"B{c[0]}-H{c[1]}/{c[2]}-T{c[3]}-K{c[4]}-{'causal' if c[5] else 'bidir'}"
                                                 for c in GPU_CASES])
def test_gpu_real_shapes(case, dt):
    B, Hq, Hkv, T, K, causal = case
    g = torch.Generator(DEV).manual_seed(5)
    q, k, key_valid = make_inputs(B, Hq, Hkv, T, T, 64, DT[dt], g, pad=B > 1)
    out = column_scores(q, k, K, causal, 0.125, key_valid)
    exact = column_scores_ref(q.double(), k.double(), K, causal, 0.125, key_valid)
    # torch's own computation in this dtype: the prefix sums and the products in the inputs' precision
    low = column_scores_ref(q, k, K, causal, 0.125, key_valid)
    assert_close_to_ref(out, low, exact, what=f"{dt} column scores")


def test_package_name_stays_the_op_after_its_kernel_module_loads():
    """Importing the Triton module must not rebind `sea_edge.kernels.column_scores` (a submodule of the same name
    once replaced the function with itself on the package the first time CUDA ran it)."""
    import importlib

    import sea_edge.kernels as kernels

    importlib.import_module("sea_edge.kernels.triton_column_scores")
    assert callable(kernels.column_scores) and kernels.column_scores is column_scores
