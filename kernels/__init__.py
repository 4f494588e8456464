"""SEA kernels: sparse attention over per-row key indices and mask construction, Triton on GPU with plain-torch
references (layout in reference.py). Imports nothing else of sea_edge; triton is imported lazily."""

from .op import sparse_attention
from .reference import (
    column_spans,
    expand_columns_ref,
    select_columns_ref,
    sparse_attention_ref,
    sparse_index_ref,
)

__all__ = [
    "sparse_attention",
    "sparse_attention_ref",
    "select_columns_ref",
    "expand_columns_ref",
    "sparse_index_ref",
    "column_spans",
]
