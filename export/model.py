"""The graphs sea-edge exports, written out as plain modules over a SEA model's own layers (nanoGPT style: one
forward readable top to bottom), so the exported inputs and outputs are explicit tensors, not a cache object.

A Llama-family model in SEA mode gives two graphs:

    prefill(input_ids, attention_mask, position_ids)
        -> logits, present.<i>.key, present.<i>.value, present.<i>.sea_state, present.<i>.sea_rows1/2
    decode(input_ids (B, 1), attention_mask (B, P + 1), position_ids (B, 1), past_key_values.<i>.key, ... )
        -> the same outputs, one position further

Names follow optimum / onnxruntime-genai (past_key_values.<i>.key -> present.<i>.key, (B, Hkv, S, D)); SEA's own
decode state is carried beside the cache: the Performer prefix sum (B, Hkv, m, D + K + 1) and the last two rows of
each decoder-CNN input (B, H, C, 2, K / r), see SEAEstimator.forward. A BERT-family encoder gives one graph,
(input_ids, attention_mask, token_type_ids) -> last_hidden_state.

The same modules run in torch, and export validation compares them with the patched transformers model.
"""

from __future__ import annotations

import torch
from torch import nn

from sea_edge.attention import mask_geometry, sea_attention_step
from sea_edge.errors import SeaEdgeError
from sea_edge.patch import _bert_attentions, _llama_attentions, sea_layers

__all__ = ["BertEncoder", "LlamaDecode", "LlamaPrefill", "io_names", "state_names"]

STATE_KINDS = ("key", "value", "sea_state", "sea_rows1", "sea_rows2")


def state_names(n_layers: int, prefix: str) -> list[str]:
    """Cache + SEA state tensor names, layer-major: <prefix>.<i>.key, .value, .sea_state, .sea_rows1, .sea_rows2."""
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in STATE_KINDS]


def io_names(n_layers: int, decode: bool) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    if decode:
        inputs += state_names(n_layers, "past_key_values")
    return inputs, ["logits", *state_names(n_layers, "present")]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _LlamaSEA(nn.Module):
    """Shared body: embeddings -> layers (RMSNorm, q/k/v with RoPE, SEA attention, o_proj, MLP) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        attns = _llama_attentions(model)
        if not attns or not sea_layers(model):
            raise SeaEdgeError("export needs a Llama-family model in SEA mode (sea_edge.to_sea)")
        base = model.model
        self.embed, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
        self.rotary, self.lm_head = base.rotary_emb, model.lm_head
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = attns[0].head_dim

    def run(self, input_ids, attention_mask, position_ids, past):
        """past: None (prefill) or per layer (key, value, sea_state, rows1, rows2). Returns logits, present."""
        B, T = input_ids.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        h = self.embed(input_ids)  # (B, T, E)
        cos, sin = self.rotary(h, position_ids)  # (B, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        key_valid = attention_mask.to(torch.bool)  # (B, S)
        S = attention_mask.shape[1]
        geometry = mask_geometry(self.layers[0].self_attn.sea, H, T, S, h.device, key_valid)  # once, not per layer
        present = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            sea_state = None
            if past is not None:
                pk, pv, *sea_state = past[i]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, Hkv, S, D)
            out, new_state = sea_attention_step(attn.sea, q, k, v, attn.scaling, key_valid, sea_state, geometry)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            present += [k, v, *new_state]
        return self.lm_head(self.norm(h)), present


class LlamaPrefill(_LlamaSEA):
    def forward(self, input_ids, attention_mask, position_ids):
        logits, present = self.run(input_ids, attention_mask, position_ids, None)
        return (logits, *present)


class LlamaDecode(_LlamaSEA):
    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        n = len(STATE_KINDS)
        past = [past_flat[i * n:(i + 1) * n] for i in range(len(self.layers))]
        logits, present = self.run(input_ids, attention_mask, position_ids, past)
        return (logits, *present)


class BertEncoder(nn.Module):
    """A BERT-family encoder in SEA mode: (input_ids, attention_mask, token_type_ids) -> last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not _bert_attentions(model) and not sea_layers(model):
            raise SeaEdgeError("export needs a BERT-family model in SEA mode (sea_edge.to_sea)")
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

