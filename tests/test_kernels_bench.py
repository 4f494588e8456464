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


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [64, 128, 256])
def test_flex_blocks_plan_is_the_plan_of_its_keys(k, causal):
    """The plan over Flex's key blocks (the bench's same-mask comparison) is the plan of the keys those blocks hold,
    and the kernel on it is the reference on those keys."""
    from sea_edge.kernels import sparse_attention_ref
    from sea_edge.kernels.bench import flex_blocks, flex_blocks_plan
    from sea_edge.kernels.triton_sparse_attention import sparse_attention_plan, sparse_attention_triton

    T = S = 300  # 3 query blocks of 128, the last one cut; key blocks cut by S
    B, H, D = 1, 2, 16
    num, order, QB, KB = flex_blocks(B, H, T, S, k, causal, "cpu", seed=3)
    keep = torch.zeros(B, H, T, S, dtype=torch.bool)
    for h in range(H):
        for t in range(T):
            for kb in order[0, h, t // QB, : num[0, h, t // QB]].tolist():
                keep[0, h, t, kb * KB : (kb + 1) * KB] = True
    keys = torch.where(keep, torch.arange(S), S).sort(-1).values
    idx = torch.where(keys >= S, -1, keys)[..., : int(keep.sum(-1).max())].to(torch.int32).contiguous()
    for bm in (64, 128):
        plan, want = flex_blocks_plan(num, order, QB, KB, T, S, bm), sparse_attention_plan(idx, S, bm)
        assert torch.equal(plan.cnt, want.cnt)
        live = torch.arange(plan.cap) < plan.cnt[..., None]
        assert torch.equal(plan.blk[..., : want.cap][live[..., : want.cap]], want.blk[..., : plan.cap][live])
        assert torch.equal(plan.bits[live], want.bits[..., : plan.cap, :][live])
    g = torch.Generator().manual_seed(k)
    q, kk, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    out = sparse_attention_triton(q, kk, v, idx, 0.25, plan=flex_blocks_plan(num, order, QB, KB, T, S))
    torch.testing.assert_close(out, sparse_attention_ref(q, kk, v, idx, 0.25), rtol=1e-5, atol=1e-5)
