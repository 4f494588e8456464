"""Smoke test of `python -m sea_edge.kernels.bench --quick` (CPU, TRITON_INTERPRET=1): table, JSON and PNG."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("matplotlib")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke; the GPU bench is a separate program")
def test_bench_quick(tmp_path, capsys):
    from sea_edge.kernels.bench import bench_masks, main

    rows = main(["--quick", "--out", str(tmp_path), "--T", "64", "--k", "16", "--heads", "2/2"])
    assert len(rows) == 2 and all(r["ours_ms"] > 0 and r["cols_ms"] > 0 for r in rows)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["info"]["torch"] == torch.__version__ and len(data["rows"]) == 2
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "cols ms" in capsys.readouterr().out
    idx, K, cols = bench_masks(1, 2, 100, 100, 16, True, "cpu")
    assert idx.shape == (1, 2, 100, 16) and K == 256
    assert ((idx[..., 1:] > idx[..., :-1]) | (idx[..., 1:] < 0)).all()  # ascending, holes at the end
    from sea_edge.kernels import expand_columns_ref

    full = expand_columns_ref(cols, K, 100, True)  # the cols the op gets stand for exactly the idx it gets
    assert torch.equal(full[..., :16], idx) and (full[..., 16:] < 0).all()
