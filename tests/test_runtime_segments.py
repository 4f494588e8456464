"""The runtime's split graphs on CPU: a graph cut at its SparseAttention nodes into onnxruntime segments, the nodes
computed by the NumPy twin of the reference (no torch) or by the torch reference through IO binding (the CUDA
path's plumbing, on CPU), equals the whole graph in one onnxruntime session (the op's function body); the cache of
the split; and the errors. A small hand-written graph covers the corner cases fast; the exported default covers the
real thing (prefill logits, greedy generation with the KV cache and SEA state, batches, perplexity)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sea_edge.errors import SeaEdgeError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

PROMPT = "Once upon a time, in a land far away,"
B, HQ, HKV, T, D, W = 2, 6, 2, 37, 12, 5


# -- a small graph with every corner case -----------------------------------------------------------------------------

def _toy_model(folder: Path, typed: bool = True) -> Path:
    """q -> MatMul -> SA1 and q -> SA2 (two split nodes of one stage), Add, a Reshape to a shape computed in the
    first segment, Mul by an overridable initializer, SA3, MatMul; `early` is a graph output of the first segment.
    Weights as external data. typed=False drops the value_info of q3 (a boundary value onnx cannot infer)."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper
    from sea_edge.export.onnx_ops import attach_functions, register_schema

    register_schema()
    w1 = np.random.default_rng(0).normal(size=(D, D)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["q"], ["qshape"]),
        helper.make_node("MatMul", ["q", "W1"], ["q1"]),
        helper.make_node("SparseAttention", ["q1", "k", "v", "idx"], ["a1"], domain="sea_edge", scale=0.3,
                         name="sa1"),
        helper.make_node("SparseAttention", ["q", "k", "v", "idx"], ["a2"], domain="sea_edge", scale=0.5, name="sa2"),
        helper.make_node("Add", ["a1", "a2"], ["h"]),
        helper.make_node("Reshape", ["h", "qshape"], ["h2"]),
        helper.make_node("Mul", ["h2", "gain"], ["q3"]),
        helper.make_node("SparseAttention", ["q3", "k", "v", "idx"], ["a3"], domain="sea_edge", scale=0.2,
                         name="sa3"),
        helper.make_node("MatMul", ["a3", "W1"], ["out0"]),
        helper.make_node("Greater", ["a1", "gain"], ["big"]),  # a bool made after sa1, read after sa3
        helper.make_node("Neg", ["out0"], ["neg0"]),
        helper.make_node("Where", ["big", "out0", "neg0"], ["out"]),
        helper.make_node("Identity", ["q1"], ["early"]),
        helper.make_node("Neg", ["q1"], ["dead"]),  # read by nothing: dropped
        # torch.chunk as the exporter writes it (rewritten into a Split: the CUDA provider has no SplitToSequence)
        helper.make_node("Constant", [], ["half"], value=helper.make_tensor("h", TP.INT64, [], [D // 2])),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TP.INT64, [], [0])),
        helper.make_node("Constant", [], ["last"], value=helper.make_tensor("l", TP.INT64, [], [-1])),
        helper.make_node("SplitToSequence", ["q1", "half"], ["seq"], axis=-1),
        helper.make_node("SequenceAt", ["seq", "zero"], ["lo"]),
        helper.make_node("SequenceAt", ["seq", "last"], ["hi"]),
        helper.make_node("SequenceAt", ["seq", "zero"], ["lo2"]),
        helper.make_node("Sub", ["lo", "lo2"], ["nil"]),
        helper.make_node("Add", ["hi", "nil"], ["hi2"]),
        helper.make_node("Concat", ["hi2", "lo"], ["swapped"], axis=-1),
    ]
    qkv = ["B", HQ, "T", D]
    g = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("q", TP.FLOAT, qkv),
         helper.make_tensor_value_info("k", TP.FLOAT, ["B", HKV, "S", D]),
         helper.make_tensor_value_info("v", TP.FLOAT, ["B", HKV, "S", D]),
         helper.make_tensor_value_info("idx", TP.INT32, ["B", HQ, "T", W]),
         helper.make_tensor_value_info("gain", TP.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TP.FLOAT, qkv), helper.make_tensor_value_info("early", TP.FLOAT, qkv),
         helper.make_tensor_value_info("swapped", TP.FLOAT, qkv)],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(np.array([1.5], np.float32), "gain")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    attach_functions(m, 18)
    m = onnx.shape_inference.infer_shapes(m)
    m.graph.value_info.append(helper.make_tensor_value_info("big", TP.BOOL, qkv))
    if typed:
        m.graph.value_info.append(helper.make_tensor_value_info("q3", TP.FLOAT, qkv))
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("model.onnx", "model.onnx.data"):  # onnx appends to an existing weights file
        (folder / f).unlink(missing_ok=True)
    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return folder


def _toy_feeds(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.integers(0, T, (B, HQ, T, W)), -1).astype(np.int32)
    for row in idx.reshape(-1, W):  # strictly ascending (no key twice), -1 holes at the end
        u = np.unique(row)
        row[:] = -1
        row[:len(u) - 1] = u[:-1]
    idx[0, 0, 3] = -1  # a row with no key at all
    return {"q": rng.normal(size=(B, HQ, T, D)).astype(np.float32),
            "k": rng.normal(size=(B, HKV, T, D)).astype(np.float32),
            "v": rng.normal(size=(B, HKV, T, D)).astype(np.float32), "idx": idx}


def _open(folder: Path):
    from sea_edge.runtime.executor import EXTERNAL_DATA_FOLDER

    def open_step(plan, step):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(folder.resolve()))
        return ort.InferenceSession(plan.segment_bytes(step), so, providers=["CPUExecutionProvider"])

    return open_step


def _backends():
    from sea_edge.runtime.executor import NumpyBackend

    out = [NumpyBackend()]
    try:
        from sea_edge.runtime.executor import TorchBackend

        out.append(TorchBackend("cpu", "torch"))
    except ImportError:
        pass
    return out


def test_cuda_backend_limits_the_cublas_workspace(monkeypatch):
    pytest.importorskip("torch")
    from sea_edge.runtime.executor import CUBLAS_WORKSPACE, TorchBackend, limit_cublas_workspace

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    TorchBackend("cpu", "torch")
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # the CPU backend leaves cuBLAS alone
    try:
        TorchBackend("cuda", "torch")
    except SeaEdgeError:  # no GPU here: set all the same, before torch could start cuBLAS
        pass
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":0:0"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the caller's choice stands
    assert limit_cublas_workspace() == ":4096:8" and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_sparse_attention_np_matches_the_reference():
    torch = pytest.importorskip("torch")
    from sea_edge.kernels.reference import sparse_attention_ref
    from sea_edge.runtime.sparse_attention import sparse_attention_np

    f = _toy_feeds(3)
    got = sparse_attention_np(f["q"], f["k"], f["v"], f["idx"], 0.37, chunk=16)
    ref = sparse_attention_ref(*(torch.from_numpy(f[x]) for x in ("q", "k", "v", "idx")), 0.37).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
    assert (got[0, 0, 3] == 0).all()  # the empty row
    with pytest.raises(ValueError, match="shape mismatch"):
        sparse_attention_np(f["q"][:, :5], f["k"], f["v"], f["idx"], 0.37)



@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("T,S,K", [(37, 37, 8), (1, 53, 8), (5, 29, 16), (9, 9, 32)], ids=str)
def test_column_scores_np_matches_the_reference(causal, T, S, K):
    """The NumPy ColumnScores against kernels.reference.column_scores_ref: odd sizes, a decode row (T = 1) and rows
    behind a longer cache, K > S (empty columns), GQA, left padding, rows split over chunks."""
    torch = pytest.importorskip("torch")
    from sea_edge.kernels.reference import column_scores_ref
    from sea_edge.runtime.column_scores import column_scores_np

    rng = np.random.default_rng(T * 100 + S)
    q = rng.standard_normal((2, 6, T, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, S, 16)).astype(np.float32)
    valid = np.ones((2, S), bool)
    valid[1, :4] = False
    got = column_scores_np(q, k, valid, K, causal, 0.25, chunk=4)
    ref = column_scores_ref(torch.from_numpy(q), torch.from_numpy(k), K, causal, 0.25, torch.from_numpy(valid))
    assert got.shape == (2, 6, T, K) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-5, rtol=1e-5)
    assert np.abs(got).max() > 0.05
    with pytest.raises(ValueError, match="shape mismatch"):
        column_scores_np(q, k, valid[:, :-1], K, causal, 0.25)

def test_toy_graph_split_equals_the_whole_graph(tmp_path):
    from sea_edge.runtime.executor import SegmentedGraph
    from sea_edge.runtime.segments import load_plan

    folder = _toy_model(tmp_path / "toy")
    plan = load_plan(folder, "model.onnx", tmp_path / "cache")
    assert plan.cache == "built"
    kinds = [(s.kind, s.name) for s in plan.steps]
    assert kinds == [("ort", "seg-000.onnx"), ("op", "sa1"), ("op", "sa2"), ("ort", "seg-001.onnx"), ("op", "sa3"),
                     ("ort", "seg-002.onnx")]
    # the Shape runs where it is read (a free node as late as its reader allows), the dead Neg nowhere
    assert plan.steps[0].outputs == ["q1", "early", "swapped"]
    assert plan.rewrites == {"SplitToSequence+SequenceAt -> Split": 1}
    assert plan.steps[3].inputs == ["q", "a1", "a2", "gain"] and plan.overridable == ["gain"]
    assert "big" in plan.steps[3].outputs and "big" in plan.steps[5].inputs  # a bool crosses a boundary
    assert [s.attributes["scale"] for s in plan.steps if s.kind == "op"] == pytest.approx([0.3, 0.5, 0.2])
    whole = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = _toy_feeds()
    ref = whole.run(["out", "early", "swapped"], feeds)
    ref_gain = whole.run(["out"], {**feeds, "gain": np.array([2.0], np.float32)})[0]
    opener = _open(folder)
    for be in _backends():
        g = SegmentedGraph(plan, be, lambda step: opener(plan, step))
        out, early, swapped = (be.to_numpy(x) for x in g.run(["out", "early", "swapped"], feeds))
        np.testing.assert_allclose(out, ref[0], atol=2e-5, rtol=1e-5, err_msg=be.name)
        np.testing.assert_array_equal(early, ref[1])
        np.testing.assert_array_equal(swapped, ref[2])
        gained = be.to_numpy(g.run(["out"], {**feeds, "gain": np.array([2.0], np.float32)})[0])
        np.testing.assert_allclose(gained, ref_gain, atol=2e-5, rtol=1e-5)
        assert be.stats["sparse_attention_calls"] == 6
        if be.name == "torch":  # every onnxruntime output came back without a copy; inputs bound in place
            assert be.stats["handoffs"] > 0 and be.stats["handoffs_copied"] == 0
            assert be.stats["bound_in_place"] > 0 and be.stats["moved_to_host"] == be.stats["moved_to_device"] == 0
        with pytest.raises(SeaEdgeError, match="missing graph input 'idx'"):
            g.run(["out"], {k: v for k, v in feeds.items() if k != "idx"})
        with pytest.raises(SeaEdgeError, match="unknown graph input 'nope'"):
            g.run(["out"], {**feeds, "nope": feeds["q"]})
        with pytest.raises(SeaEdgeError, match="unknown graph output 'h'"):
            g.run(["h"], feeds)


def test_segment_cache_is_reused_and_a_corrupt_entry_rebuilt(tmp_path):
    from sea_edge.runtime.segments import FORMAT_TAG, load_plan

    folder, cache = _toy_model(tmp_path / "toy"), tmp_path / "cache"
    first = load_plan(folder, "model.onnx", cache)
    entry = first.entry
    assert first.cache == "built" and entry.name.endswith(f".{FORMAT_TAG}") and entry.parent == cache
    stamp = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    again = load_plan(folder, "model.onnx", cache)
    assert again.cache == "read" and {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamp
    assert [s.name for s in again.steps] == [s.name for s in first.steps]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    seg = entry / "seg-001.onnx"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    fixed = load_plan(folder, "model.onnx", cache)
    assert fixed.cache.startswith("rebuilt: seg-001.onnx is missing or fails its sha256 check"), fixed.cache
    assert load_plan(folder, "model.onnx", cache).cache == "read"
    (entry / "plan.json").write_text("{not json")
    assert load_plan(folder, "model.onnx", cache).cache.startswith("rebuilt: unreadable plan.json")
    (entry / "seg-000.onnx").unlink()
    assert load_plan(folder, "model.onnx", cache).cache.startswith("rebuilt: seg-000.onnx is missing")
    meta = json.loads((entry / "plan.json").read_text())
    assert meta["graph_sha256"] == entry.name.split(".")[0]  # keyed by the graph's sha256
    other = _toy_model(tmp_path / "other")  # the same graph in another folder: the same entry
    assert load_plan(other, "model.onnx", cache).entry == entry


def test_segment_cache_unwritable_falls_back_to_memory(tmp_path):
    from sea_edge.runtime.executor import NumpyBackend, SegmentedGraph
    from sea_edge.runtime.segments import load_plan

    folder = _toy_model(tmp_path / "toy")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    plan = load_plan(folder, "model.onnx", blocker / "cache")
    assert plan.cache.startswith("memory: cache") and plan.entry is None
    opener = _open(folder)
    g = SegmentedGraph(plan, NumpyBackend(), lambda step: opener(plan, step))
    assert g.run(["early"], _toy_feeds())[0].shape == (B, HQ, T, D)


def test_split_errors_are_one_line(tmp_path):
    from sea_edge.runtime.segments import build_plan, load_plan

    folder = _toy_model(tmp_path / "untyped", typed=False)
    with pytest.raises(SeaEdgeError, match="value 'a3' crosses a segment boundary but the graph has no type"):
        load_plan(folder, "model.onnx", tmp_path / "cache")
    with pytest.raises(SeaEdgeError, match="not a readable ONNX model"):
        build_plan(b"\x0a\xff\xff", "bad.onnx", "0" * 64)


# -- the head split (the CPU path) -----------------------------------------------------------------------------------

V_TOY, E_TOY = 300, 16


def _toy_lm(folder: Path, head: str = "MatMul", external_from: int = 256) -> Path:
    """A language model's shape: input_ids -> Gather(embed) -> MatMul -> Tanh -> the KV state present.0.key (B, 2,
    S, 8), and a final norm, a Slice of the last num_logits_to_keep rows (an overridable initializer, 0 = all) and
    a tied lm_head (MatMul by Transpose(embed), or `head`="Add": no matrix product makes the logits). Tensors of
    `external_from` bytes and more are external data (the small int64 ones inline, as the exporter writes them)."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(3)
    embed = rng.normal(size=(V_TOY, E_TOY)).astype(np.float32)
    w = rng.normal(size=(E_TOY, E_TOY)).astype(np.float32) / 4
    wk = rng.normal(size=(E_TOY, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "W"], ["x1"]),
        helper.make_node("Tanh", ["x1"], ["h"]),
        helper.make_node("MatMul", ["h", "WK"], ["k0"]),
        helper.make_node("Reshape", ["k0", "kshape"], ["k1"]),
        helper.make_node("Transpose", ["k1"], ["present.0.key"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["h", "norm"], ["hn"]),
        helper.make_node("Neg", ["num_logits_to_keep"], ["start"]),
        helper.make_node("Constant", [], ["big"], value=helper.make_tensor("b", TP.INT64, [1], [1 << 40])),
        helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("a", TP.INT64, [1], [1])),
        helper.make_node("Slice", ["hn", "start", "big", "ax"], ["hk"]),
        helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
    ]
    if head == "MatMul":
        nodes.append(helper.make_node("MatMul", ["hk", "embed_t"], ["logits"]))
    else:
        nodes.append(helper.make_node("Add", ["hk", "hk"], ["logits"]))
    g = helper.make_graph(
        nodes, "toy_lm",
        [helper.make_tensor_value_info("input_ids", TP.INT64, ["B", "T"]),
         helper.make_tensor_value_info("num_logits_to_keep", TP.INT64, [1])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["B", "K", V_TOY if head == "MatMul" else E_TOY]),
         helper.make_tensor_value_info("present.0.key", TP.FLOAT, ["B", 2, "T", 8])],
        [numpy_helper.from_array(embed, "embed"), numpy_helper.from_array(w, "W"), numpy_helper.from_array(wk, "WK"),
         numpy_helper.from_array(np.array([0, 0, 2, 8], np.int64), "kshape"),
         numpy_helper.from_array(np.linspace(0.5, 1.5, E_TOY).astype(np.float32), "norm"),
         numpy_helper.from_array(np.array([0], np.int64), "num_logits_to_keep")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=external_from)
    return folder


def test_head_split_equals_the_whole_graph(tmp_path):
    """Cut before the lm_head: the head holds the MatMul and the transposed (tied) embedding it reads, nothing of
    the body; the two sessions give the whole graph's logits and state, all rows or the last one, with the
    arena shrink on (logits over the threshold) or off; the state lands in the runtime's own numpy buffers."""
    from sea_edge.runtime.executor import HeadSplitGraph
    from sea_edge.runtime.segments import load_plan

    folder = _toy_lm(tmp_path / "lm")
    plan = load_plan(folder, "model.onnx", tmp_path / "cache", mode="head")
    assert plan.entry.name.endswith("-head") and plan.mode == "head"
    body, head = plan.steps
    assert (body.kind, head.kind) == ("ort", "ort") and head.nodes == 2  # Transpose(embed) + MatMul
    assert head.inputs == ["hk"] and head.outputs == ["logits"]
    assert body.outputs == ["present.0.key", "hk"] and "embed_t" not in body.outputs
    assert plan.defaults == {"num_logits_to_keep": {"dims": [1], "values": [0]}}
    assert load_plan(folder, "model.onnx", tmp_path / "cache", mode="head").cache == "read"
    assert load_plan(folder, "model.onnx", tmp_path / "cache").entry != plan.entry  # modes cached apart
    whole = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    g = HeadSplitGraph(plan, lambda step: _open(folder)(plan, step), {"key": ["batch", 2, "past_sequence_length", 8]},
                       V_TOY, hidden_size=E_TOY)  # the cut (B, rows, E) in a buffer of ours too
    ids = np.random.default_rng(0).integers(0, V_TOY, (2, 9))
    outs = ["logits", "present.0.key"]
    for threshold, shrunk in ((0, True), (1 << 40, False)):
        g.SHRINK_LOGITS_BYTES = threshold
        for keep in (None, 1, 4):
            feeds = {"input_ids": ids} if keep is None else {"input_ids": ids, "num_logits_to_keep": np.array([keep])}
            ref = whole.run(outs, feeds)
            got = g.run(outs, feeds)
            assert got[0].shape == ref[0].shape == (2, keep or 9, V_TOY)
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
            assert g.last_shrunk is shrunk
    state = g.run(["present.0.key"], {"input_ids": ids})[0]  # no logits asked: the head does not run
    np.testing.assert_array_equal(state, whole.run(["present.0.key"], {"input_ids": ids})[0])
    assert not g.last_shrunk and state.flags.owndata  # a buffer of our own, not onnxruntime's
    with pytest.raises(SeaEdgeError, match="unknown graph input 'nope'"):
        g.run(outs, {"input_ids": ids, "nope": ids})
    with pytest.raises(SeaEdgeError, match="unknown graph output 'hk'"):
        g.run(["hk"], {"input_ids": ids})
    # a state shape the manifest gets wrong is an error, not a silent reshape
    bad = HeadSplitGraph(plan, lambda step: _open(folder)(plan, step), {"key": ["batch", 3, "past_sequence_length", 8]},
                         V_TOY)
    with pytest.raises(SeaEdgeError, match="model.onnx \\(body\\): .*invalid dimensions for output: present.0.key"):
        bad.run(outs, {"input_ids": ids})


def test_head_split_errors(tmp_path):
    from sea_edge.runtime.segments import build_plan, load_plan

    folder = _toy_lm(tmp_path / "nohead", head="Add")
    with pytest.raises(SeaEdgeError, match="no matrix product .* produces the 'logits' output"):
        load_plan(folder, "model.onnx", tmp_path / "cache", mode="head")
    with pytest.raises(SeaEdgeError, match="unknown split mode 'tail'"):
        load_plan(folder, "model.onnx", tmp_path / "cache", mode="tail")
    with pytest.raises(SeaEdgeError, match="unknown split mode 'tail'"):
        build_plan((folder / "model.onnx").read_bytes(), "model.onnx", "0" * 64, mode="tail")
    folder = _toy_lm(tmp_path / "external", external_from=0)  # the overridable default in the weights file
    with pytest.raises(SeaEdgeError, match="overridable input 'num_logits_to_keep' is not an inline int64 tensor"):
        load_plan(folder, "model.onnx", tmp_path / "cache", mode="head")
    toy = _toy_model(tmp_path / "toy")  # no 'logits' output at all
    with pytest.raises(SeaEdgeError, match="produces the 'logits' output"):
        load_plan(toy, "model.onnx", tmp_path / "cache", mode="head")


def test_weight_pack_round_trip(tmp_path):
    """A weight pack (runtime/weight_pack.py) rebuilds the folder: graphs and small tensors byte for byte, each large
    float tensor random with its own mean and std; the rebuilt folder runs."""
    import onnx
    from onnx import numpy_helper
    from sea_edge.runtime.weight_pack import pack, unpack

    folder = _toy_lm(tmp_path / "lm")
    with pytest.raises(SeaEdgeError, match="not an exported folder"):
        pack(folder, tmp_path / "p0")
    (folder / "sea_edge.json").write_text("{}")
    res = pack(folder, tmp_path / "pack", large_bytes=4096)  # embed (19 KB) is large, the rest small
    assert res["zeroed_bytes"] == V_TOY * E_TOY * 4 and "model.onnx.data.gz" in res["files"]
    with pytest.raises(SeaEdgeError, match="exists"):
        pack(folder, tmp_path / "pack")
    unpack(tmp_path / "pack", tmp_path / "again")
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()

    def tensors(d):
        m = onnx.load(str(d / "model.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    a, b = tensors(folder), tensors(tmp_path / "again")
    for name in a:
        if name == "embed":
            assert not np.array_equal(a[name], b[name]) and a[name].shape == b[name].shape
            assert abs(b[name].std() / a[name].std() - 1) < 0.05 and abs(b[name].mean() - a[name].mean()) < 0.05
        else:
            np.testing.assert_array_equal(a[name], b[name])
    sess = ort.InferenceSession(str(tmp_path / "again" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(["logits"], {"input_ids": np.zeros((1, 3), np.int64)})[0].shape == (1, 3, V_TOY)
    with pytest.raises(SeaEdgeError, match="not a weight pack"):
        unpack(folder, tmp_path / "x")


def test_onnx_wire_reads_what_onnx_reads(tmp_path):
    import onnx
    from sea_edge.runtime import onnx_wire

    folder = _toy_model(tmp_path / "toy")
    raw = (folder / "model.onnx").read_bytes()
    ours = onnx_wire.parse_model(raw)
    theirs = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in ours.graph.nodes] == [n.op_type for n in theirs.graph.node]
    assert [n.int_attribute("axis", 0) for n in ours.graph.nodes] == \
        [next((a.i for a in n.attribute if a.name == "axis"), 0) for n in theirs.graph.node]
    assert [list(n.inputs) for n in ours.graph.nodes] == [list(n.input) for n in theirs.graph.node]
    assert list(ours.graph.initializers) == [t.name for t in theirs.graph.initializer]
    assert list(ours.graph.inputs) == [i.name for i in theirs.graph.input]
    assert set(ours.opset_domains()) == {o.domain for o in theirs.opset_import}
    assert len(ours.functions) == len(theirs.functions) == 1
    sa = next(n for n in ours.graph.nodes if n.name == "sa1")
    assert sa.float_attribute("scale") == pytest.approx(0.3)
    # a segment is a valid model that onnx reads back
    from sea_edge.runtime.segments import build_plan

    _, files = build_plan(raw, "model.onnx", "0" * 64)
    for name, data in files.items():
        m = onnx.load_from_string(data)
        assert not m.functions and "sea_edge" not in {o.domain for o in m.opset_import}, name
        (folder / name).write_bytes(data)  # beside the weights, where the checker looks for them
        onnx.checker.check_model(str(folder / name))


# -- the exported default ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whole(exported_default):
    from sea_edge.runtime import SeaSession

    return SeaSession(exported_default.out)


@pytest.fixture(scope="module")
def reference(whole):
    """The whole graph's prefill logits of two validation windows, and greedy tokens of a prompt and a batch."""
    from sea_edge.runtime.perplexity import token_windows

    from sea_edge.data import load_corpus

    ids = token_windows(whole.tokenizer, load_corpus("validation"), 160, 2)  # (2, 160)
    return {"ids": ids, "logits": whole.prefill_logits(ids),
            "one": whole.generate(PROMPT, max_new_tokens=32, stop_at_eos=False).tokens,
            "batch": whole.generate(["The king said", PROMPT], max_new_tokens=8, stop_at_eos=False).tokens}


@pytest.fixture(scope="module", params=["numpy", "torch"])
def split(request, exported_default, tmp_path_factory):
    """The default folder split at its SparseAttention nodes: NumPy twin (no torch), or the torch reference through
    IO binding and DLPack (the CUDA path's plumbing, on the CPU)."""
    from sea_edge.runtime import SeaSession

    if request.param == "torch":
        pytest.importorskip("torch")
    return SeaSession(exported_default.out, split=True, attention=request.param, verify=False,
                      cache_dir=str(tmp_path_factory.mktemp("segments")))


def test_exported_default_splits_into_61_segments(split, exported_default):
    from sea_edge.runtime import SeaSession

    g = split._prefill
    ops = [s.op for s in g.plan.steps if s.kind == "op"]  # per layer the estimate's content term and the attention
    assert g.n_segments == 61 and ops.count("SparseAttention") == ops.count("ColumnScores") == 30 and len(ops) == 60
    assert g.plan.cache == "built"
    again = SeaSession(exported_default.out, split=True, attention="numpy", cache_dir=split.config.cache_dir,
                       verify=False)
    assert again._prefill.plan.cache == "read" and again._prefill.plan.entry == g.plan.entry


def test_split_prefill_and_generation_equal_the_whole_graph(split, reference):
    """Prefill logits, and greedy tokens with the KV cache and SEA state carried through the split decode graph as
    the backend's values (one prompt, 32 tokens; a left-padded batch)."""
    got = split.prefill_logits(reference["ids"])
    assert got.shape == reference["logits"].shape == (2, 160, 49152)
    # Rows agree to ~1e-4 (fp32 logits of magnitude ~10, summed in another order by the backend's ops than by the
    # ONNX function bodies). At a few rows that reassociation flips a near-tied top-k column of the mask, which moves
    # the row by ~1e-3 (measured: torch 3, numpy 11 rows of 320 over 1e-3, 6.2e-3 at worst); a wrong step is off by
    # whole units.
    row_err = np.abs(got - reference["logits"]).max(-1)  # (2, 160)
    assert (row_err < 1e-3).mean() >= 0.95, np.sort(row_err.ravel())[-8:]
    np.testing.assert_allclose(got, reference["logits"], atol=2e-2, rtol=0)
    assert (got.argmax(-1) == reference["logits"].argmax(-1)).all()
    res = split.generate(PROMPT, max_new_tokens=32, stop_at_eos=False)
    assert res.tokens == reference["one"] and res.decode_steps == 31
    assert split.generate(["The king said", PROMPT], max_new_tokens=8, stop_at_eos=False).tokens == reference["batch"]
    if split.backend.name == "torch":  # every handoff in place, nothing moved across the host
        st = split.backend.stats
        assert st["handoffs"] > 0 and st["handoffs_copied"] == 0 and st["bound_in_place"] > 0
        assert st["moved_to_host"] == st["moved_to_device"] == 0


def test_split_perplexity_equals_the_whole_graph(split, whole):
    from sea_edge.data import load_corpus

    text = load_corpus("validation")
    a, b = whole.perplexity(text, 128, max_windows=2), split.perplexity(text, 128, max_windows=2)
    assert abs(b.ppl / a.ppl - 1) < 1e-4 and a.tokens == b.tokens


def test_head_split_session_equals_one_session(whole, reference, exported_default):
    """The CPU default (the graph cut before its lm_head, executor.HeadSplitGraph) and one session give the same
    prefill logits bit for bit, and the same greedy tokens."""
    from sea_edge.runtime import SeaSession
    from sea_edge.runtime.executor import HeadSplitGraph, WholeGraph

    one = SeaSession(exported_default.out, head_split=False, verify=False)
    assert isinstance(whole._prefill, HeadSplitGraph) and isinstance(one._prefill, WholeGraph)
    np.testing.assert_array_equal(one.prefill_logits(reference["ids"]), reference["logits"])
    assert one.generate(PROMPT, max_new_tokens=32, stop_at_eos=False).tokens == reference["one"]


def test_bench_gpu_steps_child_on_the_cpu(exported_default, monkeypatch, tmp_path):
    """bench_gpu's `steps` child (where a prefill's time goes) on the CPU split path: every step timed, the totals
    by kind, onnxruntime's op times from its profiler."""
    pytest.importorskip("torch")
    import argparse

    import sea_edge.runtime.bench_gpu as bg
    from sea_edge.runtime import SeaSession

    monkeypatch.chdir(tmp_path)  # onnxruntime's profiles land in the working folder (and are removed)
    monkeypatch.setattr(bg, "_session", lambda folder, **kw: SeaSession(
        folder, split=True, attention="numpy", verify=False, cache_dir=str(tmp_path / "segments"), **kw))
    r = bg._child_steps(argparse.Namespace(dir=exported_default.out, length=40, repeats=1))
    assert r["segments"] == 61 and r["prefill_s"] > 0 and r["gpu"] is None
    assert set(r["step_s"]) == {"onnxruntime segments", "ColumnScores", "SparseAttention"}
    assert sum(r["step_s"].values()) <= r["timed_run_s"] and len(r["slowest_segments"]) == 6
    assert r["ort_memcpy_runs"] == 0 and r["ort_node_runs"]["CPUExecutionProvider"] > 0
    assert any(k.startswith("CPU:MatMul") for k in r["ort_op_host_ms_per_prefill"]) and "gpu_kernels" not in r
    assert not list(tmp_path.glob("sea_edge_*.json"))


def test_split_session_arguments(exported_default, monkeypatch):
    from sea_edge.runtime import SeaSession

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CI sets it; with it, triton on the CPU is allowed

    for kwargs, match in (({"attention": "cuda-magic"}, "unknown attention 'cuda-magic'"),
                          ({"attention": "triton"}, "attention 'triton' needs device 'cuda'"),
                          ({"device": "cuda", "attention": "numpy"}, "attention 'numpy' runs on the CPU only"),
                          ({"split": False, "attention": "numpy"}, "applies to split graphs only")):
        with pytest.raises(SeaEdgeError, match=match):
            SeaSession(exported_default.out, **kwargs)


def test_split_with_the_triton_kernel_interpreted(exported_default, split, whole, reference):
    """The GPU path's attention, sparse_attention_triton, inside the split graph on the CPU (TRITON_INTERPRET=1,
    as CI runs): the idx rows the exported graph builds are what the kernel expects (ascending, -1 at the end), and
    the logits equal the whole graph's. One short prefill: the interpreter is slow. The column scores run their
    reference here: interpreted, the causal kernel walks K = 256 boundaries per (head, layer), 8 minutes for this
    prefill; tests/test_kernels_cols.py checks that kernel against the same reference (and `-m gpu` at real
    shapes)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton kernels interpreted on the CPU)")
    pytest.importorskip("triton")
    if split.backend.name != "torch":
        pytest.skip("once, beside the torch backend")
    from sea_edge.runtime import SeaSession

    s = SeaSession(exported_default.out, split=True, attention="triton", verify=False,
                   cache_dir=split.config.cache_dir)
    from sea_edge.kernels.reference import column_scores_ref

    s.backend._scores_fn = column_scores_ref
    ids = reference["ids"][:1, :20]
    ref = whole.prefill_logits(ids)
    got = s.prefill_logits(ids)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert s.backend.stats["sparse_attention_calls"] == s.backend.stats["column_scores_calls"] == 30


def test_bisect_ep_cpu_against_itself(exported_default):
    """runtime/bisect_ep on the CPU provider against itself: every segment of the prefill graph agrees exactly,
    and with a negative tolerance the drill-down runs (every optimization level, every value exposed) and names
    nodes, so on the GPU machine it can only report what differs."""
    from sea_edge.runtime.bisect_ep import bisect

    r = bisect(exported_default.out, seq_len=32, provider="CPUExecutionProvider", progress=lambda *_: None)
    assert len(r["segments"]) == 61 and all(s["worst_rel_diff"] == 0 for s in r["segments"])
    assert r["first_bad_segment"] is None and "every segment within" in r["verdict"]
    r = bisect(exported_default.out, seq_len=32, decode=True, provider="CPUExecutionProvider", tol=-1,
               progress=lambda *_: None)
    bad = r["first_bad_segment"]
    assert r["graph"] == "decode.onnx" and bad["segment"] == r["segments"][0]["segment"]
    assert set(bad["by_optimization_level"]) == {"all", "extended", "basic", "off"}
    assert bad["exposed_values"] > 10 and len(bad["first_bad_nodes"]) == 8
