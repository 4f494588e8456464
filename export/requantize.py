"""`sea-edge quantize`: an fp32 export folder -> a quantized one, with a report.

Schemes:
- int8, int4, nf4: weight-only blockwise, the codes of sea_edge.quantize (bitsandbytes int8 with a linear code / NF4,
  asymmetric int4 with an fp16 scale and min) written by quantize_onnx into every Linear weight of both graphs
  (teacher and SEA estimators); the tied embedding / lm_head in int8.
- dynamic-int8: optimum's ORTQuantizer, dynamic int8 (weights int8, activations quantized at run time) with the
  preset of the target CPU: arm64 (Raspberry Pi, phones, Jetson, Apple), avx2, avx512_vnni (x86); from --target's
  device profile when given, else from this machine.

The custom op and its function body survive (checked); the folder is built beside `out` and renamed when complete.

Report (quantize_report.json in the folder, and printed): size on disk vs fp32; SQNR (dB) of each quantized Linear's
output against fp32 in torch (same codes: sea_edge.quantize), summarised per module kind; mask agreement (share of the
keys the fp32 model keeps that the quantized model keeps too, over every SparseAttention node); perplexity of both on
validation text and its delta; CPU prefill latency of both.
"""

from __future__ import annotations

import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from sea_edge.errors import SeaEdgeError

from .exporter import (
    DECODE,
    MANIFEST,
    PREFILL,
    QUANT_BLOCK,
    WEIGHTS,
    _check_out,
    _replace,
    int4_computes,
    read_manifest,
    session_config,
    sha256_file,
)

__all__ = ["PRESETS", "SCHEMES", "quantize_folder"]

SCHEMES = ("int8", "int4", "nf4", "dynamic-int8")
PRESETS = ("arm64", "avx2", "avx512_vnni")


def _host_preset() -> str:
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"


def preset_for(target: str | None) -> str:
    """The optimum preset for a device profile name (sea_edge.runtime.budget profiles), or this machine's."""
    if target is None:
        return _host_preset()
    from sea_edge.runtime.budget import load_profiles

    profiles = load_profiles()
    if target not in profiles:
        raise SeaEdgeError(f"unknown --target {target!r}: known devices are {', '.join(sorted(profiles))}")
    preset = profiles[target].quant_preset
    if preset not in PRESETS:
        raise SeaEdgeError(f"device {target!r} names preset {preset!r}, not one of {', '.join(PRESETS)}")
    return preset


def quantize_folder(src: Path, out: Path, scheme: str, target: str | None = None, force: bool = False,
                    progress: bool = False, report_tokens: int = 256, accuracy_level: int = 1) -> dict:
    """Quantize the fp32 export in `src` into `out`. Returns the report (also written as quantize_report.json).
    accuracy_level: onnxruntime MatMulNBits' for the weight-only schemes (exporter.ACCURACY_LEVELS: 1 fp32
    activations, 4 int8 activations and ~3-4x faster decode on x86; nf4's MatMulBnb4 has none)."""
    src, out = Path(src), Path(out)
    if scheme not in SCHEMES:
        raise SeaEdgeError(f"unknown --scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    session_config(accuracy_level)  # an unknown level fails here, before any work
    man = read_manifest(src)
    if man.get("quantization", {}).get("scheme", "none") != "none":
        raise SeaEdgeError(f"{src} is already quantized ({man['quantization']['scheme']}): start from an fp32 export")
    if man.get("attention") == "dense":
        raise SeaEdgeError(f"{src} is a dense baseline export: sea-edge quantize takes a SEA export")
    preset = preset_for(target) if scheme == "dynamic-int8" else None
    _check_out(out, force)
    from sea_edge.evaluation import _progress_bar

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with _progress_bar(progress, 3, f"quantize {scheme}") as advance:
            if scheme == "dynamic-int8":
                quant = _dynamic_int8(src, tmp, preset)
            else:
                quant = _weight_only(src, tmp, scheme, accuracy_level)
            for name in man["files"]:  # the tokenizer: what the manifest lists that is not a graph or weights
                if name not in (PREFILL, DECODE, WEIGHTS, MANIFEST) and not name.endswith(".data"):
                    shutil.copy2(src / name, tmp / name)
            advance(1)
            report = _report(src, tmp, scheme, man, quant, report_tokens)
            advance(1)
            from sea_edge.artifacts import atomic_write_json

            atomic_write_json(tmp / "quantize_report.json", report)
            new = dict(man)
            new["quantization"] = quant
            new["opset"] = next(o.version for o in onnx.load(str(tmp / PREFILL), load_external_data=False).opset_import
                                if o.domain in ("", "ai.onnx"))
            new["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                            for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
            new["quantize_report"] = {k: report[k] for k in ("size_ratio", "perplexity", "mask_agreement")}
            atomic_write_json(tmp / MANIFEST, new)
            _replace(tmp, out)
            advance(1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _weight_only(src: Path, tmp: Path, scheme: str, accuracy_level: int) -> dict:
    from .graphs import save_pair
    from .quantize_onnx import embedding_entry, quantize_embedding_pair, quantize_matmul_weights

    block = QUANT_BLOCK[scheme]
    prefill, decode = onnx.load(str(src / PREFILL)), onnx.load(str(src / DECODE))
    from .onnx_ops import attach_functions

    reports = quantize_matmul_weights(prefill, scheme, block, accuracy_level=accuracy_level)
    quantize_matmul_weights(decode, scheme, block, accuracy_level=accuracy_level)
    # the tied table: int8 under every scheme (quantize_onnx.EMBED_BITS says why)
    embed = quantize_embedding_pair(prefill, decode, accuracy_level)
    attach_functions(prefill)  # the default opset may have been raised (blocked DequantizeLinear needs 21)
    attach_functions(decode, row_chunk=None)
    save_pair(prefill, decode, tmp / PREFILL, tmp / DECODE, WEIGHTS)
    if embed is not None:
        reports.append(embed)
    return {"scheme": scheme, "block_size": block, "weights": len(reports),
            "targets": "all Linear layers (teacher and SEA estimators), and the tied embedding / lm_head in int8"
            if embed
            else "all Linear layers (teacher and SEA estimators); the tied embedding / lm_head stays fp32",
            "embedding": embedding_entry(embed, accuracy_level), "accuracy_level": accuracy_level,
            "bytes_before": sum(r.bytes_before for r in reports), "bytes_after": sum(r.bytes_after for r in reports),
            "session_config": session_config(accuracy_level),
            "computes": "com.microsoft.MatMulBnb4 (NF4 dequantized to fp32, then an fp32 GEMM)" if scheme == "nf4"
            else int4_computes(block, accuracy_level) if scheme == "int4"
            else f"DequantizeLinear({scheme}, blocks of {block}) + MatMul; onnxruntime fuses it into MatMulNBits, "
                 + ("fp32 activations at accuracy level 1" if accuracy_level == 1 else
                    f"int8 activations at accuracy level {accuracy_level}") + " (session_config)"}


def _dynamic_int8(src: Path, tmp: Path, preset: str) -> dict:
    """optimum ORTQuantizer (onnxruntime quantize_dynamic underneath) on both graphs, then the SparseAttention
    function re-attached if the quantizer dropped it. Only MatMul / Gemm nodes with a weight are quantized."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from .graphs import save_pair
    from .onnx_ops import ROW_CHUNK, attach_functions

    work = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=".quant-work."))
    graphs = {}
    try:
        for name in (PREFILL, DECODE):
            # only products with a weight: left alone, quantize_dynamic also quantizes activation x activation
            # MatMuls (the Performer's feature products), which is not weight quantization and costs accuracy
            g = onnx.load(str(src / name), load_external_data=False).graph
            inits = {i.name for i in g.initializer}
            nodes = [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
            cfg = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=preset != "arm64",
                                                          nodes_to_quantize=nodes)
            q = ORTQuantizer.from_pretrained(src, file_name=name)
            q.quantize(save_dir=work / name, quantization_config=cfg, use_external_data_format=True)
            out = next((work / name).glob("*.onnx"))
            m = onnx.load(str(out))
            graphs[name] = attach_functions(m, row_chunk=None if name == DECODE else ROW_CHUNK)
        # the quantizer is deterministic: both graphs hold the same quantized weights, stored once
        save_pair(graphs[PREFILL], graphs[DECODE], tmp / PREFILL, tmp / DECODE, WEIGHTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"scheme": "dynamic-int8", "preset": preset, "tool": "optimum ORTQuantizer (dynamic, "
            f"{'per-channel' if cfg.per_channel else 'per-tensor'}, weights {cfg.weights_dtype.name})",
            "computes": "MatMulInteger / DynamicQuantizeLinear: int8 weights, activations quantized per call"}


# -- report --------------------------------------------------------------------------------------------------------

def _session(path: Path, session_config: dict | None):
    from .validate import ort_session

    return ort_session(path, optimize=True, session_config=session_config)


def _with_mask_outputs(path: Path) -> tuple[bytes, int]:
    """The prefill graph with every SparseAttention node's key indices (its 4th input) as extra outputs."""
    m = onnx.load(str(path))
    names = [n.input[3] for n in m.graph.node if n.domain == "sea_edge" and n.op_type == "SparseAttention"]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT32, None) for n in names)
    return m.SerializeToString(), len(names)


def _run(path: Path, session_config, feeds) -> tuple[np.ndarray, list[np.ndarray], float]:
    import onnxruntime as ort

    proto, n = _with_mask_outputs(path / PREFILL)
    so = ort.SessionOptions()
    for k, v in (session_config or {}).items():
        so.add_session_config_entry(k, v)
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
    names = ["logits"] + [o.name for o in sess.get_outputs()][-n:]
    t0 = time.perf_counter()
    outs = sess.run(names, feeds)
    return outs[0], outs[1:], time.perf_counter() - t0


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    lg = logits[:, :-1].astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg).sum(-1))
    picked = np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0]
    return float((lse - picked).mean())


def mask_agreement(ref: list[np.ndarray], ours: list[np.ndarray]) -> float:
    """Mean over rows (layers, batch, heads, tokens) of |kept_ref & kept_ours| / |kept_ref|."""
    hits = total = 0
    for a, b in zip(ref, ours):
        w = a.shape[-1]
        a2, b2 = a.reshape(-1, w).astype(np.int64), b.reshape(-1, w).astype(np.int64)
        # per row set intersection via sorted search (indices are ascending with -1 padding at the end)
        big = np.iinfo(np.int64).max
        bs = np.where(b2 < 0, big, b2)
        pos = np.clip(np.array([np.searchsorted(r, x) for r, x in zip(bs, a2)]), 0, w - 1)
        found = (np.take_along_axis(bs, pos, 1) == a2) & (a2 >= 0)
        hits += int(found.sum())
        total += int((a2 >= 0).sum())
    return hits / max(total, 1)


def _report(src: Path, new: Path, scheme: str, man: dict, quant: dict, tokens: int) -> dict:
    from transformers import AutoTokenizer

    from .onnx_ops import register_schema

    register_schema()
    for name in (PREFILL, DECODE):
        try:
            onnx.checker.check_model(str(new / name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise SeaEdgeError(f"quantized {name} fails the ONNX checker: {str(exc).splitlines()[0]}") from None

    from sea_edge.data import load_corpus, token_windows

    tok = AutoTokenizer.from_pretrained(str(src))
    ids = token_windows(tok, load_corpus("validation"), tokens, max_windows=2).numpy()
    from .validate import _feeds

    feeds = _feeds(ids)
    ref_logits, ref_idx, ref_s = _run(src, None, feeds)
    q_logits, q_idx, q_s = _run(new, quant.get("session_config"), feeds)
    model_files = [n for n in man["files"] if n in (PREFILL, DECODE) or n.endswith(".data")]  # the manifest's, only
    size = lambda d: sum((d / n).stat().st_size for n in model_files)
    nll_ref, nll_q = _nll(ref_logits, ids), _nll(q_logits, ids)
    report = {
        "scheme": scheme, "quantization": quant,
        "size_bytes": {"fp32": size(src), "quantized": size(new)},
        "size_ratio": size(new) / size(src),
        "perplexity": {"fp32": math.exp(nll_ref), "quantized": math.exp(nll_q),
                       "delta": math.exp(nll_q) / math.exp(nll_ref) - 1.0,
                       "text": f"validation split, {ids.shape[0]} windows of {ids.shape[1]} tokens"},
        "top1_agreement": float((q_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "mask_agreement": mask_agreement(ref_idx, q_idx),
        "prefill_seconds": {"fp32": ref_s, "quantized": q_s, "tokens": int(ids.size)},
    }
    if scheme != "dynamic-int8":
        emb = quant.get("embedding") or {}
        report["sqnr_db"] = module_sqnr(man, scheme, ids[:1, :128], emb.get("block_size"))
    return report


def module_sqnr(man: dict, scheme: str, ids: np.ndarray, embed_block: int | None = None) -> dict:
    """SQNR (dB) of each quantized Linear's output against fp32 in torch, module by module: each Linear's fp32
    input (recorded on real text) goes through the fp32 weight and through its quantized twin (the same codes as
    the ONNX file, sea_edge.quantize), so a module's figure is its own error, not the one accumulated upstream.
    Summarised per module kind ("mlp.down_proj", "sea.to_rows", ...): min and mean over layers. With `embed_block`
    (the embedding was quantized, in blocks of that size), the tied lm_head is measured too, as "lm_head".
    min and mean are null where a module's output is exactly the fp32 one (infinite SQNR; "exact" counts them)."""
    import torch

    from sea_edge.estimator_io import apply_estimator
    from sea_edge.quantize import QuantizedLinear
    from sea_edge.teacher import load_teacher
    from sea_edge.testing import sqnr_db

    model, _ = load_teacher(man["source_model"]["name"])
    apply_estimator(model, Path(man["estimator"]["path"]))
    model.eval()
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (id(m.weight) not in tied or embed_block):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, (mod, i[0].detach(),
                                                                                                 o.detach()))))
    with torch.no_grad():
        model(torch.from_numpy(ids), use_cache=False)
        for h in hooks:
            h.remove()
        kinds: dict[str, list[float]] = {}
        for name, (mod, x, y) in seen.items():
            emb = id(mod.weight) in tied  # the lm_head: int8 codes under every scheme
            q = QuantizedLinear.from_linear(mod, "int8" if emb else scheme, embed_block if emb else QUANT_BLOCK[scheme],
                                            name)
            parts = name.split(".")
            kind = ".".join(parts[parts.index("self_attn") + 1:] if "self_attn" in parts else parts[-2:])
            kinds.setdefault(kind, []).append(sqnr_db(q(x), y))
    # a module whose quantized output IS the fp32 one (int4 on Q4_1 GGUF weights) has no finite SQNR: null, and
    # counted under "exact" (JSON has no infinity)
    out = {}
    for k, v in sorted(kinds.items()):
        finite = [x for x in v if math.isfinite(x)]
        out[k] = {"min": min(finite) if len(finite) == len(v) else None,
                  "mean": sum(finite) / len(finite) if len(finite) == len(v) else None,
                  "modules": len(v), "exact": len(v) - len(finite)}
    return out
