"""sea_edge.runtime: onnxruntime-based runtime (numpy + onnxruntime only)."""
__all__: list[str] = []
