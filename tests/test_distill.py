"""Distillation on CPU: the loss falls, a SIGKILLed run resumes bit for bit, bad checkpoints are refused.

To keep CI fast these tests distill a two-layer cut of the real SmolLM2 teacher (its first two decoder layers, real
weights, real tokenizer, real text) instead of all thirty; the training code does not know the difference.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sea_edge.config import SEAConfig
from sea_edge.distill import DistillConfig, distill_model
from sea_edge.errors import SeaEdgeError
from sea_edge.estimator_io import apply_estimator, estimator_state, save_estimator
from sea_edge.patch import to_dense, to_sea

pytestmark = pytest.mark.slow

CFG = dict(steps=6, seq_len=64, batch=2, checkpoint_every=2, max_windows=32, warmup=1, lr=3e-3,
           sea={"k": 8, "compressed_width": 32})


def cut(model, n_layers=2):
    """A copy of `model` keeping its first `n_layers` decoder layers."""
    small = copy.deepcopy(model)
    small.model.layers = torch.nn.ModuleList(list(small.model.layers)[:n_layers])
    small.config.num_hidden_layers = n_layers
    return small


@pytest.fixture(scope="module")
def tiny(smollm2):
    model, tok = smollm2
    return cut(model), tok


def test_loss_falls(tiny, tmp_path):
    model, tok = tiny
    to_dense(model)
    r = distill_model(copy.deepcopy(model), tok, tmp_path / "run", DistillConfig(**{**CFG, "steps": 8}),
                      teacher="smollm2-cut", progress=False)
    losses = [h["loss"] for h in r.history]
    assert len(losses) == 8 and all(map(lambda x: x == x, losses))
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses
    assert (tmp_path / "run" / "estimator.safetensors").exists() and (tmp_path / "run" / "latest.json").exists()


_CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {testdir!r})
    import sea_edge.distill as d
    from sea_edge.teacher import load_teacher
    from test_distill import CFG, cut
    model, tok = load_teacher("smollm2-135m")
    real = d._checkpoint
    def slow_checkpoint(*args, **kwargs):
        real(*args, **kwargs)
        print("checkpoint", args[4], flush=True)
        time.sleep(600)  # the parent kills us here, right after the first checkpoint, mid-run
    d._checkpoint = slow_checkpoint
    d.distill_model(cut(model), tok, {out!r}, d.DistillConfig(**CFG), teacher="smollm2-cut", progress=False)
""")


def test_resume_after_sigkill_is_bit_exact(tiny, tmp_path):
    model, tok = tiny
    to_dense(model)
    killed = tmp_path / "killed"
    # the child computes with as many threads as this process will (tests/conftest.py lowers them while the
    # background export runs): another reduction order would change the weights in their last bits
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(testdir=str(Path(__file__).parent),
                                                                  out=str(killed))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        deadline = time.time() + 300
        line = ""
        while time.time() < deadline and "checkpoint" not in line:
            line = child.stdout.readline()
            if not line and child.poll() is not None:
                break
        assert "checkpoint 2" in line, f"child did not reach its first checkpoint: {line!r}"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert json.loads((killed / "latest.json").read_text())["step"] == 2
    assert not (killed / "estimator.safetensors").exists()  # the killed run never finished

    resumed = copy.deepcopy(model)
    distill_model(resumed, tok, killed, DistillConfig(**CFG), teacher="smollm2-cut", resume=True, progress=False)
    straight = copy.deepcopy(model)
    distill_model(straight, tok, tmp_path / "straight", DistillConfig(**CFG), teacher="smollm2-cut", progress=False)
    a, b = estimator_state(resumed), estimator_state(straight)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_bad_checkpoints_and_outputs(tiny, tmp_path, minilm):
    model, tok = tiny
    to_dense(model)
    with pytest.raises(SeaEdgeError, match="no checkpoint"):
        distill_model(copy.deepcopy(model), tok, tmp_path / "none", DistillConfig(**CFG), teacher="x", resume=True,
                      progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    with pytest.raises(SeaEdgeError, match="not empty"):
        distill_model(copy.deepcopy(model), tok, busy, DistillConfig(**CFG), teacher="x", progress=False)

    # a checkpoint whose weights are corrupt
    run = tmp_path / "run"
    distill_model(copy.deepcopy(model), tok, run, DistillConfig(**{**CFG, "steps": 2}), teacher="x", progress=False)
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    (ckpt / "estimator.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SeaEdgeError, match="corrupt estimator weights"):
        distill_model(copy.deepcopy(model), tok, run, DistillConfig(**{**CFG, "steps": 4}), teacher="x",
                      resume=True, progress=False)
    with pytest.raises(SeaEdgeError, match="made for teacher"):
        distill_model(copy.deepcopy(model), tok, tmp_path / "run", DistillConfig(**CFG), teacher="other",
                      resume=True, progress=False)

    # an estimator made for another model is refused
    est_dir = tmp_path / "est"
    sea = copy.deepcopy(model)
    to_sea(sea)
    save_estimator(sea, est_dir)
    enc, _ = minilm
    with pytest.raises(SeaEdgeError, match="was made for"):
        apply_estimator(enc, est_dir)
    assert not hasattr(enc, "sea_config")


def test_estimator_without_content_term_loads_and_upgrades(tiny, tmp_path):
    """An estimator file written before SEAConfig.key_scores (no such field, no key_weight) loads as it was made;
    asked for the term ({"key_scores": True}, e.g. distill --init OLD --key-scores), it gains it at weight 1."""
    model, _ = tiny
    sea = copy.deepcopy(model)
    to_sea(sea, SEAConfig(k=8, compressed_width=32, key_scores=False))
    old = save_estimator(sea, tmp_path / "old")
    meta = json.loads((old / "estimator.json").read_text())
    del meta["sea_config"]["key_scores"]  # as files from before the field were written
    (old / "estimator.json").write_text(json.dumps(meta))
    apply_estimator(sea, old)
    assert sea.sea_config.key_scores is False
    assert not any(n.endswith("key_weight") for n in estimator_state(sea))
    apply_estimator(sea, old, {"key_scores": True})
    weights = [t for n, t in estimator_state(sea).items() if n.endswith("key_weight")]
    assert len(weights) == 2 and all(torch.equal(w, torch.ones_like(w)) for w in weights)
    before = estimator_state(copy.deepcopy(sea))
    apply_estimator(sea, old)  # the other parameters are the file's in both cases
    after = estimator_state(sea)
    assert all(torch.equal(after[n], before[n]) for n in after)


def test_distill_config_validation():
    with pytest.raises(SeaEdgeError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(SeaEdgeError, match="unknown device"):
        DistillConfig(device="tpu")


def test_embedded_default_estimator_beats_untrained(smollm2):
    """The estimator shipped in the package loads on the default teacher and is far better than an untrained one."""
    from sea_edge.data import load_corpus
    from sea_edge.estimator_io import default_estimator
    from sea_edge.evaluation import perplexity

    model, tok = smollm2
    path = default_estimator("smollm2-135m")
    assert path is not None, "the embedded default estimator is missing from the package"
    text = load_corpus("validation")
    to_dense(model)
    try:
        teacher = perplexity(model, tok, text, 512, max_windows=2).ppl
        to_sea(model, SEAConfig(key_scores=False))
        untrained = perplexity(model, tok, text, 512, max_windows=2).ppl
        to_dense(model)
        to_sea(model)  # untrained, with the content term (weight 1)
        content_only = perplexity(model, tok, text, 512, max_windows=2).ppl
        apply_estimator(model, path)
        assert model.sea_config.k == 64 and model.sea_config.compressed_width == 256 and model.sea_config.key_scores
        distilled = perplexity(model, tok, text, 512, max_windows=2).ppl
    finally:
        to_dense(model)
    print(f"teacher {teacher:.2f} untrained {untrained:.2f} content term only {content_only:.2f} "
          f"shipped {distilled:.2f}")
    assert distilled < 0.5 * untrained and distilled < 0.95 * content_only
    assert distilled < 1.3 * teacher, (teacher, untrained, distilled)
