"""The dense baseline: the teacher itself exported with optimum (stock attention, no SEA) into the folder layout of
`sea-edge export`, so the runtime and the benchmarks run both the same way.

    DIR/model.onnx        optimum's text-generation-with-past graph: input_ids, attention_mask, position_ids,
                          past_key_values.<i>.key/.value -> logits, present.<i>.key/.value. One graph serves both
                          roles: the prefill feeds an empty cache (past length 0), decode steps feed the last one.
    DIR/model.onnx.data   its weights (external data, as in a SEA folder)
    DIR/sea_edge.json     manifest: "attention": "dense", source model, io names, files (size, sha256), versions,
                          validation figures
    DIR/tokenizer*.json, generation_config.json

optimum exports from a Hugging Face folder, and the default teacher is a GGUF file that transformers dequantizes,
so the loaded teacher is first saved (fp32 safetensors) to a scratch folder. Everything is built in a temporary
folder beside DIR and renamed into place after validation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from sea_edge.errors import SeaEdgeError

from .exporter import FORMAT, MANIFEST, PREFILL, WEIGHTS, ExportResult, _check_out, _replace, _versions, sha256_file

__all__ = ["COPIED", "TASK", "export_dense"]

TASK = "text-generation-with-past"
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "generation_config.json")
"""Files of optimum's output folder that the runtime reads (when present)."""
_VALIDATE_T, _VALIDATE_PREFIX = 128, 96  # one window of real text: prefill all of it, and prefix + decode steps


@contextlib.contextmanager
def _quiet():
    """optimum and torch.onnx print tracer warnings and progress on every export."""
    import transformers

    old = transformers.logging.get_verbosity()
    old_offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder: nothing is fetched
    transformers.logging.set_verbosity_error()
    for name in ("optimum", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(old)
        if old_offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_offline


def export_dense(out: str | Path, model: str = "smollm2-135m", force: bool = False, opset: int = 18,
                 min_agreement: float = 0.99) -> ExportResult:
    """Export the dense teacher `model` (known name or local HF folder) with optimum into `out` (module docstring).
    Refuses a non-empty `out` unless `force`. Fails when onnxruntime's top-1 agrees with torch's on fewer than
    `min_agreement` of the validation tokens."""
    out = Path(out)
    _check_out(out, force)
    from sea_edge.teacher import load_teacher

    t0 = time.time()
    teacher, tok = load_teacher(model)
    if not type(teacher).__name__.endswith("ForCausalLM"):
        raise SeaEdgeError(f"export_dense needs a causal LM; {model!r} is {type(teacher).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work.") as work:
            hf, raw = Path(work) / "hf", Path(work) / "onnx"
            teacher.save_pretrained(hf, safe_serialization=True)
            tok.save_pretrained(hf)
            from optimum.exporters.onnx import main_export

            with _quiet():
                main_export(str(hf), output=str(raw), task=TASK, opset=opset, dtype="fp32", device="cpu",
                            do_validation=False, local_files_only=True, library_name="transformers")
            _relayout(raw, tmp)
        validation = _validate(tmp, teacher, tok, min_agreement)
        manifest = _manifest(tmp, model, teacher, opset, validation)
        from sea_edge.artifacts import atomic_write_json

        atomic_write_json(tmp / MANIFEST, manifest)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, manifest, time.time() - t0, validation)


def _relayout(raw: Path, dest: Path) -> None:
    """optimum's folder -> ours: the graph with every weight in model.onnx.data, plus the files the runtime reads."""
    import onnx

    graphs = sorted(p.name for p in raw.glob("*.onnx"))
    if graphs != [PREFILL]:
        raise SeaEdgeError(f"optimum wrote {graphs}, expected one merged {PREFILL} (a newer optimum layout?)")
    proto = onnx.load(str(raw / PREFILL))  # external data (if optimum split it) is read in
    onnx.save_model(proto, str(dest / PREFILL), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS, size_threshold=1024)
    for name in COPIED:
        if (raw / name).is_file():
            shutil.copy2(raw / name, dest / name)
    if not (dest / "tokenizer.json").is_file():
        raise SeaEdgeError("optimum's output has no tokenizer.json (the runtime needs a fast tokenizer)")


def _io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in g.input], [o.name for o in g.output]


def _manifest(folder: Path, model: str, teacher, opset: int, validation: dict) -> dict:
    import importlib.metadata as md

    from sea_edge.teacher import teacher_info

    info = teacher_info(teacher)
    c = teacher.config
    inputs, outputs = _io(folder / PREFILL)
    kinds = ["key", "value"]
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    graph = {"file": PREFILL, "inputs": inputs, "outputs": outputs}
    kv = ["batch", info.n_kv_heads, "past_sequence_length", info.head_dim]
    versions = _versions()
    with contextlib.suppress(md.PackageNotFoundError):
        versions["optimum-onnx"] = md.version("optimum-onnx")
    return {
        "format": FORMAT,
        "attention": "dense",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": {"name": model, **info.asdict(), "hidden_size": c.hidden_size,
                         "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
                         "tie_word_embeddings": bool(c.tie_word_embeddings)},
        "exporter": {"tool": "optimum.exporters.onnx.main_export", "task": TASK, "dtype": "fp32"},
        "quantization": {"scheme": "none"},
        "opset": opset,
        # one graph, both roles: the prefill feeds past_key_values of length 0
        "graphs": {"prefill": graph, "decode": graph, "n_layers": info.n_layers, "state_kinds": kinds,
                   "state_shapes": {k: kv for k in kinds}},
        "files": files,
        "versions": versions,
        "validation": validation,
    }


def _validate(folder: Path, teacher, tok, min_agreement: float) -> dict:
    """onnxruntime (CPU, all graph optimizations: as the runtime opens it) against the torch teacher on one window
    of validation text: the prefill of the whole window, and a prefix prefill followed by teacher-forced decode
    steps. Raises SeaEdgeError below `min_agreement` top-1 agreement."""
    import onnxruntime as ort
    import torch

    from sea_edge.data import load_corpus, token_windows

    from .validate import compare_logits

    t0 = time.time()
    ids = token_windows(tok, load_corpus("validation"), _VALIDATE_T, max_windows=1)  # (1, T)
    with torch.no_grad():
        ref = teacher(ids, use_cache=False).logits.float().numpy()  # (1, T, V)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    from sea_edge.runtime.ort_workarounds import disabled_optimizers  # as the runtime opens it

    off = disabled_optimizers(ort)
    sess = ort.InferenceSession(str(folder / PREFILL), so, providers=["CPUExecutionProvider"],
                                **({"disabled_optimizers": off} if off else {}))
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    present_names = ["present." + n[len("past_key_values."):] for n in past_names]
    x = ids.numpy()

    def run(tokens, past_len, past):
        B, T = tokens.shape
        feeds = {"input_ids": tokens, "attention_mask": np.ones((B, past_len + T), np.int64),
                 "position_ids": np.arange(past_len, past_len + T, dtype=np.int64)[None].repeat(B, 0), **past}
        names = {i.name for i in sess.get_inputs()}
        res = sess.run(["logits", *present_names], {k: v for k, v in feeds.items() if k in names})
        return res[0], dict(zip(past_names, res[1:]))

    from sea_edge.teacher import teacher_info

    info = teacher_info(teacher)
    empty = {n: np.zeros((1, info.n_kv_heads, 0, info.head_dim), np.float32) for n in past_names}
    pre = compare_logits(run(x, 0, empty)[0], ref)
    logits, past = run(x[:, :_VALIDATE_PREFIX], 0, empty)
    steps = []
    for t in range(_VALIDATE_PREFIX, x.shape[1]):
        logits, past = run(x[:, t:t + 1], t, past)
        steps.append(logits[:, -1])
    dec = compare_logits(np.stack(steps, 1), ref[:, _VALIDATE_PREFIX:])  # step t reads token t, predicts t + 1
    out = {"text": f"validation split, 1 window of {_VALIDATE_T} tokens", "prefill": pre,
           "decode": {**dec, "prefix": _VALIDATE_PREFIX, "steps": _VALIDATE_T - _VALIDATE_PREFIX},
           "seconds": round(time.time() - t0, 1)}
    for what, r in (("prefill", pre), ("decode", dec)):
        if not r["top1_agreement"] >= min_agreement:
            raise SeaEdgeError(f"dense export validation failed: onnxruntime {what} agrees with torch on "
                               f"{r['top1_agreement']:.2%} of tokens (< {min_agreement:.0%})")
    return out
