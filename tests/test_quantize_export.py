"""Quantization of the exported default (sea-edge quantize): every scheme quantizes it, the result runs in a plain
onnxruntime with the custom op and its function intact, and SQNR / mask agreement / perplexity meet floors."""

from __future__ import annotations

import onnx
import pytest

from sea_edge.errors import SeaEdgeError

ort = pytest.importorskip("onnxruntime")

# Floors below what the default measured (2 windows of 256 validation tokens; module SQNR isolated, min over layers;
# the tied embedding / lm_head in int8 blocks of 64 under every weight-only scheme): int8 +0.5% ppl, mask agreement
# 0.992, size 0.27x, SQNR >= 34.7 dB; nf4 +25% / 0.923 / 0.18x / 14.7 dB. int4 (asymmetric, GGUF Q4_1's grid) gives
# the teacher's Q4_1 GGUF weights back exactly (every teacher Linear "exact"), so only the estimator moves: +0.1% ppl
# at 2 x 2048 tokens, mask agreement 0.953, 0.198x, estimator SQNR >= 22.9 dB.
FLOORS = {
    "int8": {"sqnr": 30.0, "mask": 0.95, "ppl": 0.03, "size": 0.30},
    "nf4": {"sqnr": 12.0, "mask": 0.85, "ppl": 0.45, "size": 0.20},
    "int4": {"sqnr": 20.0, "mask": 0.90, "ppl": 0.03, "size": 0.20},
    # optimum's dynamic int8 quantizes activations per tensor at run time: +80% ppl on this model (measured), kept
    # here as "runs, keeps the masks, stays in range", not as a quality bar
    "dynamic-int8": {"sqnr": None, "mask": 0.85, "ppl": 1.5, "size": 0.5},
}


@pytest.mark.parametrize("scheme", list(FLOORS))
def test_scheme_quantizes_the_default(exported_default, tmp_path, scheme):
    from sea_edge.export.exporter import read_manifest
    from sea_edge.export.requantize import quantize_folder

    out = tmp_path / scheme
    stray = exported_default.out / "stray.onnx"  # not in the manifest: neither copied nor counted in the size
    stray.write_bytes(b"x" * (1 << 20)) if scheme == "int8" else None
    try:
        r = quantize_folder(exported_default.out, out, scheme, report_tokens=96)
    finally:
        stray.unlink(missing_ok=True)
    assert not (out / "stray.onnx").exists()
    model_files = ("model.onnx", "decode.onnx", "model.onnx.data")
    assert r["size_bytes"]["quantized"] == sum((out / n).stat().st_size for n in model_files)
    f = FLOORS[scheme]
    assert r["size_ratio"] <= f["size"], r["size_ratio"]
    assert r["mask_agreement"] >= f["mask"], r["mask_agreement"]
    assert abs(r["perplexity"]["delta"]) <= f["ppl"], r["perplexity"]
    if f["sqnr"] is not None:
        worst = min(v["min"] for v in r["sqnr_db"].values() if v["min"] is not None)  # None: exact
        assert worst >= f["sqnr"], r["sqnr_db"]
    if scheme == "int4":  # the teacher's own Q4_1 codes: every teacher Linear's output unchanged, bit for bit
        n = read_manifest(exported_default.out)["source_model"]["n_layers"]
        teacher = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        assert all(r["sqnr_db"][k]["exact"] == n for k in teacher), {k: r["sqnr_db"][k] for k in teacher}
    man = read_manifest(out)
    assert man["quantization"]["scheme"] == scheme
    if scheme != "dynamic-int8":  # the tied table: one uint8 code table read by the gather and the lm_head
        assert man["quantization"]["embedding"]["block_size"] == 64 and r["sqnr_db"]["lm_head"]["min"] >= 40
        ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
        # one MatMulNBits for the lm_head, and under int4 one per Linear (report["quantization"]["weights"] counts
        # the Linears and the table)
        nbits = r["quantization"]["weights"] if scheme == "int4" else 1
        assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == nbits
    for name in ("model.onnx", "decode.onnx"):  # the custom ops and their function bodies survive
        m = onnx.load(str(out / name), load_external_data=False)
        custom = [n.op_type for n in m.graph.node if n.domain == "sea_edge"]
        n_layers = man["source_model"]["n_layers"]
        assert custom.count("SparseAttention") == custom.count("ColumnScores") == n_layers
        assert {fn.name for fn in m.functions if fn.domain == "sea_edge"} == {"SparseAttention", "ColumnScores"}
    # and it runs in the runtime, which checks every file's sha256 against the manifest
    from sea_edge.runtime import SeaSession

    r = SeaSession(out).generate("ROMEO.", max_new_tokens=4, stop_at_eos=False)
    assert len(r.tokens) == 4 and r.finish_reason == "length"


def test_quantize_bad_input(exported_default, tmp_path):
    from sea_edge.export.requantize import quantize_folder

    with pytest.raises(SeaEdgeError, match="unknown --scheme"):
        quantize_folder(exported_default.out, tmp_path / "x", "int3")
    with pytest.raises(SeaEdgeError, match="unknown --target"):
        quantize_folder(exported_default.out, tmp_path / "y", "dynamic-int8", target="toaster")
    with pytest.raises(SeaEdgeError, match="unknown accuracy level 3"):
        quantize_folder(exported_default.out, tmp_path / "w", "int8", accuracy_level=3)
    with pytest.raises(SeaEdgeError, match="not a sea-edge export"):
        quantize_folder(tmp_path, tmp_path / "z", "int8")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
