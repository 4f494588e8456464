"""Swap a teacher's attention layers for SEA attention (keeping the teacher's weights) and back.

Llama-family models (Llama, SmolLM2, Mistral, Qwen2: any model whose attention calls transformers' attention
interface with RoPE'd q, k, v and grouped-query heads) get SEA through a registered attention function "sea" plus a
mask function that passes on only the (B, S) padding mask, so no (T x S) mask is built either. BERT-family encoders
get their self-attention module wrapped. Each attention module receives a `sea` submodule: its estimator, whose
weights are what distillation trains and what an estimator file stores.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .attention import sea_attention
from .config import SEAConfig
from .errors import SeaEdgeError
from .estimator import SEAEstimator

__all__ = ["to_sea", "to_dense", "sea_layers", "dense_attention", "recording", "is_sea"]

_IMPL = "sea"


def _sea_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention-interface entry: q (B, H, T, D), k/v (B, Hkv, S, D), attention_mask (B, S) bool."""
    key_valid = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    out, state = sea_attention(module.sea, query, key, value, scaling, key_valid, record=module.sea_record)
    module.sea_state = state
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D), no attention weights


def _padding_only_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None,
                       attention_mask=None, **kwargs):
    """Mask function for "sea": the (B, S) bool padding mask or None; causality is part of SEA's mask itself."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(attention_mask.all()) else attention_mask


def _register_interface():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_IMPL, _sea_attention_forward)
    AttentionMaskInterface.register(_IMPL, _padding_only_mask)


class SEABertSelfAttention(nn.Module):
    """Drop-in for BertSelfAttention: the teacher's query/key/value Linears, SEA instead of the dense softmax."""

    def __init__(self, dense: nn.Module, estimator: SEAEstimator):
        super().__init__()
        self.dense = dense  # the original module: its weights, and the way back
        self.sea = estimator
        self.sea_record = False
        self.sea_state = None

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        d = self.dense
        B, T, _ = hidden_states.shape
        heads, D = d.num_attention_heads, d.attention_head_size

        def split(x):
            return x.view(B, T, heads, D).transpose(1, 2)  # (B, H, T, D)

        q, k, v = split(d.query(hidden_states)), split(d.key(hidden_states)), split(d.value(hidden_states))
        key_valid = None
        if attention_mask is not None:  # BERT's extended additive mask (B, 1, 1, S): 0 keep, very negative drop
            key_valid = attention_mask[:, 0, 0, :] > torch.finfo(attention_mask.dtype).min / 2
            if not torch.compiler.is_exporting():  # a graph keeps the mask: no data-dependent branch
                key_valid = None if bool(key_valid.all()) else key_valid
        out, self.sea_state = sea_attention(self.sea, q, k, v, D**-0.5, key_valid, record=self.sea_record)
        return out.transpose(1, 2).reshape(B, T, heads * D), None


def _llama_attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "layer_idx", "head_dim"))]


def _bert_attentions(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(parent, self-attention) pairs of BERT-family layers."""
    out = []
    for m in model.modules():
        s = getattr(m, "self", None)
        if isinstance(s, nn.Module) and all(hasattr(s, a) for a in ("query", "key", "value", "num_attention_heads")):
            out.append((m, s))
    return out


def sea_layers(model: nn.Module) -> list[nn.Module]:
    """The modules carrying a `sea` estimator, in layer order."""
    return [m for m in model.modules() if isinstance(getattr(m, "sea", None), SEAEstimator)]


def is_sea(model: nn.Module) -> bool:
    return bool(sea_layers(model))


def to_sea(model: nn.Module, config: SEAConfig | None = None) -> nn.Module:
    """Replace every attention layer of `model` (in place) by SEA attention built on the teacher's own q, k, v.

    The estimators start from initial weights drawn from `config.seed` alone (the global RNG is left untouched),
    so the same config always gives the same untrained model. Load distilled weights with
    `sea_edge.estimator_io.apply_estimator`. Returns the model; SeaEdgeError for a model family SEA does not know.
    """
    config = config or SEAConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _to_sea(model, config)


def _to_sea(model: nn.Module, config: SEAConfig) -> nn.Module:
    if is_sea(model):
        raise SeaEdgeError("model is already in SEA mode (call sea_edge.to_dense first)")
    mcfg = getattr(model, "config", None)
    if mcfg is None:
        raise SeaEdgeError(f"SEA does not know how to patch {type(model).__name__}: it is not a transformers model")
    max_pos = int(getattr(mcfg, "max_position_embeddings", 0) or 0)
    llama = _llama_attentions(model)
    if llama:
        n_heads = mcfg.num_attention_heads
        head_dim = llama[0].head_dim
        cfg = config.resolve(causal=True, head_dim=head_dim)
        _register_interface()
        for m in llama:
            m.sea = SEAEstimator(cfg, head_dim, n_heads, max_pos or 8192).to(m.q_proj.weight.device)
            m.sea_record, m.sea_state = False, None
        model._sea_dense_impl = mcfg._attn_implementation
        mcfg._attn_implementation = _IMPL
        model.sea_config = cfg
        return model
    bert = _bert_attentions(model)
    if bert:
        s0 = bert[0][1]
        head_dim, n_heads = s0.attention_head_size, s0.num_attention_heads
        cfg = config.resolve(causal=False, head_dim=head_dim)
        for parent, s in bert:
            est = SEAEstimator(cfg, head_dim, n_heads, max_pos or 512).to(s.query.weight.device)
            parent.self = SEABertSelfAttention(s, est)
        model.sea_config = cfg
        return model
    raise SeaEdgeError(f"SEA does not know how to patch {type(model).__name__}: expected a Llama-family decoder "
                       "(q_proj/k_proj/v_proj/o_proj attention) or a BERT-family encoder")


def to_dense(model: nn.Module) -> nn.Module:
    """Undo `to_sea` (in place): the teacher's dense attention again, estimators removed. Returns the model."""
    if not is_sea(model):
        return model
    for m in list(model.modules()):
        s = getattr(m, "self", None)
        if isinstance(s, SEABertSelfAttention):
            m.self = s.dense
    for m in _llama_attentions(model):
        for a in ("sea", "sea_record", "sea_state"):
            if hasattr(m, a):
                delattr(m, a)
    if hasattr(model, "_sea_dense_impl"):
        model.config._attn_implementation = model._sea_dense_impl
        del model._sea_dense_impl
    if hasattr(model, "sea_config"):
        del model.sea_config
    return model


@contextmanager
def dense_attention(model: nn.Module):
    """Run a SEA model with the teacher's dense (eager) attention for the duration, estimators kept: the
    teacher's targets for distillation come from the very same weights. Only Llama-family models need it."""
    impl = getattr(model, "_sea_dense_impl", None)
    if impl is None:
        raise SeaEdgeError("dense_attention needs a Llama-family model in SEA mode")
    model.config._attn_implementation = impl
    try:
        yield model
    finally:
        model.config._attn_implementation = _IMPL


@contextmanager
def recording(model: nn.Module):
    """Keep each SEA layer's last state (estimate, idx, outputs) on the module as `sea_state` while inside."""
    layers = sea_layers(model)
    for m in layers:
        m.sea_record = True
    try:
        yield layers
    finally:
        for m in layers:
            m.sea_record, m.sea_state = False, None
