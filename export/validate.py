"""Validation inside export: the ONNX checker, then ONNX Runtime (CPU, graph optimizations off: the graph as
written) against torch on real validation text, prefill and decode; the export fails loudly below the bar."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch

from sea_edge.errors import SeaEdgeError

from .onnx_ops import register_schema

__all__ = ["DECODE_PREFIX", "DECODE_STEPS", "compare_logits", "ort_session", "validate_folder"]

DECODE_PREFIX, DECODE_STEPS = 64, 32


def ort_session(path: Path, optimize: bool = False, session_config: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(key, value)
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    from sea_edge.runtime.ort_workarounds import disabled_optimizers  # as the runtime opens it (NaN otherwise)

    off = disabled_optimizers(ort)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                **({"disabled_optimizers": off} if off else {}))


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Max abs difference and top-1 agreement over every position of (B, T, V) logits."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return {"max_abs_logit_diff": float(np.abs(ours - ref).max()),
            "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "positions": int(np.prod(ours.shape[:-1]))}


def _feeds(ids: np.ndarray, past_len: int = 0) -> dict:
    B, T = ids.shape
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((B, past_len + T), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + T), (B, T)).astype(np.int64).copy()}


def run_decode(prefill, decode, ids: np.ndarray, prefix: int) -> np.ndarray:
    """Prefill `prefix` tokens, then feed the rest one decode step at a time (teacher forcing). Returns the logits
    of positions prefix .. T-1, (B, T - prefix, V)."""
    outs = prefill.run(None, _feeds(ids[:, :prefix]))
    state = outs[1:]
    names = [i.name for i in decode.get_inputs()][3:]
    assert len(names) == len(state), (len(names), len(state))
    logits = []
    for t in range(prefix, ids.shape[1]):
        outs = decode.run(None, {**_feeds(ids[:, t:t + 1], t), **dict(zip(names, state))})
        logits.append(outs[0][:, -1])
        state = outs[1:]
    return np.stack(logits, axis=1)


def validate_folder(folder: Path, model, tok, tokens: int, min_agreement: float,
                    session_config: dict | None = None) -> dict:
    """Check the exported graphs in `folder` against `model` (the torch SEA model). Returns the figures."""
    from sea_edge.data import load_corpus, token_windows

    t0 = time.time()
    register_schema()
    for name in ("model.onnx", "decode.onnx"):
        try:
            onnx.checker.check_model(str(folder / name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise SeaEdgeError(f"exported {name} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    ids = token_windows(tok, load_corpus("validation"), tokens, max_windows=2)  # (2, tokens) real text
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float().numpy()  # (2, T, V)
        ref_dec = model(ids[:, :DECODE_PREFIX + DECODE_STEPS], use_cache=False).logits.float().numpy()
    x = ids.numpy()
    prefill = ort_session(folder / "model.onnx")
    pre = compare_logits(prefill.run(["logits"], _feeds(x))[0], ref)
    decode = ort_session(folder / "decode.onnx")
    dec_logits = run_decode(prefill, decode, x[:, :DECODE_PREFIX + DECODE_STEPS], DECODE_PREFIX)
    dec = compare_logits(dec_logits, ref_dec[:, DECODE_PREFIX:])
    optimized = ort_session(folder / "model.onnx", optimize=True, session_config=session_config)
    opt = compare_logits(optimized.run(["logits"], _feeds(x))[0], ref)
    out = {"text": f"validation split, {x.shape[0]} windows of {x.shape[1]} tokens",
           "prefill": pre, "decode": {**dec, "prefix": DECODE_PREFIX, "steps": DECODE_STEPS},
           "prefill_ort_optimized": opt, "seconds": round(time.time() - t0, 1)}
    for what, r in (("prefill", pre), ("decode", dec), ("optimized prefill", opt)):
        if not r["top1_agreement"] >= min_agreement:
            raise SeaEdgeError(f"validation failed: ONNX Runtime {what} agrees with torch on "
                               f"{r['top1_agreement']:.2%} of tokens (< {min_agreement:.0%}), max |logit diff| "
                               f"{r['max_abs_logit_diff']:.3g}")
    return out


def validate_encoder(folder: Path, model, tok, tokens: int, min_agreement: float = 0.99,
                     min_cosine: float = 0.99) -> dict:
    """An encoder export: the checker, then ONNX Runtime's last_hidden_state against torch on two real validation
    windows (the second with padding): per-token cosine similarity; at least `min_agreement` of the tokens must
    reach `min_cosine` (the encoder's analogue of top-1 agreement: a near-tie in the estimate may pick another
    column for a row, as for the LM)."""
    from sea_edge.data import load_corpus

    t0 = time.time()
    register_schema()
    try:
        onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SeaEdgeError(f"exported model.onnx fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    n = min(tokens, model.config.max_position_embeddings)
    text = load_corpus("validation")
    enc = tok([text[:20000], text[20000:21000]], truncation=True, max_length=n, padding="max_length",
              return_tensors="pt")
    feeds = {k: enc[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    out = ort_session(folder / "model.onnx").run(["last_hidden_state"], feeds)[0]
    keep = feeds["attention_mask"].astype(bool)
    a, b = out[keep].astype(np.float64), ref[keep].astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    r = {"text": f"validation split, 2 windows of up to {n} tokens (the second padded)",
         "min_token_cosine": float(cos.min()), "agreement": float((cos >= min_cosine).mean()),
         "agreement_cosine": min_cosine, "rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
         "max_abs_diff": float(np.abs(a - b).max()), "positions": int(keep.sum()),
         "seconds": round(time.time() - t0, 1)}
    if not r["agreement"] >= min_agreement:
        raise SeaEdgeError(f"validation failed: only {r['agreement']:.2%} of the tokens' hidden states reach a "
                           f"cosine of {min_cosine} against torch (< {min_agreement:.0%})")
    return r
