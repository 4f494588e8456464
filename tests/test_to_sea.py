"""to_sea / to_dense on the real teachers (SmolLM2-135M causal with GQA, MiniLM-L6 bidirectional) and real text."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sea_edge import SEAConfig, to_dense, to_sea
from sea_edge.data import load_corpus, token_windows
from sea_edge.errors import SeaEdgeError
from sea_edge.patch import is_sea, recording

pytestmark = pytest.mark.slow


@pytest.fixture
def sea_smollm2(smollm2):
    """The session's SmolLM2, handed out dense and always returned dense, whatever the test did."""
    model, tok = smollm2
    to_dense(model)
    yield model, tok
    to_dense(model)


def _text_ids(tok, seq_len, n=1):
    return token_windows(tok, load_corpus("validation"), seq_len, max_windows=n)


def test_full_budget_reproduces_teacher_logits(sea_smollm2):
    model, tok = sea_smollm2
    ids = _text_ids(tok, 256)
    with torch.no_grad():
        ref = model(ids).logits
        to_sea(model, SEAConfig(k=10**6, mix=False))
        out = model(ids).logits
    assert (out - ref).abs().max().item() < 1e-3
    to_dense(model)
    with torch.no_grad():
        back = model(ids).logits
    assert torch.equal(back, ref), "to_dense must restore the teacher exactly"


def test_full_budget_with_left_padding(sea_smollm2):
    """A padded batch: SEA never selects padding keys, so at full budget it matches the dense teacher's masking."""
    model, tok = sea_smollm2
    ids = _text_ids(tok, 96, n=2)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    ids = ids.clone()
    ids[1, :30] = tok.pad_token_id or 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        to_sea(model, SEAConfig(k=10**6, mix=False))
        out = model(ids, attention_mask=mask).logits
    assert (out[0] - ref[0]).abs().max().item() < 1e-3
    assert (out[1, 30:] - ref[1, 30:]).abs().max().item() < 1e-3


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_default_budget_2048_tokens_has_no_quadratic_tensor(sea_smollm2):
    """SEA mode never materializes a (T x S) tensor: at T = S = 2048 no op output has two dimensions of 2048."""
    model, tok = sea_smollm2
    ids = _text_ids(tok, 2048)
    to_sea(model, SEAConfig())
    rec = _ShapeRecorder()
    with torch.no_grad(), rec:
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert len(rec.shapes) > 1000  # the recorder really saw the forward
    quadratic = [(f, s) for f, s in rec.shapes if sum(d == 2048 for d in s) >= 2]
    assert not quadratic, f"quadratic tensors: {quadratic[:5]}"
    # the dense model does build one (the recorder would catch it)
    to_dense(model)
    rec = _ShapeRecorder()
    with torch.no_grad(), rec:
        model(ids[:, :2048])
    assert any(sum(d == 2048 for d in s) >= 2 for _, s in rec.shapes)


def test_causality_on_the_model(sea_smollm2):
    model, tok = sea_smollm2
    ids = _text_ids(tok, 200)
    t = 90
    other = ids.clone()
    other[:, t + 1 :] = torch.randint(100, 30000, (1, 200 - t - 1), generator=torch.Generator().manual_seed(0))
    to_sea(model, SEAConfig(k=16))
    with torch.no_grad(), recording(model) as layers:
        a = model(ids).logits
        idx_a = [m.sea_state.idx.clone() for m in layers]
        b = model(other).logits
        idx_b = [m.sea_state.idx for m in layers]
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=0)
    assert all(torch.equal(x[:, :, : t + 1], y[:, :, : t + 1]) for x, y in zip(idx_a, idx_b))
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_gqa_layers_and_budget_recorded(sea_smollm2):
    model, tok = sea_smollm2
    ids = _text_ids(tok, 512)
    to_sea(model, SEAConfig())
    assert model.sea_config.compressed_width == 256 and model.sea_config.causal
    with torch.no_grad(), recording(model) as layers:
        model(ids)
        assert len(layers) == 30
        idx = layers[0].sea_state.idx
    assert idx.shape[:3] == (1, 9, 512)  # one key list per query head (9), keys from 3 kv heads
    keys_per_token = (idx >= 0).sum(dim=(1, 3))
    assert (keys_per_token <= 9 * 64).all() and keys_per_token.float().mean() > 9 * 64 * 0.5


def test_encoder_full_budget_matches(minilm):
    model, tok = minilm
    batch = tok(["To be, or not to be, that is the question.",
                 "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        to_sea(model, SEAConfig(k=10**6, mix=False))
        try:
            assert not model.sea_config.causal and model.sea_config.compressed_width == 128
            out = model(**batch).last_hidden_state
        finally:
            to_dense(model)
    valid = batch["attention_mask"].bool()
    assert (out - ref)[valid].abs().max().item() < 1e-4
    with torch.no_grad():
        to_sea(model, SEAConfig())
        try:
            sparse = model(**batch).last_hidden_state
        finally:
            to_dense(model)
    assert torch.isfinite(sparse).all()


def test_bad_models(sea_smollm2):
    model, _ = sea_smollm2
    to_sea(model)
    with pytest.raises(SeaEdgeError, match="already in SEA mode"):
        to_sea(model)
    to_dense(model)
    assert not is_sea(model)
    with pytest.raises(SeaEdgeError, match="does not know how to patch"):
        to_sea(torch.nn.Sequential(torch.nn.Linear(2, 2)))
