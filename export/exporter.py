"""`sea-edge export`: teacher + estimator -> one folder a device can run.

    DIR/model.onnx        prefill graph (causal LM) or the encoder graph
    DIR/decode.onnx       decode step with KV cache and SEA state (causal LM only)
    DIR/model.onnx.data   weights, shared by both graphs (external data: one copy on disk)
    DIR/sea_edge.json     manifest: source model, SEAConfig, quantization, opset, io, files (size, sha256), versions,
                          validation figures
    DIR/tokenizer*.json   the tokenizer files

The folder is built in a temporary folder beside DIR and renamed into place only after validation passed, so a
failed or interrupted export never leaves a DIR that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sea_edge.runtime.manifest import sha256_file  # one implementation: the runtime verifies what export hashed

from sea_edge.errors import SeaEdgeError

__all__ = ["FORMAT", "MANIFEST", "QUANT_SCHEMES", "ExportConfig", "ExportResult", "export", "sha256_file"]

MANIFEST, FORMAT = "sea_edge.json", "sea-edge-model/1"
PREFILL, DECODE, WEIGHTS = "model.onnx", "decode.onnx", "model.onnx.data"
QUANT_SCHEMES = ("none", "int8", "int4", "nf4")


@dataclass
class ExportConfig:
    """What to export and how. Defaults: the default teacher with its embedded estimator, fp32, opset 18."""

    out: Path
    model: str = "smollm2-135m"
    """Teacher name or local Hugging Face folder."""
    estimator: str = "default"
    """Estimator folder, or "default": the one embedded in the package for the teacher."""
    quant: str = "none"
    """Weight quantization of the exported model: none, int8, int4, nf4 (see sea_edge.export.quantize_onnx)."""
    opset: int = 18
    """ONNX opset of the default domain: 18 runs on every onnxruntime >= 1.16 (blocked int4/int8 weights need 21)."""
    force: bool = False
    """Replace an existing non-empty `out`."""
    validate_tokens: int = 256
    """Tokens per validation window (real validation text), two windows."""
    min_agreement: float = 0.99
    """Export fails when ONNX Runtime's top-1 prediction agrees with torch's on fewer tokens than this."""

    def __post_init__(self):
        self.out = Path(self.out)
        if self.quant not in QUANT_SCHEMES:
            raise SeaEdgeError(f"unknown --quant {self.quant!r}: choose one of {', '.join(QUANT_SCHEMES)}")
        if not 7 <= self.opset <= 23:
            raise SeaEdgeError(f"--opset must be between 7 and 23, got {self.opset}")
        if self.validate_tokens < 96:
            raise SeaEdgeError(f"validate_tokens must be >= 96 (64 prefill + 32 decode steps), got "
                               f"{self.validate_tokens}")


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    seconds: float
    validation: dict = field(default_factory=dict)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an existing non-empty folder (unless force) or one we cannot write, before any work is done."""
    if out.exists() and not out.is_dir():
        raise SeaEdgeError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise SeaEdgeError(f"--out {out} exists and is not empty (use --force to replace it)")
    probe = out.parent if str(out.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    try:  # a real attempt: permission bits do not tell root (or read-only mounts, /proc) the truth
        if not probe.is_dir():
            raise NotADirectoryError(probe)
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".sea-edge-probe."))
    except OSError:
        raise SeaEdgeError(f"--out {out}: cannot create a folder in {probe}") from None


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("sea-edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def export(config: ExportConfig, progress: bool = False) -> ExportResult:
    """Run the main pipeline (load, export, quantize, validate, write); see the module docstring."""
    _check_out(config.out, config.force)
    from sea_edge.estimator_io import load_estimator_file
    from sea_edge.evaluation import _progress_bar

    est_dir = _estimator_dir(config)
    est_meta, _ = load_estimator_file(est_dir)  # a missing or corrupt estimator fails here, before any work
    t0 = time.time()
    steps = ["load teacher + estimator", "export prefill graph", "export decode graph", "write", "validate"]
    with _progress_bar(progress, len(steps), "export") as advance:
        model, tok = _load(config, est_dir)
        advance(1)
        from . import graphs

        causal = bool(model.sea_config.causal)
        if causal:
            prefill = graphs.export_prefill(model, config.opset)
            graphs.add_logits_to_keep(prefill)
            advance(1)
            decode = graphs.export_decode(model, config.opset)
        else:  # an encoder: one graph
            prefill, decode = graphs.export_encoder(model, config.opset), None
            advance(1)
        advance(1)
        parent = config.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{config.out.name}.", suffix=".tmp"))
        try:
            if not causal and config.quant != "none":
                raise SeaEdgeError("--quant: only causal LMs are quantized at export (sea-edge quantize too)")
            quant = _quantize(model, prefill, decode, config.quant)
            if causal:
                graphs.save_pair(prefill, decode, tmp / PREFILL, tmp / DECODE, WEIGHTS)
            else:
                graphs.save_one(prefill, tmp / PREFILL, WEIGHTS)
            del prefill, decode
            tok.save_pretrained(str(tmp))
            advance(1)
            from . import validate as val

            if causal:
                validation = val.validate_folder(tmp, model, tok, config.validate_tokens, config.min_agreement,
                                                 quant.get("session_config"))
            else:
                validation = val.validate_encoder(tmp, model, tok, config.validate_tokens)
            advance(1)
            manifest = _manifest(config, model, tmp, est_dir, est_meta, quant, validation)
            from sea_edge.artifacts import atomic_write_json

            atomic_write_json(tmp / MANIFEST, manifest)
            _replace(tmp, config.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExportResult(config.out, manifest, time.time() - t0, validation)


QUANT_BLOCK = {"int8": 256, "int4": 32, "nf4": 64}
"""Block sizes (weights per scale along the reduction dim): the sea_edge.quantize configs' defaults."""
ACCURACY_LEVELS = (1, 4)
"""onnxruntime MatMulNBits accuracy levels a weight-only export may ask for. 1: fp32 activations (the default: the
quality targets); 4: activations quantized to int8 per block, onnxruntime's fast CPU path. Measured on the default
model, int8, 2 cores: decode 7.6 tok/s at level 1 vs 29.0 at level 4 (fp32 export: 23.7), perplexity +1.0% vs +2.4%
over fp32 (4 validation windows of 512 tokens)."""


def int4_computes(block: int, accuracy_level: int) -> str:
    """The manifest's `computes` for int4 (sea_edge.export.quantize_onnx's rewrite)."""
    acts = "fp32" if accuracy_level == 1 else "int8"
    return (f"com.microsoft.MatMulNBits (4-bit codes times an fp16 scale per block of {block}, {acts} activations at "
            f"accuracy level {accuracy_level}) + an fp32 MatMul of the block sums with the fp16 block mins "
            "(q * scale + min, GGUF Q4_1's grid; scales and mins cast to fp32 at load)")


def session_config(accuracy_level: int = 1) -> dict:
    """The manifest's quantization.session_config for a weight-only scheme at this MatMulNBits accuracy level."""
    if accuracy_level not in ACCURACY_LEVELS:
        levels = ", ".join(map(str, ACCURACY_LEVELS))
        raise SeaEdgeError(f"unknown accuracy level {accuracy_level}: choose one of {levels}")
    return {"session.qdq_matmulnbits_accuracy_level": str(accuracy_level)}
"""onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits, whose default accuracy level 4 also quantizes the
activations to int8; level 1 keeps them fp32, so the device computes what validation checked (the runtime applies
the manifest's session_config)."""


def _quantize(model, prefill, decode, scheme: str) -> dict:
    """Quantize every Linear of `model` (teacher and estimators) in torch with sea_edge.quantize, and write the very
    same codes into both graphs; the tied embedding / lm_head gets int8 codes in both (quantize_onnx.
    quantize_embedding_pair; in torch its weight becomes their dequantized values, one fp32 product each, which is
    what GatherBlockQuantized computes). The torch model, now quantized, is then the reference validation compares
    with."""
    if scheme == "none":
        return {"scheme": "none"}
    import torch

    from sea_edge.quantize import (BnbInt8Config, BnbNF4Config, Int4Config, dequantize_weight, quantize_,
                                   quantize_weight, quantized_state)

    from .quantize_onnx import embedding_entry, quantize_embedding_pair, quantize_matmul_weights

    block = QUANT_BLOCK[scheme]
    cfg = {"int8": BnbInt8Config, "int4": Int4Config, "nf4": BnbNF4Config}[scheme](block_size=block, target="all")
    quantize_(model, cfg)
    # the export wrappers hold the decoder's layers as `layers`: drop transformers' "model." prefix
    state = {k.removeprefix("model."): v for k, v in quantized_state(model).items()}
    from .onnx_ops import attach_functions

    reports = quantize_matmul_weights(prefill, scheme, block, weights=state)
    quantize_matmul_weights(decode, scheme, block, weights=state)
    embed = quantize_embedding_pair(prefill, decode)
    if embed is not None:
        table = model.get_input_embeddings().weight
        with torch.no_grad():
            codes, scales, _ = quantize_weight(table, "int8", embed.block_size, embed.name)
            table.copy_(dequantize_weight(codes, scales, "int8", embed.block_size, tuple(table.shape)))
        reports.append(embed)
    attach_functions(prefill)  # the default opset may have been raised (blocked DequantizeLinear needs 21)
    attach_functions(decode, row_chunk=None)
    before = sum(r.bytes_before for r in reports)
    after = sum(r.bytes_after for r in reports)
    return {"scheme": scheme, "block_size": block, "targets": "all Linear layers (teacher and SEA estimators)" + (
            ", and the tied embedding / lm_head in int8" if embed else "; the tied embedding / lm_head stays fp32"),
            "embedding": embedding_entry(embed), "weights": len(reports), "bytes_before": before,
            "bytes_after": after, "session_config": session_config(1),
            "computes": {"int8": "DequantizeLinear(int8, blocked) + MatMul; onnxruntime fuses it into MatMulNBits, "
                                 "fp32 activations at accuracy level 1",
                         "int4": int4_computes(block, 1),
                         "nf4": "com.microsoft.MatMulBnb4 (dequantizes NF4 to fp32, then an fp32 GEMM)"}[scheme]}


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old `out` (only with --force) is removed after the swap. The
    temporary folder was private (0700); the result gets the usual permissions (umask)."""
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    for p in tmp.iterdir():
        p.chmod(0o666 & ~mask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _estimator_dir(config: ExportConfig) -> Path:
    from sea_edge.estimator_io import resolve_estimator

    if config.estimator == "default":
        return resolve_estimator(config.model, "default")
    est_dir = Path(config.estimator)
    if not est_dir.exists():
        raise SeaEdgeError(f"--estimator {est_dir} does not exist")
    return est_dir


def _load(config: ExportConfig, est_dir: Path):
    from sea_edge.estimator_io import apply_estimator
    from sea_edge.teacher import load_teacher

    model, tok = load_teacher(config.model)
    apply_estimator(model, est_dir)  # refuses an estimator made for another model
    model.eval()
    return model, tok


def _manifest(config, model, folder: Path, est_dir: Path, est_meta: dict, quant: dict, validation: dict) -> dict:
    import onnx

    from sea_edge.teacher import teacher_info

    from . import graphs

    info = teacher_info(model)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": {"name": config.model, **info.asdict(), **graphs.model_dims(model)},
        "sea_config": model.sea_config.to_dict(),
        "estimator": {"path": str(est_dir), "meta": {k: v for k, v in est_meta.items() if k != "sea_config"}},
        "quantization": quant,
        "opset": next(o.version for o in onnx.load(str(folder / PREFILL), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")),
        "graphs": graphs.graph_manifest(model) if model.sea_config.causal else graphs.encoder_manifest(model),
        "files": files,
        "versions": _versions(),
        "validation": validation,
    }


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise SeaEdgeError(f"{folder} is not a sea-edge export: no {MANIFEST}")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SeaEdgeError(f"corrupt manifest {path}: {exc}") from None
    if man.get("format") != FORMAT:
        raise SeaEdgeError(f"{path}: unknown format {man.get('format')!r} (expected {FORMAT})")
    return man

