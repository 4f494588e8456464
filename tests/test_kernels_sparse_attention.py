"""Triton sparse attention (forward, backward, the custom op) against the plain-torch reference.

CPU: the kernels run under TRITON_INTERPRET=1 at tiny odd shapes. GPU (`-m gpu`): real shapes in fp16/bf16/fp32,
error bounded by twice torch's own error in that dtype against an fp64 computation (sea_edge.testing).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import sparse_attention, sparse_attention_ref, sparse_index_ref
from sea_edge.kernels.triton_sparse_attention import sparse_attention_triton, sparse_attention_triton_bwd

from sea_edge.testing import assert_close_to_ref, assert_rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_gather(q, k, v, idx, scale, dtype, chunk=256):
    """The reference's computation in a chosen dtype: fp64 is the exact answer, q's dtype is torch's own
    low-precision computation (the yardstick of assert_close_to_ref)."""
    B, Hq, T, D = q.shape
    heads = torch.arange(Hq, device=q.device) // (Hq // k.shape[1])
    kh, vh = k[:, heads].to(dtype), v[:, heads].to(dtype)
    outs = []
    for t0 in range(0, T, chunk):
        ii = idx[:, :, t0:t0 + chunk].long()
        t = ii.shape[2]
        flat = ii.clamp(min=0).reshape(B, Hq, -1, 1).expand(-1, -1, -1, D)
        kg = kh.gather(2, flat).view(B, Hq, t, -1, D)
        vg = vh.gather(2, flat).view(B, Hq, t, -1, D)
        s = torch.einsum("bhtd,bhtwd->bhtw", q[:, :, t0:t0 + chunk].to(dtype), kg) * scale
        s = s.masked_fill(ii < 0, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        outs.append(torch.einsum("bhtw,bhtwd->bhtd", p, vg))
    return torch.cat(outs, 2)


def make_idx(kind, B, H, T, S, causal, g):
    """Test masks: 'sea' from the real mask references (random probs -> sparse_index_ref), 'random' sorted random
    key subsets of mixed lengths, 'holes' with whole rows of -1 and w > S, 'blocks' whole 64-key blocks."""
    if kind == "sea":
        K = 16 if S < 1024 else 256
        probs = torch.rand(B, H, T, K, generator=g, device=DEV).softmax(-1)
        cap = max(1, K // 4) if S < 1024 else 16  # about 256 keys per row at real shapes
        return sparse_index_ref(probs, max(1, H * cap // 2), cap, S, causal)
    w = S + 5 if kind == "holes" else max(1, S // 3)
    pos = torch.arange(S - T, S, device=DEV).view(1, 1, T, 1)
    score = torch.rand(B, H, T, S, generator=g, device=DEV)
    if kind == "blocks":  # whole 64-key blocks per row (bit 63 set, all ones), cut by S and causality
        w = S
        blocks = torch.rand(B, H, T, -(-S // 64), generator=g, device=DEV)
        score = blocks.repeat_interleave(64, -1)[..., :S] * 0.6  # a block is kept (< 0.3) whole or not at all
    if causal:
        score = score.masked_fill(torch.arange(S, device=DEV) > pos, 2.0)  # never kept
    keep = score < 0.3
    if kind == "holes":
        keep[:, :, ::3] = False  # every third row has no key at all
        keep[:, :, 1::5] = score[:, :, 1::5] < 1.5  # and some rows keep every allowed key
    keys = torch.where(keep, torch.arange(S, device=DEV), S)
    keys = torch.sort(keys, dim=-1).values[..., :w]
    if keys.shape[-1] < w:
        keys = torch.cat([keys, keys.new_full((B, H, T, w - keys.shape[-1]), S)], -1)
    return torch.where(keys >= S, -1, keys).to(torch.int32)


def make_qkv(B, Hq, Hkv, T, S, D, dtype, g):
    q = torch.randn(B, Hq, T, D, generator=g, device=DEV).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, device=DEV).to(dtype)
    return q, k, v


# (B, Hq, Hkv, T, S, D, causal, idx kind)
CPU_CASES = [
    (2, 4, 2, 63, 63, 60, True, "sea"),
    (1, 6, 3, 13, 77, 64, False, "sea"),
    (2, 4, 4, 7, 30, 60, True, "holes"),
    (1, 6, 3, 63, 100, 64, False, "random"),
    (1, 4, 2, 13, 13, 16, True, "random"),
    (1, 2, 1, 70, 200, 32, False, "blocks"),
    (1, 2, 2, 70, 200, 32, True, "blocks"),
]


def case_id(c):
    B, Hq, Hkv, T, S, D, causal, kind = c
    return f"B{B}-T{T}-S{S}-H{Hq}x{Hkv}-D{D}-{'causal' if causal else 'bidir'}-{kind}"


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_forward_fp32_interpreter(case):
    B, Hq, Hkv, T, S, D, causal, kind = case
    g = torch.Generator(DEV).manual_seed(hash(case) % 2**31)
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, torch.float32, g)
    idx = make_idx(kind, B, Hq, T, S, causal, g)
    scale = 1.0 / math.sqrt(D)
    out = sparse_attention_triton(q, k, v, idx, scale)
    assert torch.isfinite(out).all()
    exact = attention_gather(q.double(), k.double(), v.double(), idx, scale, torch.float64)
    assert_rel_err(out, exact, 1e-5)
    empty = (idx < 0).all(-1)
    assert (out[empty] == 0).all(), "rows without keys must output zeros"


@pytest.mark.parametrize("case", CPU_CASES[:4] + CPU_CASES[5:], ids=case_id)
def test_backward_fp32_interpreter(case):
    B, Hq, Hkv, T, S, D, causal, kind = case
    g = torch.Generator(DEV).manual_seed(1 + hash(case) % 2**31)
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, torch.float32, g)
    idx = make_idx(kind, B, Hq, T, S, causal, g)
    scale = 1.0 / math.sqrt(D)
    grad = torch.randn(B, Hq, T, D, generator=g, device=DEV)
    got = sparse_attention_triton_bwd(grad, q, k, v, idx, scale)
    qq, kk, vv = (x.double().requires_grad_(True) for x in (q, k, v))
    want = torch.autograd.grad(attention_gather(qq, kk, vv, idx, scale, torch.float64), (qq, kk, vv), grad.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_rel_err(a, b, 1e-5, what=name)


def test_block_m_and_plan_reuse():
    g = torch.Generator(DEV).manual_seed(7)
    q, k, v = make_qkv(1, 2, 1, 63, 90, 32, torch.float32, g)
    idx = make_idx("sea", 1, 2, 63, 90, True, g)
    from sea_edge.kernels.triton_sparse_attention import sparse_attention_plan

    ref = sparse_attention_ref(q, k, v, idx, 0.2)
    for bm in (16, 32):
        plan = sparse_attention_plan(idx, 90, block_m=bm)
        assert_rel_err(sparse_attention_triton(q, k, v, idx, 0.2, plan=plan), ref, 1e-5, what=f"block_m={bm}")


def plan_brute_force(idx, block_m, bn=64):
    """The plan by definition: per (b*h, tile) the sorted union of key blocks and, per (block, row), the int64 mask
    of kept keys (bit 63 as the sign bit)."""
    B, H, T, W = idx.shape
    rows_all = idx.reshape(B * H, T, W).cpu()
    out = {}
    for bh in range(B * H):
        for t in range((T + block_m - 1) // block_m):
            rows = rows_all[bh, t * block_m:(t + 1) * block_m].long()
            blks = sorted(set((rows[rows >= 0] // bn).tolist()))
            bits = torch.zeros(len(blks), block_m, dtype=torch.int64)
            for r in range(rows.shape[0]):
                for key in rows[r][rows[r] >= 0].tolist():
                    b = key % bn
                    bits[blks.index(key // bn), r] |= (1 << b) if b < 63 else -(1 << 63)
            out[bh, t] = (blks, bits)
    return out


# (B, H, T, S, w, block_m, density): bit 63 set, rows over several slot chunks, a first block-count guess too small
PLAN_CASES = [(1, 2, 63, 300, 40, 16, 0.1), (2, 1, 100, 700, 200, 32, 0.2), (1, 1, 70, 200, 130, 64, 0.9),
              (1, 2, 130, 129, 150, 128, 0.9), (1, 1, 5, 3000, 3000, 16, 0.3), (1, 1, 40, 3000, 10, 32, 0.005)]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: "B{}-H{}-T{}-S{}-w{}-bm{}-d{}".format(*c))
@pytest.mark.parametrize("flags", [False, True], ids=["bitmap", "bytemap"])
def test_plan_matches_brute_force(case, flags, monkeypatch):
    import importlib

    sa = importlib.import_module("sea_edge.kernels.triton_sparse_attention")
    monkeypatch.setitem(sa._CFG, "plan_flags", flags)  # both pass-1 variants (bench --sweep times them)
    sparse_attention_plan = sa.sparse_attention_plan

    B, H, T, S, w, bm, density = case
    g = torch.Generator(DEV).manual_seed(11)
    keys = torch.where(torch.rand(B, H, T, S, generator=g, device=DEV) < density, torch.arange(S, device=DEV), S)
    keys = torch.sort(keys, dim=-1).values[..., :w]
    keys = torch.cat([keys, keys.new_full((B, H, T, max(0, w - keys.shape[-1])), S)], -1)
    idx = torch.where(keys >= S, -1, keys).to(torch.int32)
    plan = sparse_attention_plan(idx, S, block_m=bm)
    for (bh, t), (blks, bits) in plan_brute_force(idx, bm).items():
        n = int(plan.cnt[bh, t])
        assert plan.blk[bh, t, :n].tolist() == blks, f"blocks of tile {t}, head {bh}"
        assert torch.equal(plan.bits[bh, t, :n, :bits.shape[1]].cpu(), bits), f"masks of tile {t}, head {bh}"


def test_op_cpu_is_reference_and_fake():
    g = torch.Generator("cpu").manual_seed(3)
    q = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 9, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 9, 8, generator=g, requires_grad=True)
    idx = torch.tensor([[0, 2, 4, -1]] * 5, dtype=torch.int32).expand(1, 2, 5, 4).contiguous()
    out = sparse_attention(q, k, v, idx, 0.3)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v, idx, 0.3))
    out.sum().backward()
    assert q.grad is not None and k.grad is not None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq, fk, fv = torch.empty(1, 2, 5, 8), torch.empty(1, 1, 9, 8), torch.empty(1, 1, 9, 8)
        fo = torch.ops.sea_edge.sparse_attention(fq, fk, fv, torch.empty(1, 2, 5, 4, dtype=torch.int32), 0.3)
        assert fo.shape == (1, 2, 5, 8)


def test_rejects_bad_inputs():
    q = torch.randn(1, 3, 5, 8)
    k = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="multiple"):
        sparse_attention_triton(q, k, k, torch.zeros(1, 3, 5, 2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="D must be"):
        big = torch.randn(1, 1, 2, 130)
        sparse_attention_triton(big, big, big, torch.zeros(1, 1, 2, 1, dtype=torch.int32), 1.0)


# ---------------------------------------------------------------- GPU: real shapes, every dtype
GPU_CASES = [
    (1, 4, 4, 4096, 4096, 64, True, "sea"),
    (2, 9, 3, 1111, 2048, 64, False, "sea"),
    (1, 8, 2, 2048, 2048, 60, True, "sea"),
    (1, 4, 2, 777, 1000, 128, False, "random"),
    (1, 4, 4, 513, 513, 96, True, "holes"),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DT), ids=list(DT))
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_forward_backward_gpu(case, dtype):
    B, Hq, Hkv, T, S, D, causal, kind = case
    dt = DT[dtype]
    g = torch.Generator(DEV).manual_seed(hash((case, dtype)) % 2**31)
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, dt, g)
    idx = make_idx(kind, B, Hq, T, S, causal, g)
    scale = 1.0 / math.sqrt(D)
    out = sparse_attention(q, k, v, idx, scale)  # the op: CUDA -> Triton
    exact = attention_gather(q.double(), k.double(), v.double(), idx, scale, torch.float64)
    theirs = attention_gather(q, k, v, idx, scale, dt)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, theirs, exact, what="out")

    grad = torch.randn(B, Hq, T, D, generator=g, device=DEV).to(dt)
    assert_grads_close(lambda q_, k_, v_: sparse_attention(q_, k_, v_, idx, scale), q, k, v, idx, scale, grad)


def assert_grads_close(fn, q, k, v, idx, scale, grad):
    """dq, dk, dv of fn(q, k, v) (our op) within 2x torch's own error in q's dtype of the fp64 gradients of the
    gathered reference over idx."""
    dt = q.dtype
    qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
    got = torch.autograd.grad(fn(qq, kk, vv), (qq, kk, vv), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = torch.autograd.grad(attention_gather(q64, k64, v64, idx, scale, torch.float64), (q64, k64, v64),
                               grad.double())
    ql, kl, vl = (x.detach().requires_grad_(True) for x in (q, k, v))
    torch_lp = torch.autograd.grad(attention_gather(ql, kl, vl, idx, scale, dt), (ql, kl, vl), grad)
    for name, a, t_, w_ in zip(("dq", "dk", "dv"), got, torch_lp, want):
        assert_close_to_ref(a, t_, w_, what=name)


def test_op_cpu_backward_matches_autograd_of_reference():
    g = torch.Generator("cpu").manual_seed(11)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 6, 13, 12), (2, 3, 20, 12),
                                                                           (2, 3, 20, 12)))
    idx = make_idx("holes", 2, 6, 13, 20, True, torch.Generator(DEV).manual_seed(2)).cpu()
    grad = torch.randn(2, 6, 13, 12, generator=g, dtype=torch.float64)
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    got = torch.autograd.grad(sparse_attention(qq, kk, vv, idx, 0.4), (qq, kk, vv), grad)
    q2, k2, v2 = (x.clone().requires_grad_(True) for x in (q, k, v))
    want = torch.autograd.grad(attention_gather(q2, k2, v2, idx, 0.4, torch.float64), (q2, k2, v2), grad)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_rel_err(a, b, 1e-5, what=name)
