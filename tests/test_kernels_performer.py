"""An estimator's query side in Triton (kernels/triton_performer.py) against reference.performer_query_ref
(bidirectional) and reference.performer_causal_ref (causal), the causal reference against the plain quadratic form,
and the estimator running the kernels.

CPU: TRITON_INTERPRET=1 at tiny odd shapes (D and the feature count not powers of two, GQA, rows past a tile).
GPU (`-m gpu`): the default geometry (D = 64, m = 266, E = 128) at real lengths.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import (
    causal_linear_attention_ref,
    performer_causal_ref,
    performer_features_ref,
    performer_kv_ref,
    performer_query_ref,
    performer_values,
    triton_performer,
)
from sea_edge.kernels.triton_performer import performer_causal_triton, performer_kv_triton, performer_query_triton

from sea_edge.testing import assert_close_to_ref, assert_rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def real_shapes(test):
    """A `-m gpu` test at the default geometry in every dtype, for 12/12 and SmolLM2's 9/3 heads."""
    test = pytest.mark.parametrize("heads", [(12, 12), (9, 3)], ids=["12-12", "9-3"])(test)
    test = pytest.mark.parametrize("dt", list(DTYPES))(test)
    return gpu(pytest.mark.gpu(test))


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


@real_shapes
def test_performer_query_gpu_real_shapes(heads, dt):
    dtype = DTYPES[dt]
    H, Hkv = heads
    args = make(1, H, Hkv, 16387, 16387, 64, 266, 128, dtype=dtype, seed=H)
    out = performer_query_triton(*args)
    exact = performer_query_ref(args[0].double(), *(a.double() for a in args[1:]))
    assert_close_to_ref(out, performer_query_ref(*args), exact, what=f"{dt} performer query")


# -- causal ---------------------------------------------------------------------------------------------------------
def make_causal(B, H, Hkv, T, D, m, E, dtype=torch.float32, seed=0, with_state=True, with_valid=True, pos0=5,
                L=48):
    g = torch.Generator().manual_seed(seed)
    rnd = (lambda *s: torch.randn(*s, generator=g).to(DEV))
    q, k, v = rnd(B, H, T, D).to(dtype), rnd(B, Hkv, T, D).to(dtype), rnd(B, Hkv, T, D).to(dtype)
    proj = rnd(m, D)
    W = D + E + 1
    state0 = (rnd(B, Hkv, m, W).abs() * 3 if with_state else torch.zeros(B, Hkv, m, W, device=DEV))
    # a state of keys before pos0 (the kernels' contract): no eye column past that of position pos0 - 1, and the
    # last column (sum phi) is the sum of the eye columns, since each key has exactly one
    state0[..., D + min(max(pos0 - 1, 0) * E // L, E - 1) + 1 : D + E] = 0.0
    state0[..., -1] = state0[..., D : D + E].sum(-1)
    ln_w, ln_b = 1 + 0.1 * rnd(2 * D + E), 0.1 * rnd(2 * D + E)
    valid = None
    if with_valid:
        valid = torch.rand(B, T, generator=g).to(DEV) > 0.2
        valid[:, 0] = True
    return q, k, v, proj, state0, ln_w, ln_b, valid


def test_causal_linear_attention_matches_quadratic_form():
    """The chunked algebra (chunk 5 over T = 23: a short last chunk) against out_t = qf_t @ (state0 + sum_{s<=t}
    kf_s^T vals_s) written out directly, fp64."""
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, T, m, W = 2, 2, 3, 23, 7, 6
    qf, kf = torch.rand(B, Hkv, G, T, m, generator=g).double(), torch.rand(B, Hkv, T, m, generator=g).double()
    vals, state0 = torch.randn(B, Hkv, T, W, generator=g).double(), torch.randn(B, Hkv, m, W, generator=g).double()
    out, state = causal_linear_attention_ref(qf, kf, vals, state0, chunk=5)
    tri = torch.ones(T, T, dtype=torch.bool).tril()
    want = ((qf @ kf.transpose(-1, -2).unsqueeze(2)) * tri) @ vals.unsqueeze(2) + qf @ state0.unsqueeze(2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, state0 + kf.transpose(-1, -2) @ vals, rtol=1e-12, atol=1e-12)


def test_performer_values_eye_columns():
    v = torch.zeros(1, 1, 6, 2)
    vals = performer_values(v, pos0=10, E=4, L=16)  # positions 10..15: columns 2, 2, 3, 3, 3, 3
    assert vals.shape == (1, 1, 6, 2 + 4 + 1)
    assert vals[0, 0, :, 2:6].argmax(-1).tolist() == [2, 2, 3, 3, 3, 3] and (vals[..., -1] == 1).all()
    assert performer_values(v, pos0=30, E=4, L=16)[0, 0, :, 2:6].argmax(-1).tolist() == [3] * 6  # clamped


@pytest.fixture(params=[(32, 16, 16), (16, 16, 2048)], ids=["chunk32-tile16-keys16", "chunk16-tile16"])
def small_tiles(request, monkeypatch):
    """Chunks of 32 keys in tiles of 16 rows (two tiles per chunk), or the tile as the chunk (the kernel's one-pass
    branch), so tiny T crosses tiles and chunks; the eye totals over programs of 16 keys (blocks of eye columns
    that some programs cannot reach are skipped) or of all keys."""
    chunk, tile, keys = request.param
    monkeypatch.setitem(triton_performer._CFG, "causal_chunk", chunk)
    monkeypatch.setitem(triton_performer._CFG, "causal_block_t", tile)
    monkeypatch.setitem(triton_performer._CFG, "kv_keys", keys)
    monkeypatch.setitem(triton_performer._CFG, "state_block_s", 16)
    monkeypatch.setitem(triton_performer._CFG, "state_block_w", 16)  # the states in column blocks


CAUSAL_CASES = [  # B, H, Hkv, T, D, m, E, state0, key_valid
    (1, 2, 2, 37, 16, 20, 8, True, True),  # two chunks, the second short
    (2, 4, 2, 19, 12, 27, 5, False, True),  # GQA, D and m not powers of two, no prior state
    (1, 3, 1, 1, 8, 33, 16, True, False),  # one row (a decode step)
    (1, 2, 1, 70, 16, 18, 4, False, False),  # three chunks, more positions than the eye spans: clamped columns
    (1, 2, 1, 37, 8, 20, 40, True, True),  # blocks of eye columns alone that some chunks never reach (skipped)
    (1, 2, 1, 25, 8, 20, 40, True, False),  # the last tile reaches exactly the first column of a block (col 24)
]


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=lambda c: "B{}-H{}/{}-T{}-D{}-m{}-E{}-state{}-valid{}".format(*c))
def test_performer_causal_matches_reference(case, small_tiles):
    B, H, Hkv, T, D, m, E, with_state, with_valid = case
    q, k, v, proj, state0, ln_w, ln_b, valid = make_causal(B, H, Hkv, T, D, m, E, with_state=with_state,
                                                          with_valid=with_valid)
    args = (q, k, v, proj, state0, ln_w, ln_b, 1e-5, E, 48, 5)  # L = 48 positions, the first query at 5
    out, state = performer_causal_triton(*args, key_valid=valid)
    ref, ref_state = performer_causal_ref(*args, key_valid=valid, chunk=7)
    assert out.shape == ref.shape == (B, H, T, 2 * D + E) and state.shape == ref_state.shape
    assert_rel_err(out, ref, 1e-5, "x")
    assert_rel_err(state, ref_state, 1e-5, "state")


@pytest.mark.parametrize("keys", [40, 1], ids=["S40", "S1"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "padding"])
@pytest.mark.parametrize("block_w", [None, 16], ids=["whole-rows", "column-blocks"])
@pytest.mark.parametrize("E", [5, 40], ids=["E5", "E40"])
def test_performer_kv_matches_reference(keys, masked, block_w, E, monkeypatch):
    """The keys' state over partial states of 16 keys each (S = 40: three programs, the last short), whole rows or
    in blocks of 16 of its D + E + 1 columns (E = 40: blocks of eye columns alone, some out of a program's reach)."""
    monkeypatch.setitem(triton_performer._CFG, "kv_keys", 16)
    monkeypatch.setitem(triton_performer._CFG, "state_block_s", 16)
    monkeypatch.setitem(triton_performer._CFG, "kv_block_w", block_w)
    monkeypatch.setitem(triton_performer._CFG, "state_block_w", 16)  # the states in column blocks
    _, k, v, proj, *_, valid = make_causal(2, 2, 2, keys, 12, 27, E, with_valid=masked)
    kv = performer_kv_triton(k, v, proj, E, keys, 3, valid)
    assert kv.shape == (2, 2, 27, 12 + E + 1)
    assert_rel_err(kv, performer_kv_ref(k, v, proj, E, keys, 3, valid), 1e-5)


@pytest.mark.parametrize("case", [(128, 4, 128, 0, 48), (128, 8, 128, 0, 2048), (96, 8, 256, 32, 40),
                                  (100, 4, 128, 0, 64)],
                         ids=lambda c: "S{}-E{}-L{}-pos{}-keys{}".format(*c))
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "padding"])
def test_performer_kv_segment_sums(case, masked, monkeypatch):
    """The eye part as segment sums (_performer_kv_seg_kernel) where the columns' spans allow it: steps of 32 or 16
    keys, chunks that start inside a column (two chunks add to one column), a position offset, a last short step;
    the whole state, and the eye columns alone (the causal eye totals)."""
    S, E, L, pos0, keys = case
    monkeypatch.setitem(triton_performer._CFG, "kv_keys", keys)
    monkeypatch.setitem(triton_performer._CFG, "seg_block_f", 16)  # several feature blocks
    _, k, v, proj, *_, valid = make_causal(2, 2, 2, S, 12, 27, E, with_valid=masked)
    assert triton_performer._seg_block_s(E, L, pos0, S, (0, 12 + E + 1), 12) is not None
    want = performer_kv_ref(k, v, proj, E, L, pos0, valid)
    assert_rel_err(performer_kv_triton(k, v, proj, E, L, pos0, valid), want, 1e-5)
    eye = triton_performer._key_sums(k, v, proj.contiguous(), valid, E, L, pos0, (12, 12 + E), None)
    assert_rel_err(eye, want[..., 12 : 12 + E], 1e-5, "eye totals")
    monkeypatch.setitem(triton_performer._CFG, "kv_seg", False)  # the one-hot kernel agrees
    assert_rel_err(performer_kv_triton(k, v, proj, E, L, pos0, valid), want, 1e-5)


def test_performer_causal_eye_totals_by_segments(small_tiles):
    """A causal prefill whose eye columns span 16 positions each and whose first query sits at 16: the eye totals go
    through the segment-sum kernel."""
    q, k, v, proj, state0, ln_w, ln_b, valid = make_causal(1, 2, 1, 37, 16, 20, 4, with_state=True, with_valid=True,
                                                          pos0=16, L=64)
    args = (q, k, v, proj, state0, ln_w, ln_b, 1e-5, 4, 64, 16)  # L = 64 positions, E = 4: spans of 16
    assert triton_performer._seg_block_s(4, 64, 16, 37, (16, 20), 16) == 16
    out, state = performer_causal_triton(*args, key_valid=valid)
    ref, ref_state = performer_causal_ref(*args, key_valid=valid, chunk=7)
    assert_rel_err(out, ref, 1e-5, "x")
    assert_rel_err(state, ref_state, 1e-5, "state")


def test_performer_causal_rejects_bad_shapes(small_tiles):
    q, k, v, proj, state0, ln_w, ln_b, valid = make_causal(1, 2, 2, 5, 8, 10, 4)
    args = (ln_w, ln_b, 1e-5, 4, 16, 0)
    with pytest.raises(ValueError, match="state0"):
        performer_causal_triton(q, k, v, proj, state0[:, :, :-1], *args)
    with pytest.raises(ValueError, match="k and v"):
        performer_causal_triton(q, k[:, :, :-1], v[:, :, :-1], proj, state0, *args)
    with pytest.raises(ValueError, match="key_valid"):
        performer_causal_triton(q, k, v, proj, state0, *args, key_valid=valid[:, :-1])
    with pytest.raises(ValueError, match="LayerNorm width"):
        performer_causal_triton(q, k, v, proj, state0, ln_w[:-1], ln_b[:-1], 1e-5, 4, 16, 0)


def test_estimator_causal_fused_matches_torch_path(monkeypatch, small_tiles):
    """The causal estimator with the Triton query side (prefill with padding keys, then a decode step from the
    carried state, then a prefill after keys of its own without a state) equals its torch path: logits and state.
    On the CPU the fused branch is entered by making the inputs look like CUDA tensors to the estimator."""
    from sea_edge.attention import selectable_columns

    monkeypatch.setitem(triton_performer._CFG, "causal_fused", True)
    est = _estimator(True)
    B, S = 2, 40
    q, k, v = (torch.randn(B, n, S, 12, device=DEV) for n in (4, 2, 2))
    valid = torch.ones(B, S, dtype=torch.bool, device=DEV)
    valid[1, :3] = False  # left padding in the second sequence

    def run(fused):
        with monkeypatch.context() as mp, torch.no_grad():
            if fused and not CUDA:
                mp.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
            pre = est(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], selectable_columns(S - 1, S - 1, 16, True, DEV),
                      valid[:, :-1])
            step = est(q[:, :, -1:], k, v, selectable_columns(1, S, 16, True, DEV), valid, state=pre.state)
            tail = est(q[:, :, -9:], k, v, selectable_columns(9, S, 16, True, DEV), valid)
        return pre, step, tail

    for ref, out in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        for a, b in zip(out.state, ref.state, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@real_shapes
def test_performer_causal_gpu_real_shapes(heads, dt):
    dtype = DTYPES[dt]
    H, Hkv = heads
    q, k, v, proj, state0, ln_w, ln_b, valid = make_causal(1, H, Hkv, 16387, 64, 266, 128, dtype=dtype, seed=H,
                                                          with_state=False, with_valid=False)
    args = (q, k, v, proj, state0, ln_w, ln_b, 1e-5, 128, 32768, 0)
    out, state = performer_causal_triton(*args)
    ref, ref_state = performer_causal_ref(*args)
    exact, exact_state = performer_causal_ref(*(a.double() for a in args[:7]), *args[7:])
    assert_close_to_ref(out, ref, exact, what=f"{dt} causal performer x")
    assert_close_to_ref(state, ref_state, exact_state, what=f"{dt} causal performer state")


@real_shapes
@pytest.mark.parametrize("S", [16387, 16384], ids=["one-hot", "segments"])
def test_performer_kv_gpu_real_shapes(heads, dt, S):
    """S = 16387: the eye by the one-hot product; S = 16384 (spans of 128 keys): by segment sums."""
    _, k, v, proj, *_ = make_causal(1, heads[0], heads[1], S, 64, 266, 128, dtype=DTYPES[dt], seed=heads[0],
                                    with_valid=False)
    assert (triton_performer._seg_block_s(128, S, 0, S, (0, 193), 64) is None) == (S == 16387)
    kv = performer_kv_triton(k, v, proj, 128, S)
    exact = performer_kv_ref(k.double(), v.double(), proj.double(), 128, S)
    assert_close_to_ref(kv, performer_kv_ref(k, v, proj, 128, S), exact, what=f"{dt} keys' state")
