"""A bidirectional estimator's query side in Triton (kernels/triton_performer.py) against
reference.performer_query_ref, and the estimator running it.

CPU: TRITON_INTERPRET=1 at tiny odd shapes (D and the feature count not powers of two, GQA, rows past a tile).
GPU (`-m gpu`): the default geometry (D = 64, m = 266, E = 128) at real lengths.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import performer_features_ref, performer_query_ref
from sea_edge.kernels.triton_performer import performer_query_triton

from sea_edge.testing import assert_close_to_ref, assert_rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make(B, H, Hkv, T, S, D, m, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = (lambda *s: torch.randn(*s, generator=g).to(DEV))
    q = rnd(B, H, T, D).to(dtype)
    proj = rnd(m, D)
    k, v = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    kf = performer_features_ref(k, proj)  # (B, Hkv, S, m)
    eye = torch.nn.functional.one_hot(torch.arange(S, device=DEV) * E // S, E).float()
    vals = torch.cat([v, eye.expand(B, Hkv, S, E), torch.ones(B, Hkv, S, 1, device=DEV)], -1)
    kv = kf.transpose(-1, -2) @ vals  # (B, Hkv, m, D + E + 1)
    ln_w, ln_b = 1 + 0.1 * rnd(2 * D + E), 0.1 * rnd(2 * D + E)
    return q, proj, kv, ln_w, ln_b


CASES = [  # B, H, Hkv, T, S, D, m, E
    (1, 2, 2, 37, 40, 16, 20, 8),
    (2, 4, 2, 19, 23, 12, 27, 5),  # GQA, D and m not powers of two
    (1, 3, 1, 1, 9, 8, 33, 16),  # one row, m over two feature blocks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}/{}-T{}-S{}-D{}-m{}-E{}".format(*c))
def test_performer_query_matches_reference(case):
    args = make(*case)
    out = performer_query_triton(*args)
    ref = performer_query_ref(*args)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_rel_err(out, ref, 1e-5)


def test_performer_query_rejects_bad_shapes():
    q, proj, kv, ln_w, ln_b = make(1, 2, 2, 5, 6, 8, 10, 4)
    with pytest.raises(ValueError, match="LayerNorm width"):
        performer_query_triton(q, proj, kv, ln_w[:-1], ln_b[:-1])
    with pytest.raises(ValueError, match="proj"):
        performer_query_triton(q, proj[:, :4], kv, ln_w, ln_b)
    with pytest.raises(ValueError, match="multiple"):
        performer_query_triton(q, proj, torch.cat([kv, kv, kv], 1), ln_w, ln_b)


def _estimator(causal):
    from sea_edge.config import SEAConfig
    from sea_edge.estimator import SEAEstimator

    torch.manual_seed(0)
    cfg = SEAConfig(k=8, compressed_width=16).resolve(causal=causal, head_dim=12)
    return SEAEstimator(cfg, 12, 4, max_positions=64).to(DEV)


def test_estimator_fused_query_side_matches_torch_path(monkeypatch):
    """The bidirectional estimator's logits with the query side in Triton equal its torch path's. On the CPU the
    fused branch is entered by making the inputs look like CUDA tensors to the estimator."""
    from sea_edge.attention import selectable_columns

    est = _estimator(False)
    B, T = 2, 21
    q, k, v = (torch.randn(B, n, T, 12, device=DEV) for n in (4, 2, 2))
    sel = selectable_columns(T, T, 16, False, DEV)
    with torch.no_grad():
        ref = est(q, k, v, sel).logits
        if not CUDA:
            monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        out = est(q, k, v, sel).logits
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("heads", [(12, 12), (9, 3)], ids=["12-12", "9-3"])
def test_performer_query_gpu_real_shapes(heads, dt):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    H, Hkv = heads
    args = make(1, H, Hkv, 16387, 16387, 64, 266, 128, dtype=dtype, seed=H)
    out = performer_query_triton(*args)
    exact = performer_query_ref(args[0].double(), *(a.double() for a in args[1:]))
    assert_close_to_ref(out, performer_query_ref(*args), exact, what=f"{dt} performer query")
