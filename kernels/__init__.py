"""SEA kernels: sparse attention over per-row key indices and mask construction, Triton on GPU with plain-torch
references (layout in reference.py). Imports nothing else of sea_edge; triton is imported lazily: the Triton
functions below load kernels/triton_sparse_attention.py or kernels/mask.py (and triton) on first use."""

if __name__ != "sea_edge.kernels":
    # Importable only through the `sea_edge` mapping. From the repository root this folder is also visible as a
    # top-level `kernels`, which transformers imports when it probes for the Hugging Face `kernels` package; running
    # op.py a second time under that name would register `sea_edge::sparse_attention` twice and break it.
    raise ImportError(f"sea-edge's kernels are imported as sea_edge.kernels, not as {__name__!r}")

from .op import column_scores, select_columns_op, sparse_attention, sparse_attention_cols, sparse_index_op
from .reference import (
    causal_linear_attention_ref,
    check_attention_shapes,
    column_scores_bwd_ref,
    column_scores_ref,
    column_spans,
    decoder_ref,
    encoder_ref,
    mix_output_ref,
    expand_columns_ref,
    performer_features_ref,
    performer_causal_ref,
    performer_kv_ref,
    performer_query_ref,
    performer_values,
    row_columns,
    select_columns_ref,
    sparse_attention_bwd_ref,
    sparse_attention_cols_ref,
    sparse_attention_ref,
    sparse_index_ref,
)

_LAZY = {
    "column_scores_triton": "triton_column_scores",
    "decoder_triton": "triton_decoder",
    "encoder_triton": "triton_encoder",
    "mix_output_triton": "triton_mix",
    "performer_query_triton": "triton_performer",
    "performer_causal_triton": "triton_performer",
    "performer_kv_triton": "triton_performer",
    "select_columns": "mask",
    "expand_columns": "mask",
    "sparse_index": "mask",
    "sparse_attention_triton": "triton_sparse_attention",
    "sparse_attention_triton_bwd": "triton_sparse_attention",
    "sparse_attention_plan": "triton_sparse_attention",
    "sparse_attention_cols_plan": "triton_sparse_attention",
    "sparse_attention_cols_triton": "triton_sparse_attention",
    "sparse_attention_cols_triton_bwd": "triton_sparse_attention",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "column_scores",
    "column_scores_bwd_ref",
    "column_scores_ref",
    "column_scores_triton",
    "column_spans",
    "decoder_ref",
    "decoder_triton",
    "encoder_ref",
    "encoder_triton",
    "mix_output_ref",
    "mix_output_triton",
    "performer_features_ref",
    "performer_query_ref",
    "performer_query_triton",
    "performer_causal_ref",
    "performer_causal_triton",
    "performer_kv_ref",
    "performer_kv_triton",
    "performer_values",
    "causal_linear_attention_ref",
    "expand_columns",
    "expand_columns_ref",
    "select_columns",
    "row_columns",
    "select_columns_ref",
    "sparse_attention",
    "sparse_attention_plan",
    "sparse_attention_ref",
    "sparse_attention_bwd_ref",
    "sparse_attention_cols",
    "sparse_attention_cols_plan",
    "sparse_attention_cols_ref",
    "sparse_attention_cols_triton",
    "sparse_attention_cols_triton_bwd",
    "select_columns_op",
    "check_attention_shapes",
    "sparse_attention_triton",
    "sparse_attention_triton_bwd",
    "sparse_index",
    "sparse_index_ref",
    "sparse_index_op",
]
