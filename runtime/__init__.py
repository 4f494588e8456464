"""sea_edge.runtime: run an exported folder with onnxruntime on a device. Imports only numpy, onnxruntime and
tokenizers (no torch, transformers or sea_edge.export: an edge device has none of them); names load on first use.

    from sea_edge.runtime import SeaSession
    s = SeaSession("smollm2-sea")
    print(s.generate("Once upon a time", max_new_tokens=32).text)

device="cuda" splits the graphs at their SparseAttention nodes (segments.py, executor.py): onnxruntime-gpu runs the
segments, the Triton kernel the nodes; torch and triton are imported then, and only then.
"""

import importlib

_LAZY = {
    "SeaSession": "session",
    "RuntimeConfig": "session",
    "GenerationResult": "session",
    "SamplingConfig": "sampling",
    "PerplexityResult": "perplexity",
    "read_folder": "manifest",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
