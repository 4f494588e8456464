"""torch.onnx (dynamo) export of the prefill and decode graphs, and saving them with one shared weights file."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from sea_edge.runtime.manifest import LOGITS_TO_KEEP

from .model import STATE_KINDS, BertEncoder, LlamaDecode, LlamaPrefill, io_names
from .onnx_ops import ROW_CHUNK, attach_functions, custom_translation_table

__all__ = ["DEBUG_METADATA", "LOGITS_TO_KEEP", "add_logits_to_keep", "export_prefill", "export_decode",
           "export_encoder", "save_pair", "save_one",
           "strip_debug_metadata", "model_dims",
           "graph_manifest", "encoder_manifest", "example_inputs"]

ENCODER_INPUTS, ENCODER_OUTPUTS = ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"]

_EXAMPLE_B, _EXAMPLE_T, _EXAMPLE_PAST = 2, 33, 17  # not 0 or 1: torch.export would specialise those sizes


def model_dims(model) -> dict:
    from sea_edge.patch import sea_layers

    c = model.config
    est = sea_layers(model)[0].sea
    if not model.sea_config.causal:
        return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
                "n_features": est.m, "compressed_width": est.K, "decoder_channels": est.C,
                "decoder_ratio": est.cfg.decoder_ratio, "tie_word_embeddings": False}
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "n_features": est.m, "compressed_width": est.K, "decoder_channels": est.C,
            "decoder_ratio": est.cfg.decoder_ratio, "tie_word_embeddings": bool(c.tie_word_embeddings)}


def state_shapes(model) -> dict[str, list]:
    """Symbolic shape of each per-layer state tensor (B batch, S positions so far)."""
    c = model.config
    est = model.model.layers[0].self_attn.sea
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, est.D
    return {"key": ["batch", Hkv, "past_sequence_length", D], "value": ["batch", Hkv, "past_sequence_length", D],
            "sea_state": ["batch", Hkv, est.m, D + est.K + 1],
            "sea_rows1": ["batch", H, est.C, 2, est.K // est.cfg.decoder_ratio],
            "sea_rows2": ["batch", H, est.C, 2, est.K // est.cfg.decoder_ratio]}


def graph_manifest(model) -> dict:
    n = model.config.num_hidden_layers
    pin, pout = io_names(n, decode=False)
    din, dout = io_names(n, decode=True)
    # unused_topk_retained: false -- the mask's keys are compacted without a final TopK sort, whose unread (B, H, T, w)
    # values onnxruntime would hold to the end of the run (sea_edge.runtime.budget.ModelDims.mask_final_sort)
    return {"prefill": {"file": "model.onnx", "inputs": pin, "outputs": pout, "unused_topk_retained": False,
                        "optional_inputs": {LOGITS_TO_KEEP: "int64 [1]: logits of the last n positions only; "
                                                            "0 (the default) = every position"}},
            "decode": {"file": "decode.onnx", "inputs": din, "outputs": dout},
            "n_layers": n, "state_kinds": list(STATE_KINDS), "state_shapes": state_shapes(model)}


def example_inputs(model, B: int, T: int, past: int = 0):
    """Real-shaped example inputs (random tokens) for tracing: prefill (past = 0) or decode (T = 1)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, past + T, dtype=torch.int64)
    pos = torch.arange(past, past + T).expand(B, T).contiguous()
    return ids, mask, pos


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and a few warnings on every export; keep the user's terminal for ours."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export(module, args, dynamic_shapes, names, opset: int,
            row_chunk: int | None = ROW_CHUNK) -> onnx.ModelProto:
    """torch.onnx dynamo export. optimize=False: onnxscript's rewriter took half the export time (minutes for 30
    layers on 2 cores) for rewrites onnxruntime's own graph optimizer does again when a session opens."""
    ins, outs = names
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(module, args, dynamo=True, input_names=ins, output_names=outs,
                                 dynamic_shapes=dynamic_shapes, custom_translation_table=custom_translation_table(),
                                 opset_version=opset, optimize=False)
    proto = prog.model_proto
    proto.ir_version = min(proto.ir_version, 9 if opset <= 20 else 10)  # IR 9: onnxruntime >= 1.16 reads it
    _fold_weight_transposes(proto)
    return attach_functions(proto, opset, row_chunk)


def _fold_weight_transposes(model: onnx.ModelProto) -> None:
    """Without the exporter's optimizer, each Linear is MatMul(x, Transpose(W)). Store W transposed instead, under
    W's own name (the torch state_dict key), when nothing else reads W: no Transpose at run time, a weight name
    that quantization can match with the torch model's, and the same name (hence one copy on disk) in both graphs.
    A W read elsewhere too (the tied embedding / lm_head) is left as it is."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    folded = {}
    for n in list(g.node):
        if n.op_type != "Transpose" or n.domain not in ("", "ai.onnx") or n.input[0] not in inits:
            continue
        w = inits[n.input[0]]
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if len(w.dims) != 2 or perm not in (None, [1, 0]) or readers[w.name] != 1:
            continue
        t = numpy_helper.from_array(onnx.numpy_helper.to_array(w).T.copy(), w.name)
        g.initializer.remove(w)
        g.initializer.append(t)
        g.node.remove(n)
        folded[n.output[0]] = w.name
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in folded:
                n.input[k] = folded[i]
    gone = set(folded) | set(folded.values())
    for v in [v for v in g.value_info if v.name in gone]:
        g.value_info.remove(v)


def encoder_manifest(model) -> dict:
    return {"encoder": {"file": "model.onnx", "inputs": ENCODER_INPUTS, "outputs": ENCODER_OUTPUTS},
            "n_layers": model.config.num_hidden_layers}


def export_encoder(model, opset: int) -> onnx.ModelProto:
    """A BERT-family encoder in SEA mode: one graph, dynamic batch and sequence."""
    B = torch.export.Dim("batch", min=1, max=1024)
    T = torch.export.Dim("sequence_length", min=2, max=model.config.max_position_embeddings)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (_EXAMPLE_B, _EXAMPLE_T), generator=g)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    return _export(BertEncoder(model).eval(), args, ({0: B, 1: T},) * 3, (ENCODER_INPUTS, ENCODER_OUTPUTS), opset)


def add_logits_to_keep(model: onnx.ModelProto) -> None:
    """Give the prefill graph the LOGITS_TO_KEEP input (in place): the lm_head MatMul reads
    Slice(hidden, -n, end, axis 1) instead of the hidden states. The input has an initializer of the same name
    holding 0, onnx's overridable default, so feeds without it keep every position."""
    g = model.graph
    head = next((n for n in g.node if "logits" in n.output), None)
    if head is None or head.op_type != "MatMul" or LOGITS_TO_KEEP in {i.name for i in g.input}:
        raise ValueError("the prefill graph has no lm_head MatMul writing 'logits' (or already has "
                         f"{LOGITS_TO_KEEP})")
    hidden, kept, neg = head.input[0], f"{head.input[0]}_kept", f"{LOGITS_TO_KEEP}_neg"
    end, axis = f"{LOGITS_TO_KEEP}_end", f"{LOGITS_TO_KEEP}_axis"
    g.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [1]))
    g.initializer.extend([numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_TO_KEEP),
                          numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), end),
                          numpy_helper.from_array(np.ones(1, np.int64), axis)])
    at = list(g.node).index(head)
    g.node.insert(at, helper.make_node("Slice", [hidden, neg, end, axis], [kept], name="logits_to_keep_slice"))
    g.node.insert(at, helper.make_node("Neg", [LOGITS_TO_KEEP], [neg], name="logits_to_keep_neg"))
    head.input[0] = kept
    for v in g.output:  # the logits' length is no longer the input's
        if v.name == "logits" and len(v.type.tensor_type.shape.dim) == 3:
            v.type.tensor_type.shape.dim[1].dim_param = "logits_length"
    for v in [v for v in g.value_info if v.name in ("logits", kept)]:
        g.value_info.remove(v)


def save_one(model: onnx.ModelProto, path: Path, weights: str) -> None:
    strip_debug_metadata(model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=weights,
                    size_threshold=1024)


def export_prefill(model, opset: int) -> onnx.ModelProto:
    n = model.config.num_hidden_layers
    B = torch.export.Dim("batch", min=1, max=1024)
    T = torch.export.Dim("sequence_length", min=1, max=model.config.max_position_embeddings)
    args = example_inputs(model, _EXAMPLE_B, _EXAMPLE_T)
    return _export(LlamaPrefill(model).eval(), args, ({0: B, 1: T},) * 3, io_names(n, False), opset)


def export_decode(model, opset: int) -> onnx.ModelProto:
    n = model.config.num_hidden_layers
    B = torch.export.Dim("batch", min=1, max=1024)
    P = torch.export.Dim("past_sequence_length", min=1, max=model.config.max_position_embeddings - 1)
    ids, mask, pos = example_inputs(model, _EXAMPLE_B, 1, _EXAMPLE_PAST)
    with torch.no_grad():  # a real state to trace with: the prefill of the example's past
        out = LlamaPrefill(model).eval()(*example_inputs(model, _EXAMPLE_B, _EXAMPLE_PAST))
    past = tuple(out[1:])
    per_layer = [{0: B, 2: P}, {0: B, 2: P}, {0: B}, {0: B}, {0: B}]
    dyn = ({0: B}, {0: B, 1: P + 1}, {0: B}, tuple(per_layer * n))  # *past_flat is one tuple argument
    # one row per sequence: the SparseAttention body without its Scan (onnx_ops.sparse_attention_function)
    return _export(LlamaDecode(model).eval(), (ids, mask, pos, *past), dyn, io_names(n, True), opset,
                   row_chunk=None)


def _digest(t: onnx.TensorProto) -> str:
    return hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest()


DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy",
                  "namespace")
"""Per-node metadata torch.onnx writes for debugging: ~15 MB of the default model's 17.6 MB graph, dropped on save
(pkg.torch.onnx.name_scopes, which names the weights of a MatMul, stays)."""


def strip_debug_metadata(model: onnx.ModelProto) -> int:
    """Drop DEBUG_METADATA from every node of the main graph (in place). Returns the bytes removed."""
    removed = 0
    for n in model.graph.node:
        keep = [p for p in n.metadata_props if p.key not in DEBUG_METADATA]
        if len(keep) != len(n.metadata_props):
            removed += sum(p.ByteSize() for p in n.metadata_props) - sum(p.ByteSize() for p in keep)
            del n.metadata_props[:]
            n.metadata_props.extend(keep)
    return removed


def save_pair(prefill: onnx.ModelProto, decode: onnx.ModelProto, prefill_path: Path, decode_path: Path,
              weights: str) -> None:
    """Save both graphs with every weight of the prefill graph in one external file, `weights`, and make the decode
    graph point into that same file for each weight it shares (same name, same bytes): one copy on disk. The
    exporter's debug metadata is dropped from both (strip_debug_metadata)."""
    folder = Path(prefill_path).parent
    strip_debug_metadata(prefill)
    strip_debug_metadata(decode)
    digests = {t.name: _digest(t) for t in prefill.graph.initializer}  # before saving: it moves the bytes out
    onnx.save_model(prefill, str(prefill_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=weights, size_threshold=1024)
    stored = onnx.load(str(prefill_path), load_external_data=False)
    where = {t.name: list(t.external_data) for t in stored.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL}
    for t in decode.graph.initializer:
        if t.name in where and t.HasField("raw_data") and digests.get(t.name) == _digest(t):
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.extend(where[t.name])
    rest = sum(t.ByteSize() for t in decode.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    if rest > (1 << 20):  # decode-only weights (folded constants): their own file
        onnx.save_model(decode, str(decode_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(decode_path).name + ".data", size_threshold=1024,
                        convert_attribute=False)
    else:
        with open(decode_path, "wb") as f:
            f.write(decode.SerializeToString())
    assert (folder / weights).exists()
