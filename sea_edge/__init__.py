"""sea-edge: export and quantization toolchain for SEA attention on small devices.

Public names are imported lazily so that `import sea_edge` and `sea-edge --help` stay fast (no torch,
transformers or triton at import time).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SEAConfig": "sea_edge.config",
    "SEAAttention": "sea_edge.attention",
    "SEAEstimator": "sea_edge.estimator",
    "to_sea": "sea_edge.patch",
    "to_dense": "sea_edge.patch",
    "load_teacher": "sea_edge.teacher",
    "TEACHERS": "sea_edge.teacher",
    "teacher_info": "sea_edge.teacher",
    "apply_estimator": "sea_edge.estimator_io",
    "save_estimator": "sea_edge.estimator_io",
    "DistillConfig": "sea_edge.distill",
    "distill": "sea_edge.distill",
    "load_corpus": "sea_edge.data",
    "perplexity": "sea_edge.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sea_edge' has no attribute {name!r}")
