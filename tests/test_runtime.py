"""Runtime: the exported default folder run by SeaSession (onnxruntime, all graph optimizations) against the torch
SEA model (greedy generation with full recompute, perplexity), batching, streaming, a folder that fails its checks,
an import with no torch installed, and the dense baseline folder from optimum."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sea_edge.errors import SeaEdgeError

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

PROMPT = "Once upon a time, in a land far away,"


@pytest.fixture(scope="module")
def session(exported_default):
    from sea_edge.runtime import SeaSession

    return SeaSession(exported_default.out)


def _greedy_full_recompute(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of the torch model, the whole sequence recomputed each step (no cache: the eager cache path
    does not carry SEA's decoder-CNN state)."""
    import torch

    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x, use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


# -- numpy-only pieces ---------------------------------------------------------------------------------------------

def test_manifest_names_match_the_exporter():
    from sea_edge.export import exporter
    from sea_edge.runtime import manifest

    assert (manifest.MANIFEST, manifest.FORMAT) == (exporter.MANIFEST, exporter.FORMAT)


def test_sampling():
    from sea_edge.runtime.sampling import SamplingConfig, next_tokens

    logits = np.random.default_rng(0).normal(size=(3, 101)).astype(np.float32)
    greedy = logits.argmax(-1)
    rng = np.random.default_rng(1)
    assert (next_tokens(logits, SamplingConfig(), rng) == greedy).all()
    assert (next_tokens(logits, SamplingConfig(temperature=5.0, top_k=1), rng) == greedy).all()
    assert (next_tokens(logits, SamplingConfig(temperature=5.0, top_p=1e-6), rng) == greedy).all()
    a = [next_tokens(logits, SamplingConfig(temperature=1.0), np.random.default_rng(7)) for _ in range(2)]
    assert (a[0] == a[1]).all()
    draws = np.stack([next_tokens(logits, SamplingConfig(temperature=1.0, top_k=5), rng) for _ in range(200)])
    top5 = np.argsort(-logits, -1)[:, :5]
    assert all(np.isin(draws[:, b], top5[b]).all() for b in range(3))
    assert len(np.unique(draws[:, 0])) > 1
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(SeaEdgeError):
            SamplingConfig(**bad)


# -- the exported default against torch ----------------------------------------------------------------------------

def test_greedy_generation_matches_torch(session, sea_smollm2):
    """32 greedy tokens through prefill + decode graphs (KV cache and SEA state carried) equal the torch SEA model's
    with full recompute: every step's context stays below 256 tokens (one budget bucket, see session.py)."""
    model, _ = sea_smollm2
    pieces = []
    res = session.generate(PROMPT, max_new_tokens=32, stop_at_eos=False, stream=pieces.append)
    assert res.tokens == _greedy_full_recompute(model, session.encode(PROMPT), 32)
    assert "".join(pieces) == res.text and res.finish_reason == "length" and res.decode_steps == 31


def test_perplexity_matches_torch(session, sea_smollm2):
    from sea_edge.runtime.perplexity import token_windows as runtime_windows

    from sea_edge.data import load_corpus, token_windows
    from sea_edge.evaluation import perplexity

    model, tok = sea_smollm2
    text = load_corpus("validation")
    assert (runtime_windows(session.tokenizer, text, 256, 2) == token_windows(tok, text, 256, 2).numpy()).all()
    ref = perplexity(model, tok, text, 256, max_windows=2)
    ours = session.perplexity(text, 256, max_windows=2)
    assert (ours.tokens, ours.windows, ours.seq_len) == (ref.tokens, ref.windows, ref.seq_len) == (510, 2, 256)
    assert abs(ours.ppl / ref.ppl - 1) < 0.005, (ours.ppl, ref.ppl)
    assert ours.peak_rss_mib > 0 and ours.tokens_per_s > 0


def test_batch_matches_each_prompt_alone(session):
    """Left-padded batch of a 4- and a 12-token prompt, 16 new tokens: the same greedy tokens as each alone.

    The lengths are chosen, not arbitrary: SEA's estimator places each key in compressed column
    floor(slot * K / max_positions) = slot // 32 of its "eye" basis (estimator._eye), by its slot in the padded
    cache, not by its position id. While a batch stays within 32 slots every key is in column 0 either way and
    padding changes nothing (the padded prompt's logits are exactly those of the prompt alone); past 32 slots the
    shorter prompt's keys change column and its logits move a little (greedy tokens usually still agree; the pair
    of 12 and 21 tokens first differs at its 17th new token)."""
    prompts = ["The king said", PROMPT]
    alone = [session.generate(p, max_new_tokens=16, stop_at_eos=False).tokens for p in prompts]
    assert [len(session.encode(p)) for p in prompts] == [4, 12]
    both = session.generate(prompts, max_new_tokens=16, stop_at_eos=False)
    assert both.tokens == alone
    assert both.prompt_tokens == [4, 12] and both.text == [session.tokenizer.decode(t) for t in alone]
    seen = {0: "", 1: ""}
    for i, piece in session.stream(prompts, max_new_tokens=16, stop_at_eos=False):
        seen[i] += piece
    assert [seen[0], seen[1]] == both.text


def test_generation_stops_at_eos_and_checks_arguments(session):
    res = session.generate("Hello", max_new_tokens=4, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    again = session.generate("Hello", max_new_tokens=4, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert res.tokens == again.tokens and len(res.tokens) <= 4
    assert session.eos_ids  # SmolLM2: <|im_end|> from generation config / <|im_start|> from the tokenizer
    for kwargs, match in (({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                          ({"max_new_tokens": 10**6}, "exceeds")):
        with pytest.raises(SeaEdgeError, match=match):
            session.generate("Hello", **kwargs)
    with pytest.raises(SeaEdgeError, match="seq_len"):
        session.perplexity("some text", 1)


# -- folders that must be refused -----------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    """The folder's small files copied, the big ones (weights) symlinked: cheap to tamper with."""
    dst.mkdir()
    for p in src.iterdir():
        if p.stat().st_size > 50e6:
            (dst / p.name).symlink_to(p.resolve())
        else:
            shutil.copy2(p, dst / p.name)
    return dst


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["decode.onnx", "tokenizer.json"])
def test_tampered_file_fails_sha256(exported_default, tmp_path, victim):
    from sea_edge.runtime import SeaSession

    folder = _copy(exported_default.out, tmp_path / "copy")
    _flip_byte(folder / victim)
    with pytest.raises(SeaEdgeError, match=f"{victim} fails its sha256 check"):
        SeaSession(folder)


def test_bad_folders_and_devices(exported_default, tmp_path):
    import onnxruntime as ort
    from sea_edge.runtime import SeaSession

    with pytest.raises(SeaEdgeError, match="does not exist"):
        SeaSession(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeaEdgeError, match="no sea_edge.json"):
        SeaSession(tmp_path / "empty")
    folder = _copy(exported_default.out, tmp_path / "copy")
    with pytest.raises(SeaEdgeError, match="unknown device 'tpu'"):
        SeaSession(folder, device="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the whole graph on CUDA needs onnxruntime-gpu
        with pytest.raises(SeaEdgeError, match="needs onnxruntime-gpu"):
            SeaSession(folder, device="cuda", split=False)
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:  # the split graph on CUDA (Triton) needs a GPU that torch sees
        with pytest.raises(SeaEdgeError, match="device 'cuda'.* needs"):
            SeaSession(folder, device="cuda")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(SeaEdgeError, match="tokenizer_config.json listed in the manifest is missing"):
        SeaSession(folder)
    man = json.loads((folder / "sea_edge.json").read_text())
    (folder / "sea_edge.json").write_text(json.dumps({**man, "format": "sea-edge-model/99"}))
    with pytest.raises(SeaEdgeError, match="unknown format 'sea-edge-model/99'"):
        SeaSession(folder)
    (folder / "sea_edge.json").write_text("{not json")
    with pytest.raises(SeaEdgeError, match="corrupt manifest"):
        SeaSession(folder)


# -- a device without torch -----------------------------------------------------------------------------------------

_NO_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys

    BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "optimum", "triton", "sea_edge.export")

    class Blocker(importlib.abc.MetaPathFinder):
        tried = []
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
                self.tried.append(name)
                raise ImportError(f"{name} is not installed on this device")
            return None

    sys.meta_path.insert(0, Blocker())
    from sea_edge.runtime import SeaSession

    s = SeaSession(sys.argv[1])
    res = s.generate("The king said", max_new_tokens=4, stop_at_eos=False)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "optimum"))
    print(json.dumps({"tokens": res.tokens, "loaded": loaded, "tried": Blocker.tried}))
""")


def test_runtime_runs_without_torch(exported_default, session, tmp_path):
    """sea_edge.runtime imports, opens the folder and generates with torch, transformers, onnx and sea_edge.export
    made unimportable (as on a device that only has numpy, onnxruntime and tokenizers)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(exported_default.out)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["tokens"] == session.generate("The king said", max_new_tokens=4, stop_at_eos=False).tokens


# -- the dense baseline ---------------------------------------------------------------------------------------------

def test_dense_export_runs_in_the_same_session(tmp_path, smollm2):
    """export_dense (optimum, ~1.5 min on 2 cores) -> one merged graph that SeaSession runs like a SEA folder: greedy
    tokens equal transformers' own greedy generate of the dense teacher (its cache path is exact for dense)."""
    import torch
    from sea_edge.export.dense import export_dense
    from sea_edge.runtime import SeaSession

    out = tmp_path / "dense"
    res = export_dense(out)
    man = json.loads((out / "sea_edge.json").read_text())
    assert man["attention"] == "dense" and man["graphs"]["prefill"]["file"] == man["graphs"]["decode"]["file"]
    assert "past_key_values.0.key" in man["graphs"]["decode"]["inputs"]
    assert res.validation["prefill"]["top1_agreement"] >= 0.99 and not list(tmp_path.glob(".dense.*"))
    with pytest.raises(SeaEdgeError, match="not empty"):
        export_dense(out)
    s = SeaSession(out)
    assert s.attention == "dense" and s.past_names == [f"past_key_values.{i}.{k}" for i in range(30)
                                                       for k in ("key", "value")]
    model, _ = smollm2
    ids = s.encode(PROMPT)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert s.generate(PROMPT, max_new_tokens=16, stop_at_eos=False).tokens == ref
    both = s.generate(["The king said", PROMPT], max_new_tokens=16, stop_at_eos=False)
    assert both.tokens[1] == ref
    # the CUDA path's executor on the CPU: a graph with nothing to split is one step, its empty cache (past length 0)
    # bound through IO binding
    for attention in ("numpy", "torch"):
        split = SeaSession(out, split=True, attention=attention, verify=False, cache_dir=str(tmp_path / "segments"))
        assert split._prefill.n_segments == 1
        assert split.generate(PROMPT, max_new_tokens=16, stop_at_eos=False).tokens == ref


def test_bench_table_and_plot(tmp_path):
    """The benchmark program's report on made-up numbers (the measurements themselves are not run in tests)."""
    from sea_edge.runtime.bench import plot, table

    res = {"machine": {"cpu": "test CPU", "logical_cores": 2},
           "prefill": {1024: {"sea": {"latency_s": 2.0, "peak_rss_mib": 1500.0, "rss_after_load_mib": 700.0},
                              "dense": {"latency_s": 1.0, "peak_rss_mib": 1000.0, "rss_after_load_mib": 600.0}},
                       8192: {"sea": {"latency_s": 8.0, "peak_rss_mib": 6000.0, "rss_after_load_mib": 700.0},
                              "dense": {"error": "killed by signal 9 (over the memory limit)"}}},
           "decode": {"context": 4096, "steps": 16, "sea": {"decode_tokens_per_s": 5.0, "peak_rss_mib": 4000.0},
                      "dense": {"decode_tokens_per_s": 6.0, "peak_rss_mib": 3000.0}}}
    out = table(res)
    assert "  1024 |          2.00      1.00      2.00 |         1500      1000      1.50 |" in out
    assert "dense: killed by signal 9" in out and "SEA/dense 0.83" in out
    pytest.importorskip("matplotlib")
    assert plot(res, tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 0


def test_bench_gpu_report(tmp_path):
    """The GPU benchmark's report on made-up numbers: table (an out-of-memory dense point recorded, not a crash),
    plot, the copy summary of a profiler trace, and a child that fails."""
    from sea_edge.runtime.bench_gpu import is_oom, memcpy_summary, plot, run_child, table

    assert is_oom("CUDA failure 2: out of memory ; GPU=0") and is_oom("BFCArena::AllocateRawInternal Failed to "
                                                                      "allocate memory for requested buffer")
    assert not is_oom("shape mismatch")
    res = {"versions": {"gpu": "test GPU"},
           "prefill": {4096: {"sea": {"status": "ok", "prefill_s": 0.5, "peak_mib": 3000.0, "after_load_mib": 1500.0},
                              "dense": {"status": "ok", "prefill_s": 0.4, "peak_mib": 6000.0,
                                        "after_load_mib": 1200.0}},
                       32768: {"sea": {"status": "ok", "prefill_s": 2.0, "peak_mib": 20000.0},
                               "dense": {"status": "oom", "oom": True, "error": "CUDA failure 2: out of memory"}}},
           "agreement": {"windows": 4, "T": 1024, "triton": {
               "top1_agreement": 0.999, "positions": 4096, "max_abs_logit_diff": 1e-3, "greedy_tokens_equal": 96,
               "greedy_tokens": 96, "ppl_cpu": 30.0, "ppl_gpu": 30.001}},
           "nocopy": {"T": 1024, "one_layer_q_bytes": 2359296, "ort_node_placement": {"CUDAExecutionProvider": 9},
                      "prefill": {"copies": {"Memcpy HtoD": {"count": 3, "bytes": 24576, "max_bytes": 8192}},
                                  "kernel_streams": {"triton": [7], "other": [7]},
                                  "backend_stats": {"handoffs": 200, "handoffs_copied": 0}},
                      "decode_step": {"copies": {}, "kernel_streams": {"triton": [7], "other": [7]},
                                      "backend_stats": {"handoffs": 150}}}}
    out = table(res)
    assert "  4096 |         0.500     0.400      1.25 |         3000       6000      0.50 |" in out
    assert " 32768 |         2.000       OOM         — |" in out and "dense: oom: CUDA failure 2" in out
    assert "top-1 99.90% of 4096 positions" in out and "Memcpy HtoD: 3 (24576 B, max 8192 B)" in out
    trace = {"traceEvents": [
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "args": {"bytes": 4}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "args": {"bytes": 196608}},
        {"cat": "kernel", "name": "_sparse_attention_fwd_kernel", "args": {"stream": 13}},
        {"cat": "kernel", "name": "MatMul", "args": {"stream": 13}}]}
    s = memcpy_summary(trace)
    assert s["copies"] == {"Memcpy DtoH": {"count": 2, "bytes": 196612, "max_bytes": 196608}}
    assert s["kernel_streams"] == {"triton": [13], "other": [13]}
    pytest.importorskip("matplotlib")
    assert plot(res, tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 0
    r = run_child(["--child", "prefill", "--dir", str(tmp_path / "nowhere"), "--length", "8"], timeout_s=120)
    assert r["status"] == "error" and r["error"], r  # "... does not exist" on a GPU machine
    pytest.importorskip("torch")
    from sea_edge.runtime.bench_gpu import smoke_test

    smoke = smoke_test(tmp_path / "smoke", attention="torch", device="cpu")  # the preflight's graph, on the CPU
    assert smoke["ok"] and smoke["steps"] == 5 and smoke["stats"].get("handoffs_copied", 0) == 0, smoke


def test_bench_column_scores_checks_itself_on_the_cpu(tmp_path, capsys):
    """The one-layer ColumnScores bench without CUDA: onnxruntime's CPU provider on the function body against the
    torch reference, odd lengths; the table printed and the JSON written."""
    pytest.importorskip("torch")
    from sea_edge.runtime.bench_column_scores import main

    assert main(["--lengths", "37,130", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench_column_scores.json").read_text())
    assert [r["T"] for r in rep["rows"]] == [37, 130] and rep["versions"]["provider"] == "CPUExecutionProvider"
    assert all(r["max_abs_diff"] < 1e-4 and r["scale_of_scores"] > 1 and r["onnx_body_ms"] > 0 for r in rep["rows"])
    assert "ONNX body ms" in capsys.readouterr().out
