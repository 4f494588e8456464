"""sea_edge.export: ONNX export of SEA models (custom op sea_edge::SparseAttention)."""
__all__: list[str] = []
