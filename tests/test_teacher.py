"""Teacher loading: the packaged teachers, local Hugging Face folders, and clear errors for everything else."""

from __future__ import annotations

import pytest
import torch

from sea_edge.errors import SeaEdgeError
from sea_edge.teacher import DEFAULT_TEACHER, TEACHERS, TeacherInfo, load_teacher, teacher_info


@pytest.mark.slow
def test_default_teacher_is_smollm2(smollm2):
    model, tok = smollm2
    assert DEFAULT_TEACHER == "smollm2-135m" and set(TEACHERS) == {"smollm2-135m", "minilm-l6"}
    assert teacher_info(model) == TeacherInfo(
        name="smollm2-135m", causal=True, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, max_positions=8192
    )
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    # the dequantized weights are a working language model, not noise
    ids = tok("To be, or not to be, that is the", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tok.decode(next_token) == " question"


@pytest.mark.slow
def test_smollm2_is_causal(smollm2):
    """Changing the last token leaves every earlier position's logits unchanged."""
    model, tok = smollm2
    ids = tok("Now is the winter of our discontent", return_tensors="pt", add_special_tokens=False).input_ids
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % len(tok)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-5)


def test_minilm_is_bidirectional(minilm):
    model, tok = minilm
    info = teacher_info(model)
    assert info == TeacherInfo(
        name="minilm-l6", causal=False, n_layers=6, n_heads=12, n_kv_heads=12, head_dim=32, max_positions=512
    )
    assert type(model).__name__ == "BertModel" and model.config._attn_implementation == "eager"
    assert not model.training
    ids = tok("Now is the winter of our discontent", return_tensors="pt").input_ids
    changed = ids.clone()
    changed[0, -2] = tok.convert_tokens_to_ids("summer")  # the last word, before [SEP]
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert (a[0, 1] - b[0, 1]).abs().max() > 1e-3  # the first word sees the last one


def test_dtype():
    model, _ = load_teacher("minilm-l6", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_cache_hands_out_independent_copies(monkeypatch):
    from sea_edge.teacher import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, "1")
    a, tok_a = load_teacher("minilm-l6")
    with torch.no_grad():
        a.embeddings.word_embeddings.weight.zero_()  # a caller changing its copy
    tok_a.model_max_length = 7
    b, tok_b = load_teacher("minilm-l6")
    monkeypatch.setenv(CACHE_ENV, "0")
    fresh, _ = load_teacher("minilm-l6")
    assert b is not a and tok_b is not tok_a and tok_b.model_max_length != 7
    assert not b.training and b.config._name_or_path == "minilm-l6"
    ref, got = fresh.state_dict(), b.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert got["embeddings.word_embeddings.weight"].abs().sum() > 0


def _save_tokenizer(folder):
    from transformers import AutoTokenizer

    from sea_edge.teacher import _packaged_folder

    AutoTokenizer.from_pretrained(_packaged_folder("minilm-l6")[0]).save_pretrained(folder)


def test_local_causal_lm_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    model, tok = load_teacher(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    info = teacher_info(model)
    assert (info.causal, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.max_positions) == (
        True,
        2,
        6,
        2,
        8,
        256,
    )
    assert tok("hello").input_ids


def test_local_encoder_folder(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    model, _ = load_teacher(str(tmp_path))
    assert type(model).__name__ == "BertModel" and not teacher_info(model).causal


def test_unknown_name():
    with pytest.raises(
        SeaEdgeError,
        match=r"unknown teacher 'gpt-5': not a known name \(smollm2-135m, minilm-l6\) "
        r"and no such path",
    ):
        load_teacher("gpt-5")


def test_missing_path(tmp_path):
    with pytest.raises(SeaEdgeError, match="no such path"):
        load_teacher(str(tmp_path / "nowhere"))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SeaEdgeError, match=r"not a Hugging Face model directory \(no config.json\)"):
        load_teacher(str(tmp_path))


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SeaEdgeError, match=r"no \*.safetensors weights"):
        load_teacher(str(tmp_path))


def test_broken_folder_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SeaEdgeError, match="could not load teacher") as err:
        load_teacher(str(tmp_path))
    assert "\n" not in str(err.value)
