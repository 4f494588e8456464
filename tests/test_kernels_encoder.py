"""The estimator's encoder MLP, decoder rows and mix in Triton (kernels/triton_encoder.py) against
reference.encoder_ref, and the estimator running it.

CPU: TRITON_INTERPRET=1 at tiny odd shapes (input width past one chunk and not a multiple of it, encoder width and
row width not powers of two and below 16). GPU (`-m gpu`): the default geometry at real lengths, error within twice
torch's own fp32 error against fp64, with and without TF32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import encoder_ref
from sea_edge.kernels.triton_encoder import encoder_triton
from sea_edge.testing import assert_close_to_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make(B, H, T, F, Wd, N, seed=0, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    rnd = (lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(dev))
    return dict(x=rnd(B, H, T, F), w1=rnd(Wd, F, scale=F**-0.5), b1=rnd(Wd, scale=0.1), w2=rnd(Wd, Wd, scale=Wd**-0.5),
                b2=rnd(Wd, scale=0.1), head_embed=rnd(H, Wd, scale=0.3), w_rows=rnd(N, Wd, scale=Wd**-0.5),
                b_rows=rnd(N, scale=0.1), w_mix=rnd(2, Wd, scale=Wd**-0.5), b_mix=rnd(2))


def check(args):
    out = encoder_triton(**args)
    ref = encoder_ref(**args)  # torch fp32
    exact = encoder_ref(**{k: v.double() for k, v in args.items()})
    for o, r, e, what in zip(out, ref, exact, ("img", "mix", "gain")):
        assert o.shape == e.shape and o.dtype == torch.float32, what
        assert_close_to_ref(o, r, e, what=what)


CASES = [  # B, H, T, F, Wd, N
    (1, 2, 37, 88, 40, 12),  # F past one chunk of 64, not a multiple of it; Wd and N not powers of two
    (2, 3, 5, 20, 24, 32),
    (1, 1, 1, 130, 16, 70),  # one row; N past one chunk of 64
]


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}-H{}-T{}-F{}-Wd{}-N{}".format(*s))
def test_encoder_matches_reference(shape):
    check(make(*shape))


def test_encoder_head_embedding_per_head():
    """Each head adds its own embedding row: swapping two heads' rows of x swaps their outputs only if the
    embeddings are equal, so with distinct embeddings the outputs of a head depend on its index."""
    a = make(1, 3, 9, 20, 16, 8, seed=2)
    a["x"][:, 1] = a["x"][:, 0]
    img, _, _ = encoder_triton(**a)
    ref, _, _ = encoder_ref(**a)
    torch.testing.assert_close(img, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(img[:, 0], img[:, 1])


def test_encoder_rejects_bad_shapes():
    a = make(1, 2, 5, 20, 16, 8)
    with pytest.raises(ValueError, match="w2 must be"):
        encoder_triton(**dict(a, w2=a["w2"][:, :5]))
    with pytest.raises(ValueError, match="head_embed must be"):
        encoder_triton(**dict(a, head_embed=a["head_embed"][:1]))
    with pytest.raises(ValueError, match="x must be"):
        encoder_triton(**dict(a, x=a["x"][0]))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_estimator_inference_path_matches_torch_path(monkeypatch, causal):
    """The estimator's GPU inference path (Performer, encoder and decoder in Triton; interpreted here) gives the
    logits, mix, gain and causal state of its torch path, also with quantized Linears."""
    from sea_edge import estimator as est_mod
    from sea_edge.attention import selectable_columns
    from sea_edge.config import SEAConfig
    from sea_edge.estimator import SEAEstimator
    from sea_edge.quantize import QuantizedLinear

    torch.manual_seed(0)
    cfg = SEAConfig(k=8, compressed_width=16, n_features=20).resolve(causal=causal, head_dim=12)
    est = SEAEstimator(cfg, 12, 4, max_positions=64).to(DEV)
    with torch.no_grad():
        est.mixer.weight.normal_(0, 0.3)
        est.head_embed.normal_(0, 0.3)
    B, T = 2, 23
    q, k, v = (torch.randn(B, n, T, 12, device=DEV) for n in (4, 2, 2))
    sel = selectable_columns(T, T, 16, causal, DEV)
    for quantized in (False, True):
        if quantized:
            est.to_rows = QuantizedLinear.from_linear(est.to_rows, "int8", 64)
        with torch.no_grad():
            monkeypatch.setattr(est_mod, "_triton_inference", lambda x: False)
            ref = est(q, k, v, sel)
            monkeypatch.setattr(est_mod, "_triton_inference", lambda x: True)
            out = est(q, k, v, sel)
        assert out.features is None
        for a, b in ((out.logits, ref.logits), (out.mix, ref.mix), (out.gain, ref.gain)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if causal:
            for a, b in zip(out.state, ref.state):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # probs from the decoder's launch, and the bidirectional column means
            fused = est(q, k, v, sel, probs=True)
        assert fused.logits is None
        torch.testing.assert_close(fused.probs, torch.softmax(ref.logits, -1), rtol=1e-4, atol=1e-5)
        if causal:
            assert fused.col_mean is None
        else:
            torch.testing.assert_close(fused.col_mean, torch.softmax(ref.logits, -1).mean(2), rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_encoder_gpu_real_shapes(monkeypatch, causal, tf32):
    """The default geometry at 12 heads and 16387 rows: F = 2D + E = 256 (bidirectional) or 384 (causal), Wd = 128,
    N = C K / r = 128 or 256."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    F, N = (384, 256) if causal else (256, 128)
    check(make(1, 12, 16387, F, 128, N, seed=int(causal)))
