"""onnxruntime bugs that the runtime (and the export's validation, which opens sessions the same way) works around,
by version, each with what was measured.

- MatmulTransposeFusion, an "extended" graph optimization, turns every logit of the exported default into NaN in
  onnxruntime 1.30.0 and 1.31.1 (CPU provider, the whole graph with SparseAttention's function body inlined; found
  by disabling the optimizers half at a time); 1.32.0 gives the right logits with it. The GPU machine's
  onnxruntime is 1.30 (CPU) and 1.31.1 (onnxruntime-gpu), so it is disabled below 1.32.
"""

from __future__ import annotations

import re

__all__ = ["disabled_optimizers"]

_FIXED_IN = {"MatmulTransposeFusion": (1, 32)}


def disabled_optimizers(ort) -> list[str]:
    """The graph optimizers to turn off in this onnxruntime (InferenceSession(..., disabled_optimizers=...))."""
    parts = [int(x) for x in re.findall(r"\d+", ort.__version__)[:2]]
    version = tuple(parts + [0] * (2 - len(parts)))
    return [name for name, fixed in _FIXED_IN.items() if version < fixed]
