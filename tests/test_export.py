"""Export: the ONNX ops against their references, then the main job on the default model (export -> run in a
plain onnxruntime with graph optimizations off -> assert the custom node and its function are there -> compare with
torch), and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from sea_edge.kernels import column_scores, column_scores_ref, sparse_attention_ref, sparse_index_op, sparse_index_ref

from sea_edge.config import SEAConfig, budget
from sea_edge.errors import SeaEdgeError

ort = pytest.importorskip("onnxruntime")


def _session(model_or_path):
    from sea_edge.export.validate import ort_session

    if isinstance(model_or_path, onnx.ModelProto):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(model_or_path.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort_session(model_or_path)


# -- the SparseAttention function body ----------------------------------------------------------------------------

def _sparse_attention_model(opset=18, row_chunk=64):
    from sea_edge.export.onnx_ops import DOMAIN, OP, register_schema, sparse_attention_function

    register_schema()
    node = helper.make_node(OP, ["q", "k", "v", "idx"], ["out"], domain=DOMAIN, scale=0.125)
    dims = lambda n: [f"{n}{i}" for i in range(4)]
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims(n)) for n in "qkv"]
        + [helper.make_tensor_value_info("idx", TensorProto.INT32, dims("i"))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims("q"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
                             functions=[sparse_attention_function(opset, row_chunk)], ir_version=9)


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,w", [(2, 6, 2, 111, 111, 60, 40), (1, 9, 3, 1, 77, 64, 16),
                                             (1, 4, 4, 130, 200, 32, 8), (1, 3, 1, 63, 63, 16, 1)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("row_chunk", [64, None], ids=["scan", "rows-at-once"])
def test_function_body_matches_reference(B, Hq, Hkv, T, S, D, w, row_chunk):
    """Both bodies: the Scan over blocks of 64 rows (prefill) and every row at once (the decode graph's)."""
    m = _sparse_attention_model(row_chunk=row_chunk)
    assert any(n.op_type == "Scan" for n in m.functions[0].node) == (row_chunk is not None)
    onnx.checker.check_model(m, full_check=True)
    sess = _session(m)
    g = torch.Generator().manual_seed(T * 7 + S)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    idx = torch.randint(-1, S, (B, Hq, T, w), generator=g).int()
    idx[0, 0, 0] = -1  # a row with no key at all: zeros
    ref = sparse_attention_ref(q, k, v, idx, 0.125)
    out = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "idx": idx.numpy()})[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=2e-6, rtol=1e-5)
    assert not out[0, 0, 0].any()


# -- the ColumnScores op and its function body ------------------------------------------------------------------

class _Scores(torch.nn.Module):
    def __init__(self, K, causal):
        super().__init__()
        self.K, self.causal = K, causal

    def forward(self, q, k, key_valid):
        return column_scores(q, k, self.K, self.causal, 0.125, key_valid)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("row_chunk", [64, None], ids=["scan", "rows-at-once"])
def test_column_scores_translation_matches_reference(causal, row_chunk):
    """Exported with dynamic T and S (the queries are the last T of S positions), the ColumnScores node and its
    function body (a Scan over blocks of rows, or every row at once as in the decode graph) run at other lengths
    with padding: the reference's scores."""
    from sea_edge.export.onnx_ops import COLUMN_SCORES, DOMAIN, attach_functions, custom_translation_table

    K, D = 16, 12
    T_dim, S_dim = torch.export.Dim("T", min=1, max=512), torch.export.Dim("S", min=2, max=1024)
    ex = (torch.randn(2, 6, 37, D), torch.randn(2, 2, 45, D), torch.ones(2, 45, dtype=torch.bool))
    prog = torch.onnx.export(_Scores(K, causal).eval(), ex, dynamo=True, input_names=["q", "k", "key_valid"],
                             dynamic_shapes=({2: T_dim}, {2: S_dim}, {1: S_dim}), optimize=False,
                             custom_translation_table=custom_translation_table())
    m = attach_functions(prog.model_proto, row_chunk=row_chunk)
    assert [n.op_type for n in m.graph.node if n.domain == DOMAIN] == [COLUMN_SCORES]
    body = next(f for f in m.functions if f.name == COLUMN_SCORES)
    assert any(n.op_type == "Scan" for n in body.node) == (row_chunk is not None)
    onnx.checker.check_model(m, full_check=True)
    sess = _session(m)
    g = torch.Generator().manual_seed(2)
    for T, S in ((5, 5), (111, 111), (1, 77), (70, 130), (3, 9)):  # (3, 9): S < K, empty columns
        q, k = torch.randn(2, 6, T, D, generator=g), torch.randn(2, 2, S, D, generator=g) + 0.5
        kv = torch.ones(2, S, dtype=torch.bool)
        kv[1, : S // 3] = False  # left padding on the second sequence
        ref = column_scores_ref(q, k, K, causal, 0.125, kv)
        out = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "key_valid": kv.numpy()})[0]
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=1e-4, err_msg=f"T={T} S={S}")


# -- the mask construction in standard ONNX ops ---------------------------------------------------------------------

class _Mask(torch.nn.Module):
    def __init__(self, cfg, H):
        super().__init__()
        self.cfg, self.H = cfg, H

    def forward(self, probs, key_valid):
        S = key_valid.shape[1]
        n_cols, head_cap, span = budget(self.cfg, self.H, S)
        return sparse_index_op(probs, key_valid, n_cols, head_cap, S, self.cfg.causal, self.H * self.cfg.k, span)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_sparse_index_translation_matches_reference(causal):
    """Exported with a dynamic length, then run at other lengths: the same keys in the same order as the
    reference, ties included (probabilities on a coarse grid tie often), with padding keys dropped."""
    from sea_edge.export.onnx_ops import custom_translation_table

    H, K = 3, 16
    cfg = SEAConfig(k=4, compressed_width=K, causal=causal).resolve(causal, 16)
    T_dim = torch.export.Dim("T", min=2, max=512)
    ex = (torch.rand(2, H, 37, K).softmax(-1), torch.ones(2, 37, dtype=torch.bool))
    prog = torch.onnx.export(_Mask(cfg, H), ex, dynamo=True, input_names=["probs", "key_valid"],
                             dynamic_shapes=({2: T_dim}, {1: T_dim}), optimize=False,
                             custom_translation_table=custom_translation_table())
    nodes = {n.op_type for n in prog.model_proto.graph.node}
    assert "TopK" in nodes and not any(n.domain for n in prog.model_proto.graph.node)  # standard ops only
    sess = _session(prog.model_proto)
    g = torch.Generator().manual_seed(1)
    for T in (5, 50, 111, 300):
        probs = (torch.randint(0, 4, (2, H, T, K), generator=g).float() / 4).softmax(-1)  # many ties
        probs[torch.rand(probs.shape, generator=g) < 0.4] = 0.0  # and exact zeros (an underflowed softmax)
        kv = torch.ones(2, T, dtype=torch.bool)
        kv[1, : T // 3] = False  # left padding on the second row
        n_cols, head_cap, span = budget(cfg, H, T)
        ref = sparse_index_ref(probs, n_cols, head_cap, T, causal, kv, H * cfg.k, span)
        out = sess.run(None, {"probs": probs.numpy(), "key_valid": kv.numpy()})[0]
        assert out.shape == tuple(ref.shape)
        np.testing.assert_array_equal(out, ref.numpy(), err_msg=f"T={T}")
    # TopK's order among equal values is the provider's choice (CUDA's is not the CPU's): the scores it ranks must
    # have no ties left, every key of a token distinct across heads and columns; and none is -inf (the CUDA
    # provider's TopK goes wrong on -inf when k = n > 1024: runtime/results/gpu_h200/topk_probe.json).
    m = onnx.shape_inference.infer_shapes(prog.model_proto)
    ranked = [n.input[0] for n in m.graph.node if n.op_type == "TopK"][:2]
    m.graph.output.extend(vi for vi in m.graph.value_info if vi.name in ranked)
    keys = _session(m).run(ranked, {"probs": probs.numpy(), "key_valid": kv.numpy()})
    for name, key in zip(ranked, keys):
        rows = key.transpose(0, 2, 1, 3).reshape(2 * T, -1) if key.ndim == 4 else key.reshape(2 * T, -1)
        assert np.isfinite(rows).all(), f"non-finite keys in {name}"
        for r in rows:
            assert len(np.unique(r)) == len(r), f"tied keys in {name}"


# -- the main job on the default model ------------------------------------------------------------------------------

def test_export_writes_custom_op_function_and_manifest(exported_default):
    from sea_edge.export.exporter import MANIFEST, read_manifest, sha256_file
    from sea_edge.export.graphs import DEBUG_METADATA

    out = exported_default.out
    man = read_manifest(out)
    n = man["source_model"]["n_layers"]
    for name in ("model.onnx", "decode.onnx"):
        m = onnx.load(str(out / name), load_external_data=False)
        custom = [nd.op_type for nd in m.graph.node if nd.domain == "sea_edge"]
        # per layer the estimate's content term (the embedded estimator has it) and the attention
        assert custom.count("SparseAttention") == n and custom.count("ColumnScores") == n and len(custom) == 2 * n
        assert {f.name for f in m.functions if f.domain == "sea_edge"} == {"SparseAttention", "ColumnScores"}
        body = next(f for f in m.functions if f.name == "ColumnScores")
        assert any(nd.op_type == "Scan" for nd in body.node) == (name == "model.onnx")  # decode: one row
        assert any(o.domain == "sea_edge" and o.version == 1 for o in m.opset_import)
        # torch.onnx's per-node debug metadata (stack traces, fx nodes: ~15 MB a graph) is not shipped
        assert not any(p.key in DEBUG_METADATA for nd in m.graph.node for p in nd.metadata_props)
        assert (out / name).stat().st_size < 8e6
    assert set(man["files"]) >= {"model.onnx", "decode.onnx", "model.onnx.data", "tokenizer.json"}
    for name, f in man["files"].items():
        assert (out / name).stat().st_size == f["bytes"] and sha256_file(out / name) == f["sha256"]
    assert not (out / MANIFEST).read_text().count("NaN")
    v = man["validation"]
    assert v["prefill"]["top1_agreement"] >= 0.99 and v["decode"]["top1_agreement"] >= 0.99
    assert json.loads((out / MANIFEST).read_text())["sea_config"]["k"] == 64
    # one copy of the weights: the decode graph reads the prefill graph's file
    assert (out / "model.onnx.data").stat().st_size > 400e6
    assert (out / "decode.onnx").stat().st_size < 100e6 and not (out / "decode.onnx.data").exists()


def test_plain_onnxruntime_matches_torch(exported_default, sea_smollm2):
    """A stock onnxruntime session (no custom-op library) runs the exported prefill; compared with the torch SEA
    model on real text not used by the export's own validation (the train split)."""
    from sea_edge.export.validate import _feeds, compare_logits

    from sea_edge.data import load_corpus, token_windows

    model, tok = sea_smollm2
    ids = token_windows(tok, load_corpus("train"), 200, max_windows=1)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.numpy()
    out = _session(exported_default.out / "model.onnx").run(["logits"], _feeds(ids.numpy()))[0]
    r = compare_logits(out, ref)
    assert r["top1_agreement"] >= 0.99, r
    assert r["max_abs_logit_diff"] < 0.1, r


def test_decode_reproduces_prefill_token_by_token(exported_default, sea_smollm2):
    """Prefill 64 tokens, then 32 decode steps carrying the KV cache and SEA's state: each step's logits equal the
    prefill graph's on the whole sequence (S <= 256 keeps SEA's budget the same for both)."""
    from sea_edge.export.validate import _feeds, run_decode

    from sea_edge.data import load_corpus, token_windows

    _, tok = sea_smollm2
    x = token_windows(tok, load_corpus("train"), 96, max_windows=1).numpy()
    prefill = _session(exported_default.out / "model.onnx")
    full = prefill.run(["logits"], _feeds(x))[0][:, 64:]
    steps = run_decode(prefill, _session(exported_default.out / "decode.onnx"), x, 64)
    assert steps.shape == full.shape == (1, 32, full.shape[-1])
    np.testing.assert_allclose(steps, full, atol=2e-3, rtol=0)
    assert (steps.argmax(-1) == full.argmax(-1)).all()


# -- bad input: clear errors, nothing half-written -------------------------------------------------------------------

def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_refuses_non_empty_out_unless_forced(tmp_path):
    from sea_edge.export.exporter import ExportConfig, export

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SeaEdgeError, match="not empty"):
        export(ExportConfig(out=out))
    assert (out / "keep.txt").read_text() == "mine" and _leftovers(tmp_path) == []


def test_refuses_unwritable_out_and_unknown_quant(tmp_path):
    from sea_edge.export.exporter import ExportConfig, export

    with pytest.raises(SeaEdgeError, match="cannot create"):
        export(ExportConfig(out="/proc/sea-edge-test/out"))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SeaEdgeError, match="cannot create"):
        export(ExportConfig(out=f / "out"))
    with pytest.raises(SeaEdgeError, match="unknown --quant"):
        ExportConfig(out=tmp_path / "q", quant="int3")


def test_estimator_for_another_model_is_refused(tmp_path, minilm):
    from sea_edge.export.exporter import ExportConfig, export

    from sea_edge.estimator_io import save_estimator
    from sea_edge.patch import to_dense, to_sea

    model, _ = minilm
    to_sea(model)
    try:
        save_estimator(model, tmp_path / "bert-est")
    finally:
        to_dense(model)
    out = tmp_path / "out"
    with pytest.raises(SeaEdgeError, match="made for"):
        export(ExportConfig(out=out, estimator=str(tmp_path / "bert-est")))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_cli_export_bad_input(tmp_path):
    from typer.testing import CliRunner

    from sea_edge.cli import app

    r = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "o"), "--quant", "int3"])
    assert r.exit_code == 2 and "int3" in r.output
    r = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "o"), "--estimator", str(tmp_path / "none")])
    assert r.exit_code == 1 and "does not exist" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_encoder_exports_one_graph(tmp_path, minilm):
    """A BERT-family encoder (MiniLM) exports one graph (with padding in the validation batch). Budget k = 1024
    covers every key of its 512 positions, so SEA equals dense attention and the export must match torch closely
    (with an untrained estimator at a small k, near-tied estimates let fp rounding pick other columns)."""
    from sea_edge.config import SEAConfig
    from sea_edge.estimator_io import save_estimator
    from sea_edge.export.exporter import ExportConfig, export, read_manifest
    from sea_edge.patch import to_dense, to_sea

    model, _ = minilm
    to_sea(model, SEAConfig(k=1024))
    try:
        save_estimator(model, tmp_path / "est")
    finally:
        to_dense(model)
    r = export(ExportConfig(out=tmp_path / "enc", model="minilm-l6", estimator=str(tmp_path / "est")))
    man = read_manifest(tmp_path / "enc")
    assert set(man["graphs"]) == {"encoder", "n_layers"} and not (tmp_path / "enc" / "decode.onnx").exists()
    m = onnx.load(str(tmp_path / "enc" / "model.onnx"), load_external_data=False)
    custom = [n.op_type for n in m.graph.node if n.domain == "sea_edge"]
    assert custom.count("SparseAttention") == custom.count("ColumnScores") == 6 and len(custom) == 12
    assert r.validation["rel_err"] < 1e-4 and r.validation["agreement"] == 1.0


def test_num_logits_to_keep(exported_default):
    """The prefill's optional num_logits_to_keep input: 0 (its default, or no feed) = every position, n = the last n,
    bit-identical to the same rows of the full logits; the manifest declares it."""
    from sea_edge.export.exporter import read_manifest
    from sea_edge.export.validate import _feeds

    man = read_manifest(exported_default.out)
    assert "num_logits_to_keep" in man["graphs"]["prefill"]["optional_inputs"]
    sess = _session(exported_default.out / "model.onnx")
    assert "num_logits_to_keep" in {i.name for i in sess.get_overridable_initializers()}
    ids = np.random.default_rng(3).integers(0, 49152, (2, 37))
    feeds = _feeds(ids)
    full = sess.run(["logits"], feeds)[0]
    assert full.shape == (2, 37, 49152)
    for n, rows in ((0, 37), (1, 1), (5, 5), (100, 37)):
        out = sess.run(["logits"], {**feeds, "num_logits_to_keep": np.array([n], np.int64)})[0]
        assert out.shape == (2, rows, 49152)
        np.testing.assert_array_equal(out, full[:, 37 - rows:])
