"""sea_edge.export: ONNX export of SEA models, attention as the custom op sea_edge::SparseAttention (with its
reference decomposition attached as an ONNX function), plus weight quantization of the exported graph.
Heavy imports (torch, onnx, onnxscript) happen on first use of a name."""

import importlib

_LAZY = {
    "ExportConfig": "exporter",
    "ExportResult": "exporter",
    "export": "exporter",
    "read_manifest": "exporter",
    "custom_translation_table": "onnx_ops",
    "register_schema": "onnx_ops",
    "sparse_attention_function": "onnx_ops",
    "quantize_matmul_weights": "quantize_onnx",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
