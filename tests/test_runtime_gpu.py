"""The runtime's CUDA path (`-m gpu`, on the GPU machine): SeaSession(device="cuda") splits each graph at its
SparseAttention nodes, runs the segments on onnxruntime's CUDA provider and the nodes in Triton, with the data on
the GPU. Against the CPU path (one onnxruntime session, the op's function body): prefill logits on validation text,
greedy generation (KV cache and SEA state on the GPU through the decode graph), batches, perplexity; that every
handoff between onnxruntime and Triton is zero-copy and nothing large crosses the host (torch.profiler sees every
CUDA copy of the process, onnxruntime's included); and a prefill beyond the model's 8192 positions.

runtime/gpu_check.sh runs this file with SEA_EDGE_EXPORTED_DEFAULT set to the folder it exported."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu)",
                allow_module_level=True)

PROMPTS = ["The king said", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def cpu(exported_default):
    from sea_edge.runtime import SeaSession

    return SeaSession(exported_default.out, verify=False)


@pytest.fixture(scope="module")
def gpu(exported_default):
    from sea_edge.runtime import SeaSession

    return SeaSession(exported_default.out, device="cuda", verify=False)


@pytest.fixture(scope="module")
def windows(cpu):
    from sea_edge.runtime.perplexity import token_windows

    from sea_edge.data import load_corpus

    return token_windows(cpu.tokenizer, load_corpus("validation"), 256, 2)  # (2, 256)


def test_smoke_graph_through_the_cuda_path(tmp_path):
    """A tiny graph with the real shapes through everything (bytes + external data, CUDA provider, shared arena and
    stream, IO binding, DLPack, Triton) equals NumPy."""
    from sea_edge.runtime.bench_gpu import smoke_test

    r = smoke_test(tmp_path)
    assert r["ok"], r
    assert r["providers"][0] == "CUDAExecutionProvider" and r["stats"].get("handoffs_copied", 0) == 0, r


def test_cuda_session_is_split_and_on_the_gpu(gpu):
    g = gpu._prefill
    ops = [s.op for s in g.plan.steps if s.kind == "op"]
    assert g.n_segments == 61 and ops.count("SparseAttention") == ops.count("ColumnScores") == 30 and len(ops) == 60
    assert gpu.backend.name == "torch" and gpu.backend.attention == "triton" and gpu.backend.ort_cuda
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in gpu.sessions)
    assert gpu.cuda_arena == "env", gpu.cuda_arena  # one CUDA arena for all 61 sessions
    from sea_edge.runtime.executor import node_placement

    placed: dict = {}
    for sess in gpu.sessions:
        for k, v in (node_placement(sess) or {}).items():
            placed[k] = placed.get(k, 0) + v
    print("onnxruntime node placement over the prefill segments:", placed)
    opts = gpu.sessions[0].get_provider_options()["CUDAExecutionProvider"]
    print("CUDA provider options:", {k: opts.get(k) for k in ("user_compute_stream", "has_user_compute_stream",
                                                               "use_tf32", "arena_extend_strategy")})


def test_cuda_prefill_matches_cpu(cpu, gpu, windows):
    ref = cpu.prefill_logits(windows)
    got = gpu.prefill_logits(windows)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    per_pos = np.abs(got - ref).max(-1).ravel()
    print(f"GPU vs CPU prefill: top-1 {agree:.4%} of {per_pos.size}, |logit diff| per position: median "
          f"{np.median(per_pos):.3g}, max {per_pos.max():.3g}")
    # The kept keys are a discrete choice over fp32 scores that cuBLAS and MLAS sum in other orders, so a score near
    # a tie may keep another key and move that position's logits by up to ~2 (measured on an H200 with cb552da:
    # 0 of 1024 positions above 0.05 at T = 256, 120 of 1024 at T = 512, max 1.9, top-1 99.9%). Where the same keys
    # are kept, the logits agree to fp32 rounding: the median position stays near 1e-4 (measured 4.2e-5 at 256,
    # 2.1e-4 at 512). The CUDA TopK bug of a1dff17 (wrong keys wherever a row's ranking held -inf) gave top-1 82%
    # at T = 256.
    assert agree >= 0.99 and np.median(per_pos) < 2e-3


def test_cuda_torch_reference_in_place_of_triton(exported_default, gpu, windows):
    """The same split graph with the plain-torch reference for SparseAttention: separates the kernel from the
    plumbing when the previous test fails."""
    from sea_edge.runtime import SeaSession

    ref = SeaSession(exported_default.out, device="cuda", attention="torch", verify=False)
    a, b = ref.prefill_logits(windows[:1]), gpu.prefill_logits(windows[:1])
    print(f"triton vs torch reference on the GPU: max |diff| {float(np.abs(a - b).max()):.3g}")
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.99


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_cuda_generation_matches_cpu(cpu, gpu):
    """Greedy tokens through prefill + 31 decode steps, the KV cache and SEA state kept as CUDA tensors. fp32 on both
    sides (TF32 off), so the tokens are expected identical; a near-tie late in a sequence may flip one (cuBLAS and
    MLAS sum in other orders), so the check is that no sequence departs before its 24th token."""
    for p in PROMPTS:
        a = gpu.generate(p, max_new_tokens=32, stop_at_eos=False).tokens
        b = cpu.generate(p, max_new_tokens=32, stop_at_eos=False).tokens
        print(f"{p!r}: GPU and CPU agree on the first {_prefix(a, b)} of 32 greedy tokens")
        assert _prefix(a, b) >= 24, (a, b)
    both = gpu.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False)
    ref = cpu.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False)
    assert all(_prefix(a, b) >= 12 for a, b in zip(both.tokens, ref.tokens)), (both.tokens, ref.tokens)
    pieces = []
    res = gpu.generate(PROMPTS[1], max_new_tokens=8, stop_at_eos=False, stream=pieces.append)
    assert "".join(pieces) == res.text and res.decode_tokens_per_s > 0
    print(f"GPU decode: {res.decode_tokens_per_s:.1f} tok/s (B = 1, 7 steps, short context)")


def test_cuda_state_stays_on_the_gpu(gpu):
    s = gpu
    ids = np.array([s.encode(PROMPTS[1])], np.int64)
    T = ids.shape[1]
    mask, pos = np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None]
    logits, state = s._run(s._prefill, ids, mask, pos, None, keep_last=True, host_logits=False)
    assert logits.is_cuda and len(state) == 150 and all(v.is_cuda for v in state.values())
    s.backend.stats.clear()
    logits, state = s._run(s._decode, np.array([[int(logits[0, -1].argmax())]]), np.ones((1, T + 1), np.int64),
                           np.array([[T]], np.int64), state, host_logits=False)
    st = s.backend.stats
    assert all(v.is_cuda for v in state.values()) and state["past_key_values.0.key"].shape[2] == T + 1
    assert st["uploads"] <= 3 and st["downloads"] == 0, dict(st)  # the step's ids, mask, positions; no state


def test_cuda_perplexity_matches_cpu(cpu, gpu):
    from sea_edge.data import load_corpus

    text = load_corpus("validation")
    a, b = cpu.perplexity(text, 256, max_windows=2), gpu.perplexity(text, 256, max_windows=2)
    print(f"perplexity CPU {a.ppl:.4f}, GPU {b.ppl:.4f}")
    assert abs(b.ppl / a.ppl - 1) < 0.005


def _copies(trace: dict) -> dict:
    from sea_edge.runtime.bench_gpu import memcpy_summary

    return memcpy_summary(trace)


def test_cuda_no_host_copies_between_segments_and_triton(gpu, tmp_path):
    """One prefill (T = 512) and one decode step under torch.profiler. Our handoffs: every onnxruntime output wrapped
    in place (handoffs_copied 0), nothing moved between host and device. The whole process: no host <-> device copy
    as large as one layer's q (what a handoff through the host would copy), so none of q, k, v, idx or the
    attention output went through the host; what is left is the step's inputs, the last logits row, and
    onnxruntime's own shape arithmetic on the CPU."""
    import json

    from torch.profiler import ProfilerActivity, profile

    s, T = gpu, 512
    ids = np.random.default_rng(0).integers(0, 49152, (1, T), dtype=np.int64)
    mask, pos = np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None]
    s._run(s._prefill, ids, mask, pos, None, keep_last=True)  # warm-up
    q_bytes = 9 * T * 64 * 4
    _, state = s._run(s._prefill, ids, mask, pos, None, keep_last=True, host_logits=False)
    s._run(s._decode, np.array([[5]], np.int64), np.ones((1, T + 1), np.int64), np.array([[T]], np.int64), state)
    for what in ("prefill", "decode"):
        s.synchronize()
        s.backend.stats.clear()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            if what == "prefill":
                s._run(s._prefill, ids, mask, pos, None, keep_last=True, host_logits=False)
            else:
                s._run(s._decode, np.array([[5]], np.int64), np.ones((1, T + 1), np.int64),
                       np.array([[T]], np.int64), state, host_logits=False)
            s.synchronize()
        path = tmp_path / f"{what}.json"
        prof.export_chrome_trace(str(path))
        summary = _copies(json.loads(path.read_text()))
        st = dict(s.backend.stats)
        print(what, "copies:", summary["copies"], "streams:", summary["kernel_streams"], "backend:", st)
        assert st["sparse_attention_calls"] == st["column_scores_calls"] == 30, st
        assert st["handoffs"] > 0 and st.get("handoffs_copied", 0) == 0, st
        assert st.get("moved_to_host", 0) == 0 and st.get("moved_to_device", 0) == 0, st
        for kind, c in summary["copies"].items():
            if "HtoD" in kind or "DtoH" in kind:
                assert c["max_bytes"] < q_bytes, (what, kind, c)


def test_cuda_prefill_beyond_max_positions(gpu):
    """The graphs' length is dynamic past the export's 8192 (torch.export's Dim max is not an ONNX constraint): a
    prefill of 9000 tokens runs and its last logits are finite."""
    T = 9000
    ids = np.random.default_rng(0).integers(0, 49152, (1, T), dtype=np.int64)
    logits, state = gpu._run(gpu._prefill, ids, np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None], None,
                             keep_last=True, host_logits=False)
    assert logits.shape == (1, 1, 49152) and bool(torch.isfinite(logits).all())
    assert state["past_key_values.29.key"].shape[2] == T


def test_cuda_segment_cache_is_reused(exported_default, gpu):
    from sea_edge.runtime import SeaSession

    again = SeaSession(exported_default.out, device="cuda", verify=False)
    assert again._prefill.plan.cache == "read" and again._prefill.plan.entry == gpu._prefill.plan.entry
    assert os.path.isdir(again._prefill.plan.entry)
