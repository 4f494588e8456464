"""SEA attention layer: exactness at full budget, causality, mask invariants (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from sea_edge.attention import average_context, sea_attention, selectable_columns
from sea_edge.config import SEAConfig, budget
from sea_edge.estimator import SEAEstimator
from sea_edge.testing import assert_rel_err


def dense_attention_ref(q, k, v, scale, causal, key_valid=None):
    """Textbook softmax attention in float64 with GQA; the queries are the last T of S positions."""
    B, H, T, D = q.shape
    S = k.shape[2]
    heads = torch.arange(H) // (H // k.shape[1])
    s = torch.einsum("bhtd,bhsd->bhts", q.double(), k[:, heads].double()) * scale
    if causal:
        pos = torch.arange(S - T, S).view(T, 1)
        s = s.masked_fill(torch.arange(S).view(1, S) > pos, float("-inf"))
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(s, -1), v[:, heads].double())


def make_layer(causal, D, H, K=None, k=64, mix=True, seed=0):
    cfg = SEAConfig(k=k, compressed_width=K, mix=mix).resolve(causal=causal, head_dim=D)
    torch.manual_seed(seed)
    return SEAEstimator(cfg, D, H, max_positions=512)


def qkv(B, H, Hkv, T, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


CASES = [(T, causal) for T in (1, 63, 111, 256) for causal in (True, False)]


@pytest.mark.parametrize("T,causal", CASES, ids=[f"T{T}-{'causal' if c else 'bidir'}" for T, c in CASES])
def test_full_budget_equals_dense(T, causal):
    """SEA.md: with k >= S (every key kept) and the mix forced to the sparse path, SEA is dense attention."""
    B, H, Hkv, D = 2, 9, 3, 64
    est = make_layer(causal, D, H, k=10**6, mix=False)
    q, k, v = qkv(B, H, Hkv, T, T, D, seed=T)
    with torch.no_grad():
        out, _ = sea_attention(est, q, k, v, D**-0.5)
    assert_rel_err(out, dense_attention_ref(q, k, v, D**-0.5, causal), 1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_full_budget_with_padding_and_decode_queries(causal):
    """Padding keys are excluded exactly like a dense masked softmax; queries that are the last T of S (a decode
    step) see the right prefix."""
    B, H, Hkv, T, S, D = 2, 4, 2, 5, 70, 60
    est = make_layer(causal, D, H, K=32, k=10**6, mix=False)
    q, k, v = qkv(B, H, Hkv, T, S, D, seed=7)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[1, :9] = False  # left padding of the second sequence
    with torch.no_grad():
        out, _ = sea_attention(est, q, k, v, D**-0.5, key_valid)
    assert_rel_err(out, dense_attention_ref(q, k, v, D**-0.5, causal, key_valid), 1e-5)


def test_causality_exact():
    """Changing queries/keys/values after position t changes no output at positions <= t (default budget, mix on)."""
    B, H, Hkv, T, D, t = 1, 6, 2, 300, 64, 137
    est = make_layer(True, D, H, K=64, k=16)
    q, k, v = qkv(B, H, Hkv, T, T, D, seed=1)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(2)
    q2[:, :, t + 1 :] = torch.randn(q2[:, :, t + 1 :].shape, generator=g)
    k2[:, :, t + 1 :] = torch.randn(k2[:, :, t + 1 :].shape, generator=g)
    v2[:, :, t + 1 :] = torch.randn(v2[:, :, t + 1 :].shape, generator=g)
    with torch.no_grad():
        a, sa = sea_attention(est, q, k, v, D**-0.5, record=True)
        b, sb = sea_attention(est, q2, k2, v2, D**-0.5, record=True)
    assert torch.equal(a[:, :, : t + 1], b[:, :, : t + 1])
    assert torch.equal(sa.idx[:, :, : t + 1], sb.idx[:, :, : t + 1])
    assert not torch.equal(a[:, :, t + 1 :], b[:, :, t + 1 :])  # the test can fail: later outputs did change


MASK_CASES = [(True, 2048, 256, 64), (True, 300, 64, 8), (False, 1000, 128, 64), (False, 77, 128, 4)]


@pytest.mark.parametrize("causal,S,K,k", MASK_CASES, ids=[f"{'causal' if c else 'bidir'}-S{S}-K{K}-k{k}"
                                                         for c, S, K, k in MASK_CASES])
def test_mask_invariants(causal, S, K, k):
    """The mask never selects padding or future keys, lists no key twice, is ascending, and holds at most the
    budget per token (n_cols columns over all heads, hence at most H*k keys)."""
    B, H, Hkv, D = 2, 6, 3, 32
    T = S if S <= 300 else 256  # long case: the last 256 queries of 2048 keys
    est = make_layer(causal, D, H, K=K, k=k, seed=3)
    q, kk, v = qkv(B, H, Hkv, T, S, D, seed=S)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[0, : S // 5] = False
    key_valid[1, S // 2 : S // 2 + 17] = False
    with torch.no_grad():
        _, st = sea_attention(est, q, kk, v, D**-0.5, key_valid, record=True)
    idx = st.idx.long()  # (B, H, T, w)
    valid = idx >= 0
    pos = torch.arange(S - T, S).view(1, 1, T, 1)
    if causal:
        assert not (valid & (idx > pos)).any(), "a future key was selected"
    picked_pad = valid & ~key_valid[torch.arange(B).view(B, 1, 1, 1), idx.clamp(min=0)]
    assert not picked_pad.any(), "a padding key was selected"
    # holes only at the end, ascending, no duplicates
    assert torch.equal(valid, valid.sort(dim=-1, descending=True, stable=True).values)
    d = idx[..., 1:] - idx[..., :-1]
    assert ((d > 0) | ~valid[..., 1:]).all()
    n_cols, head_cap, span = budget(est.cfg, H, S)
    keys_per_token = valid.sum(dim=(1, 3))  # (B, T), summed over heads
    if span <= H * k:
        assert (keys_per_token <= H * k).all()
    assert (keys_per_token <= max(H * k, span)).all()
    assert (valid.sum(-1) <= head_cap * span).all()
    # the budget is actually used where there are keys to spend it on (second half of sequence 1)
    assert keys_per_token[1, T // 2 :].float().mean() > 0.5 * min(n_cols * span, H * (S // 2 - 17))


def test_causal_rows_spend_the_same_key_budget():
    """Short causal rows (narrow columns) keep more columns, so early and late rows use about H*k keys alike."""
    B, H, Hkv, T, D, k = 1, 6, 2, 1024, 32, 16
    est = make_layer(True, D, H, K=64, k=k)
    q, kk, v = qkv(B, H, Hkv, T, T, D, seed=5)
    with torch.no_grad():
        _, st = sea_attention(est, q, kk, v, D**-0.5, record=True)
    keys = (st.idx >= 0).sum(dim=(1, 3))[0].float()  # (T,)
    assert (keys <= H * k).all()
    assert keys[400:600].mean() > 0.75 * H * k and keys[-100:].mean() > 0.75 * H * k


def test_budget_shared_across_heads():
    """Heads whose estimate is sharper get more columns: the budget is flattened over H x K (SEA.md step 4)."""
    from sea_edge.kernels import select_columns_ref

    B, H, T, K = 1, 4, 3, 16
    probs = torch.full((B, H, T, K), 1.0 / K)
    probs[:, 0] = 0.002
    probs[:, 0, :, 3:10] = 0.14  # head 0 is confident: seven entries above every entry of the other heads
    cols = select_columns_ref(probs, n_cols=8, head_cap=6, S=64, causal=False)
    per_head = (cols >= 0).sum(-1)  # (B, H, T)
    assert (per_head.sum(1) == 8).all()
    assert (per_head[:, 0] == 6).all()  # head 0 takes its cap, the rest share what is left


def test_average_context_bidirectional_uniform():
    """With a uniform estimate, the bidirectional average context is the plain mean of the valid values."""
    B, H, S, D, K = 1, 2, 50, 8, 16
    v = torch.randn(B, H, S, D)
    probs = torch.full((B, H, 3, K), 1.0 / K)
    valid = torch.ones(B, S, dtype=torch.bool)
    ctx = average_context(v, probs, valid, causal=False, n_heads=H)
    # columns hold 3 or 4 keys: uniform per column, not per key; compare with that exact weighting
    j = torch.div((torch.arange(S) + 1) * K + S - 1, S, rounding_mode="floor") - 1
    w = 1.0 / torch.bincount(j, minlength=K)[j].double()
    exp = (w[:, None] * v[0].double()).sum(1) / w.sum()
    assert torch.allclose(ctx[0, :, 0].double(), exp, atol=1e-6)


@pytest.mark.parametrize("Hkv", [3, 1])
def test_equal_columns_context_equals_general_path(Hkv):
    """The GPU's bidirectional average when K divides S and nothing is padding (one reduction of v per column) is
    the general path's weighted mean, GQA heads reading their key/value head."""
    from sea_edge.attention import _equal_columns_context

    B, H, T, S, D, K = 2, 6, 7, 48, 8, 12
    g = torch.Generator().manual_seed(Hkv)
    v = torch.randn(B, Hkv, S, D, generator=g).half()
    probs = torch.rand(B, H, T, K, generator=g).softmax(-1)
    want = average_context(v, probs, None, causal=False, n_heads=H)[:, :, :1]
    heads = torch.arange(H) // (H // Hkv)
    got = _equal_columns_context(v, torch.nansum(probs, 2) / T, heads)
    assert got.shape == (B, H, 1, D) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 5, 23])
def test_average_context_causal_is_running_mean(T):
    """Causal average context: query t (position S - T + t) gets the mean of the valid values at positions <= its
    own, GQA heads reading their key/value head; the keys before the first query included (a decode step, T = 1)."""
    B, H, Hkv, S, D, K = 2, 6, 2, 23, 8, 16
    g = torch.Generator().manual_seed(T)
    v = torch.randn(B, Hkv, S, D, generator=g)
    valid = torch.rand(B, S, generator=g) > 0.3
    valid[:, 0] = True
    probs = torch.full((B, H, T, K), 1.0 / K)
    ctx = average_context(v, probs, valid, causal=True, n_heads=H)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = valid[b, : S - T + t + 1].nonzero()[:, 0]
                exp = v[b, h // (H // Hkv), keys].double().mean(0)
                assert torch.allclose(ctx[b, h, t].double(), exp, atol=1e-6), (b, h, t)

def test_selectable_columns_partition_keys():
    """Each causal row's non-empty columns partition exactly its keys [0, pos]."""
    from sea_edge.kernels import column_spans

    T, S, K = 40, 40, 16
    sel = selectable_columns(T, S, K, True, "cpu")
    start, end = column_spans(torch.arange(K).expand(T, K), K, S, True)
    assert torch.equal((end - start).sum(-1), torch.arange(1, T + 1))
    assert torch.equal(sel.sum(-1), torch.clamp(torch.arange(1, T + 1), max=K))


def test_config_validation():
    with pytest.raises(ValueError, match="k"):
        SEAConfig(k=0)
    with pytest.raises(ValueError, match="decoder_ratio"):
        SEAConfig(compressed_width=250, decoder_ratio=4)
    cfg = SEAConfig().resolve(causal=True, head_dim=64)
    assert cfg.compressed_width == 256 and cfg.n_features == round(64 * math.log(64))
    assert SEAConfig().resolve(causal=False, head_dim=32).compressed_width == 128
    assert SEAConfig.from_dict(cfg.to_dict()) == cfg


def test_public_op_is_not_shadowed_by_a_submodule():
    """Importing the Triton module must not replace `sea_edge.kernels.sparse_attention` (the op) on the package."""
    import importlib

    pytest.importorskip("triton")
    import sea_edge.kernels as kernels

    importlib.import_module("sea_edge.kernels.triton_sparse_attention")
    importlib.import_module("sea_edge.kernels.mask")
    from sea_edge.kernels import sparse_attention

    assert callable(sparse_attention) and callable(kernels.sparse_index)


def test_layer_bench_quick_smoke(tmp_path):
    """The whole-layer benchmark program runs end to end (CPU smoke shapes) and writes its JSON and PNG."""
    import json

    from sea_edge.bench_layer import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_layer.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["sea_ms"] > 0 and r["flash_ms"] > 0 for r in rows)
    assert (tmp_path / "bench_layer.png").read_bytes()[:4] == b"\x89PNG"


def test_performer_bench_quick_smoke(tmp_path):
    """The Performer-step benchmark (Triton route vs torch route) runs at CPU smoke shapes, interpreted, and its two
    routes agree."""
    import json
    import os

    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    from sea_edge.bench_layer import main

    assert main(["--quick", "--performer", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "performer.json").read_text())["rows"]
    assert [(r["causal"], r["T"]) for r in rows] == [(False, 64), (True, 64)]
    assert all(r["torch_ms"] > 0 and r["triton_ms"] > 0 and r["max_abs_diff"] < 1e-3 for r in rows)


def test_budget_length_fixes_the_layout_not_the_result():
    """budget_length lays the mask out for a longer context (wider key lists, more -1 slots); for S within it the
    kept keys and the output are those of the budget computed from the same length."""
    B, H, Hkv, T, D = 1, 4, 2, 300, 32
    q, k, v = qkv(B, H, Hkv, T, T, D, seed=11)
    fixed = make_layer(True, D, H, K=64, k=16)
    fixed.cfg = SEAConfig(**{**fixed.cfg.to_dict(), "budget_length": 512})
    with torch.no_grad():
        out, st = sea_attention(fixed, q, k, v, D**-0.5, record=True)
    n_cols, head_cap, span = budget(fixed.cfg, H, T)
    assert span == 8 and st.idx.shape[-1] == head_cap * 8  # laid out for 512 keys (ceil(512/64) = 8)
    with pytest.raises(ValueError, match="exceed budget_length"):
        budget(fixed.cfg, H, 513)
    # the same budget over the real 300 keys, with the narrower layout ceil(300/64) = 5: same keys, same output
    from sea_edge.kernels import sparse_index_ref

    probs = torch.softmax(st.estimate.logits, -1)
    narrow = sparse_index_ref(probs, n_cols, head_cap, T, True, n_keys=H * 16, span=5)
    wide = st.idx[..., : narrow.shape[-1]]
    assert torch.equal(narrow, wide) and (st.idx[..., narrow.shape[-1]:] == -1).all()
    with pytest.raises(ValueError, match="narrower"):
        sparse_index_ref(probs, n_cols, head_cap, T, True, span=4)


@pytest.mark.parametrize("chunk, eye", [(128, None), (7, None), (7, 80)], ids=["chunk128", "chunk7", "chunk7-eye80"])
def test_decode_steps_carry_the_state_of_a_prefill(chunk, eye):
    """sea_attention_step: a prefill of 66 positions then one step per position (the Performer prefix sums and the
    decoder CNN's last rows carried as state) gives the rows of one prefill of all 90, with padding on one row.
    K = 32: every S in 65..96 has the same budget (columns of up to 3 keys), which decode and prefill then share.
    eye 80: a Performer eye basis wider than K (SEAConfig.eye_width) carries the same way."""
    from sea_edge.attention import sea_attention_step

    torch.manual_seed(0)
    B, H, Hkv, D, S, P = 2, 6, 2, 32, 90, 66
    cfg = SEAConfig(k=8, compressed_width=32, performer_chunk=chunk, eye_width=eye).resolve(True, D)
    est = SEAEstimator(cfg, D, H, 512).eval()
    assert est.in_norm.normalized_shape == (2 * D + (eye or 32),)
    with torch.no_grad():  # a non-trivial decoder (fresh weights start near zero)
        for p in est.parameters():
            p.add_(0.05 * torch.randn_like(p))
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :9] = False
    with torch.no_grad():
        full, end_state = sea_attention_step(est, q, k, v, D**-0.5, valid)
        ref, _ = sea_attention(est, q, k, v, D**-0.5, valid)
        assert torch.equal(full, ref)  # same rows as the stateless layer
        out, state = sea_attention_step(est, q[:, :, :P], k[:, :, :P], v[:, :, :P], D**-0.5, valid[:, :P])
        rows = [out]
        for t in range(P, S):
            o, state = sea_attention_step(est, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], D**-0.5,
                                          valid[:, :t + 1], state)
            rows.append(o)
    assert_rel_err(torch.cat(rows, dim=2), full, 1e-5, "prefill + decode steps")
    for a, b in zip(state, end_state):
        assert_rel_err(a, b, 1e-5, "state after the last step")
    assert state[0].shape[-1] == D + (eye or 32) + 1  # the Performer state: [v, eye, 1] per feature


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_content_term_adds_weighted_column_scores(causal):
    """SEAConfig.key_scores: the estimate's logits are the decoder's plus key_weight[h] * column_scores (the mean
    key of each column against the query), padding included; off, the estimator has no such weight."""
    from sea_edge.attention import mask_geometry
    from sea_edge.kernels import column_scores

    B, H, Hkv, T, D, K = 2, 4, 2, 37, 16, 8
    q, k, v = qkv(B, H, Hkv, T, T, D, seed=3)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :5] = False
    off = SEAEstimator(SEAConfig(k=4, compressed_width=K, key_scores=False).resolve(causal, D), D, H, 512)
    on = SEAEstimator(SEAConfig(k=4, compressed_width=K).resolve(causal, D), D, H, 512)
    assert not hasattr(off, "key_weight") and on.key_weight.shape == (H,)
    on.load_state_dict({**off.state_dict(), "key_weight": torch.linspace(0.5, 2.0, H)})
    sel = mask_geometry(on, H, T, T, q.device, valid)[0]
    with torch.no_grad():
        a, b = off(q, k, v, sel, valid).logits, on(q, k, v, sel, valid).logits
    term = torch.linspace(0.5, 2.0, H).view(1, H, 1, 1) * column_scores(q, k, K, causal, D**-0.5, valid)
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b)) and fin.any()
    assert_rel_err(b[fin], (a + term)[fin], 1e-6, "logits with the content term")
