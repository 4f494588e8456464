"""The estimator's decoder CNN in Triton (kernels/triton_decoder.py) against reference.decoder_ref, and the estimator
running it.

CPU: TRITON_INTERPRET=1 at tiny odd shapes (channels, ratio and width not powers of two, T = 1 decode steps, causal
state rows, padding masks). GPU (`-m gpu`): the default decoder geometry at real lengths, error within twice torch's
own fp32 error against fp64.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import decoder_ref
from sea_edge.kernels.triton_decoder import decoder_triton

from sea_edge.testing import assert_close_to_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make(B, H, C, r, T, W, causal, rows, content, sel, seed=0, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    rnd = (lambda *s: torch.randn(*s, generator=g).to(dev))
    N, K = B * H, W * r
    args = dict(
        img=rnd(N, T, C, W).permute(0, 2, 1, 3),  # the estimator's strided view of to_rows' output
        w1=rnd(C, C, 3, 3) * 0.3, b1=rnd(C) * 0.1, ln_w=1 + 0.2 * rnd(W), ln_b=0.1 * rnd(W),
        w2=rnd(r, C, 3, 3) * 0.3, b2=rnd(r) * 0.1, causal=causal,
        rows1=rnd(N, C, 2, W) if rows else None, rows2=rnd(N, C, 2, W) if rows else None, eps=1e-5,
        content=rnd(B, H, T, K) if content else None, content_weight=rnd(H) if content else None, heads=H,
    )
    if sel == "shared":
        args["selectable"] = (torch.rand(T, K, generator=g) > 0.3).to(dev)
    elif sel == "batch":
        s = torch.rand(B, 1, T, K, generator=g) > 0.3
        s[0, 0, T // 2] = False  # a row with nothing selectable: all -inf
        args["selectable"] = s.to(dev)
    return args


def as64(args):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in args.items()}


def check(args):
    out, r1, r2 = decoder_triton(**args)
    ref, q1, q2 = decoder_ref(**args)  # torch fp32
    exact, e1, e2 = decoder_ref(**as64(args))
    assert out.shape == exact.shape and out.dtype == torch.float32
    inf = torch.isinf(exact)
    assert torch.equal(torch.isinf(out), inf), "the -inf of unselectable columns differ"
    assert_close_to_ref(out[~inf], ref[~inf], exact[~inf], what="logits")
    if args["causal"]:
        assert_close_to_ref(r1, q1, e1, what="rows1")
        assert_close_to_ref(r2, q2, e2, what="rows2")
    else:
        assert r1 is None and r2 is None


CASES = [  # B, H, C, r, T, W
    (1, 2, 4, 4, 37, 8),
    (2, 3, 3, 2, 11, 6),
    (1, 1, 4, 3, 1, 5),
    (2, 2, 4, 4, 2, 8),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}-H{}-C{}-r{}-T{}-W{}".format(*s))
def test_decoder_matches_reference(shape, causal):
    B, H, C, r, T, W = shape
    check(make(B, H, C, r, T, W, causal, rows=False, content=False, sel=None))


@pytest.mark.parametrize("sel", ["shared", "batch"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_decoder_content_and_mask(causal, sel):
    check(make(2, 3, 4, 4, 13, 8, causal, rows=causal, content=True, sel=sel, seed=1))


@pytest.mark.parametrize("T", [1, 2, 9])
def test_decoder_causal_state_rows(T):
    """A decode step's rows before the image (rows1, rows2) enter both convolutions; the returned rows chain."""
    check(make(1, 2, 4, 4, T, 8, True, rows=True, content=True, sel="shared", seed=T))


def test_decoder_chunks_chain_like_one_pass():
    """Causal: the image in two pieces, the second fed the first's rows, gives the rows of one pass."""
    a = make(1, 2, 4, 4, 19, 8, True, rows=False, content=False, sel=None, seed=3)
    whole, _, _ = decoder_triton(**a)
    first = dict(a, img=a["img"][:, :, :12])
    out1, r1, r2 = decoder_triton(**first)
    out2, _, _ = decoder_triton(**dict(a, img=a["img"][:, :, 12:], rows1=r1, rows2=r2))
    torch.testing.assert_close(torch.cat([out1, out2], 2), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_decoder_softmax_and_column_sums(causal):
    """softmax=True returns torch.softmax of the logits (NaN on a row with nothing selectable, as torch gives), and
    col_sums adds up each column's probabilities over the rows of three tiles, NaN rows as 0."""
    a = make(2, 3, 4, 4, 150, 8, causal, rows=causal, content=True, sel="batch", seed=5)
    sums = torch.full((6, 32), 0.5, device=DEV)  # added into, not overwritten
    probs, r1, r2 = decoder_triton(**a, softmax=True, col_sums=sums)
    logits, q1, q2 = decoder_ref(**a)
    ref = torch.softmax(logits, -1)
    nan = torch.isnan(ref)
    assert nan.any() and torch.equal(torch.isnan(probs), nan)
    torch.testing.assert_close(probs[~nan], ref[~nan], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums, 0.5 + torch.nansum(ref, 2).view(6, 32), rtol=1e-5, atol=1e-5)
    if causal:
        torch.testing.assert_close(r2, q2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="col_sums"):
        decoder_triton(**a, col_sums=sums)  # without softmax


def test_decoder_rejects_bad_shapes():
    a = make(1, 2, 4, 4, 5, 8, False, rows=False, content=False, sel=None)
    with pytest.raises(ValueError, match="LayerNorm width"):
        decoder_triton(**dict(a, ln_w=a["ln_w"][:5]))
    with pytest.raises(ValueError, match="selectable"):
        decoder_triton(**dict(a, selectable=torch.ones(5, 7, dtype=torch.bool, device=DEV)))
    with pytest.raises(ValueError, match="rows1"):
        decoder_triton(**dict(a, causal=True, rows1=torch.zeros(2, 4, 3, 8, device=DEV)))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_estimator_runs_the_fused_decoder(monkeypatch, causal):
    """The estimator with its decoder in Triton gives the logits and state of its torch path."""
    from sea_edge.attention import selectable_columns
    from sea_edge.config import SEAConfig
    from sea_edge.estimator import SEAEstimator

    torch.manual_seed(0)
    cfg = SEAConfig(k=8, compressed_width=16).resolve(causal=causal, head_dim=12)
    est = SEAEstimator(cfg, 12, 4, max_positions=64).to(DEV)
    with torch.no_grad():
        est.conv1.weight.normal_(0, 0.3)
        est.conv2.weight.normal_(0, 0.3)
        est.key_weight.uniform_(0.5, 2.0)
    B, T = 2, 23
    q, k, v = (torch.randn(B, n, T, 12, device=DEV) for n in (4, 2, 2))
    sel = selectable_columns(T, T, 16, causal, DEV)
    with torch.no_grad():
        monkeypatch.setattr(SEAEstimator, "_decoder", lambda self, img: decoder_ref)
        ref = est(q, k, v, sel)
        monkeypatch.setattr(SEAEstimator, "_decoder", lambda self, img: decoder_triton)
        out = est(q, k, v, sel)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    if causal:
        for a, b in zip(out.state, ref.state):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("T", [4097, 65536])
def test_decoder_gpu_real_shapes(T, causal):
    """The default geometry (C = 4, r = 4, K = 256 causal / 128 bidirectional, 12 heads) at real lengths."""
    W = 64 if causal else 32
    check(make(1, 12, 4, 4, T, W, causal, rows=causal, content=True, sel="shared", seed=T))


@gpu
@pytest.mark.gpu
def test_estimator_uses_triton_decoder_on_cuda_without_grad():
    from sea_edge.config import SEAConfig
    from sea_edge.estimator import SEAEstimator

    est = SEAEstimator(SEAConfig().resolve(causal=True, head_dim=64), 64, 9, max_positions=8192).cuda()
    img = torch.zeros(1, 4, 8, 64, device="cuda")
    with torch.no_grad():
        assert est._decoder(img) is decoder_triton
    assert est._decoder(img) is decoder_ref
