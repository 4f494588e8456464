"""Estimator quality report (KL, mass recall, perplexity grid, plot) and the distill / eval-with-estimator commands."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sea_edge import SEAConfig
from sea_edge.cli import app
from sea_edge.data import load_corpus, token_windows
from sea_edge.estimator_io import save_estimator
from sea_edge.patch import to_dense, to_sea
from sea_edge.quality import QualityConfig, estimator_quality, layer_quality, plot_quality, quality_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(smollm2):
    from test_distill import cut

    model, tok = smollm2
    return cut(model), tok


def test_mass_recall_is_one_when_every_key_is_kept(tiny):
    model, tok = tiny
    ids = token_windows(tok, load_corpus("validation"), 96, max_windows=1)
    to_sea(model, SEAConfig(k=10**6))
    try:
        full = layer_quality(model, ids)
        to_dense(model)
        to_sea(model, SEAConfig(k=2, compressed_width=32))
        sparse = layer_quality(model, ids)
    finally:
        to_dense(model)
    assert all(abs(r["mass_recall"] - 1.0) < 1e-5 and abs(r["oracle_recall"] - 1.0) < 1e-5 for r in full)
    assert all(0.0 < r["mass_recall"] < 0.999 for r in sparse)  # 2 keys per query cannot hold all the mass
    # the oracle (the teacher's own compressed attention through the same mask) is the ceiling: an untrained
    # estimate recalls less, and the best two-key columns still cannot hold everything
    assert all(r["mass_recall"] < r["oracle_recall"] < 0.999 for r in sparse)
    assert all(r["kl"] >= 0 for r in full + sparse)


def test_quality_report_and_plot(tiny, tmp_path):
    model, tok = tiny
    to_sea(model, SEAConfig(k=8, compressed_width=32))
    save_estimator(model, tmp_path / "est")
    to_dense(model)
    cfg = QualityConfig(seq_lens=(64, 128), ks=(8, 64), max_windows=1, probe_len=64, probe_k=8)
    report = estimator_quality(model, tok, tmp_path / "est", cfg, progress=False)
    assert set(report["teacher"]) == {"64", "128"} and set(report["sea"]) == {"8", "64"}
    assert len(report["layers"]) == 2 and 0 < report["mean_mass_recall"] <= report["mean_oracle_recall"] <= 1
    # a larger budget can only help an untrained estimator this much: more keys, closer to the teacher
    assert report["sea"]["64"]["128"] < report["sea"]["8"]["128"]
    assert "teacher" in quality_table(report)
    plot_quality(report, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not hasattr(model, "sea_config")  # the report leaves the teacher dense


def test_distill_then_eval_commands(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["distill", "--out", str(out), "--steps", "2", "--seq-len", "32", "--batch", "1", "--max-windows", "4",
            "--checkpoint-every", "1", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "distilled 2 steps" in r.output
    meta = json.loads((out / "estimator.json").read_text())
    assert meta["provenance"]["steps"] == 2 and meta["sea_config"]["k"] == 64
    r = runner.invoke(app, args)  # same folder again without --resume: refused, nothing overwritten
    assert r.exit_code == 1 and "not empty" in r.output
    r = runner.invoke(app, [*args[:4], "3", *args[5:], "--resume"])  # one more step from the last checkpoint
    assert r.exit_code == 0, r.output
    assert json.loads((out / "estimator.json").read_text())["provenance"]["steps"] == 3
    r = runner.invoke(app, ["eval", "--estimator", str(out), "--k", "16", "--seq-len", "32", "--max-windows", "1",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "SEA" in r.output and "k=16" in r.output and "perplexity" in r.output
    r = runner.invoke(app, ["eval", "--estimator", str(tmp_path / "missing"), "--no-progress"])
    assert r.exit_code == 1 and "no estimator" in r.output
    r = runner.invoke(app, ["distill", "--out", str(tmp_path / "x"), "--device", "tpu"])
    assert r.exit_code == 2  # typer rejects the choice itself


def test_untrained_estimator_is_deterministic(tiny):
    """Same SEAConfig, same initial estimator (the seed alone decides), whatever the global RNG did before."""
    model, _ = tiny
    to_sea(model, SEAConfig(seed=3))
    a = [p.detach().clone() for p in model.model.layers[0].self_attn.sea.parameters()]
    to_dense(model)
    torch.manual_seed(12345)
    torch.rand(100)
    to_sea(model, SEAConfig(seed=3))
    b = [p.detach() for p in model.model.layers[0].self_attn.sea.parameters()]
    to_dense(model)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
