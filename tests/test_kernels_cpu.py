"""The op's dense CPU form (kernels/cpu_sparse_attention.py) against reference.sparse_attention_ref and its backward:
random idx with duplicates, holes, rows of all -1, w > S, GQA, several row chunks; and the op picking it."""

from __future__ import annotations

import pytest
import torch
from sea_edge.kernels import cpu_sparse_attention as cpu
from sea_edge.kernels import sparse_attention
from sea_edge.kernels.reference import sparse_attention_bwd_ref, sparse_attention_ref

from sea_edge.testing import assert_rel_err

# (B, Hq, Hkv, T, S, D, w)
CASES = [(2, 4, 2, 13, 30, 16, 7), (1, 6, 3, 63, 100, 60, 40), (1, 2, 2, 5, 9, 8, 20), (1, 3, 1, 111, 111, 24, 11)]


def _inputs(case, seed):
    B, Hq, Hkv, T, S, D, w = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    idx = torch.randint(-1, S, (B, Hq, T, w), generator=g, dtype=torch.int32)  # duplicates and holes anywhere
    idx[:, :, ::4] = -1  # rows with no key at all
    idx[:, :, 1, :2] = 0  # a key listed twice in one row
    return q, k, v, idx


@pytest.mark.parametrize("chunk_floats", [1 << 24, 300], ids=["one-chunk", "row-chunks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}x{}-T{}-S{}-D{}-w{}".format(*c))
def test_dense_form_equals_the_reference(case, chunk_floats, monkeypatch):
    monkeypatch.setattr(cpu, "_CHUNK_FLOATS", chunk_floats)
    q, k, v, idx = _inputs(case, sum(case))
    scale = case[5] ** -0.5
    out = cpu.sparse_attention_dense(q, k, v, idx, scale)
    ref = sparse_attention_ref(q, k, v, idx, scale)
    assert_rel_err(out, ref, 1e-5)
    assert out[:, :, ::4].abs().max() == 0  # no key: zeros, as in the reference
    grad = torch.randn_like(ref)
    for got, want in zip(cpu.sparse_attention_dense_bwd(grad, q, k, v, idx, scale),
                         sparse_attention_bwd_ref(grad, q, k, v, idx, scale), strict=True):
        assert_rel_err(got, want, 1e-5)


def test_dense_form_in_half_precision_returns_the_inputs_dtype():
    q, k, v, idx = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in _inputs(CASES[1], 7))
    out = cpu.sparse_attention_dense(q, k, v, idx, 0.2)
    assert out.dtype == torch.bfloat16
    assert_rel_err(out.float(), sparse_attention_ref(q, k, v, idx, 0.2).float(), 1e-2)


@pytest.mark.parametrize("S, w, dense", [(512, 128, True), (512, 64, True), (2048, 128, False), (16, 1, False)])
def test_the_op_takes_the_dense_form_where_it_pays(S, w, dense, monkeypatch):
    calls = []
    real = cpu.sparse_attention_dense
    monkeypatch.setattr(cpu, "sparse_attention_dense", lambda *a: calls.append(a) or real(*a))
    assert cpu.dense_pays(S, w) == dense
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8)
    idx = torch.randint(0, S, (1, 2, 3, w), dtype=torch.int32)
    out = sparse_attention(q, k, v, idx, 0.5)
    assert len(calls) == int(dense)
    assert_rel_err(out, sparse_attention_ref(q, k, v, idx, 0.5), 1e-5)


def test_op_gradients_through_the_dense_form():
    q, k, v, idx = _inputs(CASES[0], 3)
    assert cpu.dense_pays(k.shape[2], idx.shape[-1])
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    sparse_attention(*leaves, idx, 0.25).square().sum().backward()
    out = sparse_attention_ref(q, k, v, idx, 0.25)
    want = sparse_attention_bwd_ref(2 * out, q, k, v, idx, 0.25)
    for x, w in zip(leaves, want, strict=True):
        assert_rel_err(x.grad, w, 1e-5)
