"""Measured peak memory of one forward pass of an exported folder, in a fresh process (Linux only).

    from sea_edge.runtime.measure import measure_peak
    m = measure_peak("smollm2-sea", T=4096)          # prefill of 4096 random tokens
    m["peak_rss_bytes"], m["rss_after_load"], m["seconds"], m["settings"]

How: a child Python (`python -c`, importing only numpy and onnxruntime, so nothing of this process's memory is
counted) opens the graph with the given onnxruntime settings, writes "5" to /proc/self/clear_refs (which resets
the kernel's high-water mark VmHWM to the current RSS), runs the graph once, and reads VmHWM and VmRSS from
/proc/self/status. `peak_rss_bytes` is therefore the peak resident set of the whole process during the run:
weights, runtime, activations, outputs and the allocator's slack, the figure a device's out-of-memory killer sees.
The peak while the session was being created (graph optimization makes temporary copies) is reported beside it as
`load_peak_rss_bytes`. Resetting VmHWM is a Linux feature (since 4.0); elsewhere this module refuses to run.

onnxruntime settings (SETTINGS below, recorded in every result) decide how much of what a graph allocates is
resident at once; sea_edge.runtime.budget models the same settings:

- execution_order "priority" (PRIORITY_BASED): onnxruntime's default order comes from a depth-first walk back
  from the graph outputs, which runs each layer's state outputs (present.<i>.sea_state / sea_rows) only after the
  logits, so every layer's Performer block sums and padded decoder images stay alive to the end of the run.
- mem_reuse False: with reuse, onnxruntime's planner hands a freed buffer to a later value of the same size and
  keeps it allocated in between, across layers.
- arena True: onnxruntime's CPU arena (BFC) with its default growth by powers of two. Pages it reserved but never
  touched are not resident, so its RSS stays near the live bytes; "same_as_requested" fragments more, and plain
  malloc (arena False) on glibc most.
- head_split True: the graph runs as SeaSession runs it on the CPU, two sessions cut before the lm_head, the
  layers' arena given back (shrunk) before a long prefill's (B, T, V) logits are allocated
  (sea_edge.runtime.executor.HeadSplitGraph). With all logits at T = 4096: SEA 2452 -> 1825 MiB, dense
  3837 -> 3742 MiB; with the last position's logits nothing changes (no shrink, the same body).

Measured on the default export (SmolLM2-135M fp32, onnxruntime 1.32, 2 threads), peak RSS of one prefill:

    settings                                        T=1024    T=4096
    onnxruntime defaults (default order, reuse on)  2.76 GB   8.09 GB
    priority order, reuse on                        1.93 GB   4.87 GB
    SETTINGS (priority order, reuse off)            1.64 GB   3.64 GB
    SETTINGS but arena same_as_requested            1.74 GB
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sea_edge.errors import SeaEdgeError

from .manifest import LOGITS_TO_KEEP

__all__ = ["GRAPHS", "MEASURE_KEYS", "SETTINGS", "measure_peak"]

GRAPHS = ("prefill", "decode")
SETTINGS = {"arena": True, "arena_extend_strategy": "next_power_of_two", "execution_order": "priority",
            "mem_reuse": False, "mem_pattern": False, "graph_optimization_level": "all", "head_split": True}
"""The onnxruntime settings measure_peak uses unless told otherwise (and that budget.py models)."""
MEASURE_KEYS = ("peak_rss_bytes", "rss_after_load", "load_peak_rss_bytes", "rss_after_run", "rss_baseline",
                "seconds", "load_seconds", "settings", "graph", "T", "B", "past", "folder", "logits")
"""Keys of every measure_peak result (a stable API: the runtime benchmark reads them)."""
_ORDERS = {"priority": "PRIORITY_BASED", "default": "DEFAULT"}
_STRATEGIES = {"next_power_of_two": 0, "same_as_requested": 1}

# The child: numpy + onnxruntime only. argv[1] is a JSON job; the result is one JSON line on stdout.
_CHILD = r"""
import json, sys, time
def status():
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, val = line.partition(':')
            if key in ('VmRSS', 'VmHWM'):
                out[key] = int(val.split()[0]) * 1024
    return out
job = json.loads(sys.argv[1])
import numpy as np
import onnxruntime as ort
baseline = status()['VmRSS']
so = ort.SessionOptions()
so.log_severity_level = 3
so.graph_optimization_level = {'off': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[job['graph_optimization_level']]
so.execution_order = getattr(ort.ExecutionOrder, job['execution_order'])
so.enable_mem_reuse = job['mem_reuse']
so.enable_mem_pattern = job['mem_pattern']
so.enable_cpu_mem_arena = job['arena']
if job['arena'] and job['arena_strategy'] != 0:
    info = ort.OrtMemoryInfo('Cpu', ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({'arena_extend_strategy': job['arena_strategy']}))
    so.add_session_config_entry('session.use_env_allocators', '1')
if job['threads']:
    so.intra_op_num_threads = job['threads']
for key, value in job['session_config'].items():
    so.add_session_config_entry(key, value)
t0 = time.perf_counter()
graph = None
if job['head_split']:  # as SeaSession runs it on the CPU (sea_edge.runtime.executor.HeadSplitGraph)
    from sea_edge.errors import SeaEdgeError
    from sea_edge.runtime.executor import EXTERNAL_DATA_FOLDER, HeadSplitGraph
    from sea_edge.runtime.segments import load_plan
    try:
        plan = load_plan(job['folder'], job['model_file'], mode='head')
    except SeaEdgeError:
        plan = None
    if plan is not None:
        so.add_session_config_entry(EXTERNAL_DATA_FOLDER, job['folder'])
        graph = HeadSplitGraph(plan, lambda st: ort.InferenceSession(plan.segment_bytes(st), so,
                               providers=['CPUExecutionProvider']), job['state_shapes'], job['vocab'],
                               job['hidden_size'])
if graph is None:
    sess = ort.InferenceSession(job['model'], so, providers=['CPUExecutionProvider'])
    inputs, overridable = sess.get_inputs(), {i.name for i in sess.get_overridable_initializers()}
else:
    inputs = [i for i in graph.body.get_inputs() if i.name not in graph.plan.defaults]
    overridable = set(graph.overridable)
load_seconds = time.perf_counter() - t0
loaded = status()
B, T, P = job['B'], job['T'], job['past']
rng = np.random.default_rng(job['seed'])
DT = {'tensor(float)': np.float32, 'tensor(float16)': np.float16, 'tensor(int64)': np.int64,
      'tensor(int32)': np.int32}
feeds = {}
for i in inputs:
    dt = DT.get(i.type, np.float32)
    if i.name == 'input_ids':
        feeds[i.name] = rng.integers(0, job['vocab'], (B, T), dtype=np.int64).astype(dt)
    elif i.name == 'attention_mask':
        feeds[i.name] = np.ones((B, P + T), dt)
    elif i.name == 'position_ids':
        feeds[i.name] = np.broadcast_to(np.arange(P, P + T, dtype=dt), (B, T)).copy()
    else:  # a past state: batch first, any other symbolic dimension is the past length
        shape = [B if j == 0 else (d if isinstance(d, int) else P) for j, d in enumerate(i.shape)]
        feeds[i.name] = (rng.standard_normal(shape).astype(dt) if np.issubdtype(dt, np.floating)
                         else np.zeros(shape, dt))
keep = job['keep_last'] and job['logits_to_keep'] in overridable
if keep:
    feeds[job['logits_to_keep']] = np.ones(1, np.int64)
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
t0 = time.perf_counter()
outs = sess.run(None, feeds) if graph is None else graph.run(list(graph.plan.outputs), feeds)
seconds = time.perf_counter() - t0
after = status()
print(json.dumps({'peak_rss_bytes': after['VmHWM'], 'rss_after_run': after['VmRSS'],
    'rss_after_load': loaded['VmRSS'], 'load_peak_rss_bytes': loaded['VmHWM'], 'rss_baseline': baseline,
    'seconds': seconds, 'load_seconds': load_seconds, 'output_bytes': int(sum(o.nbytes for o in outs)),
    'onnxruntime': ort.__version__, 'intra_op_threads': so.intra_op_num_threads,
    'logits': 'last' if keep else 'all', 'head_split': graph is not None}))
"""


def _check_platform() -> None:
    if not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists():
        raise SeaEdgeError(f"measure_peak needs Linux (it resets the peak RSS through /proc/self/clear_refs); this is "
                           f"{sys.platform}: use the analytic estimate (budget_report without --measure)")


def _manifest(folder: Path) -> dict:
    from .manifest import read_folder

    return read_folder(folder, verify=False)


def measure_peak(folder: str | Path, T: int, B: int = 1, graph: str = "prefill", threads: int | None = None,
                 arena: bool = True, *, arena_extend_strategy: str = SETTINGS["arena_extend_strategy"],
                 execution_order: str = SETTINGS["execution_order"], mem_reuse: bool = SETTINGS["mem_reuse"],
                 mem_pattern: bool = SETTINGS["mem_pattern"], optimization: str = "all", seed: int = 0,
                 timeout: float | None = 1800.0, keep_last: bool = False,
                 head_split: bool = SETTINGS["head_split"]) -> dict:
    """Peak resident memory of one run of an exported graph, measured in a fresh process (see module docstring).

    folder: a folder written by `sea-edge export` (or the dense baseline). T: tokens of the prefill, or for
    graph="decode" the past length the single new token attends to. B: batch. threads: onnxruntime intra-op threads
    (None = onnxruntime's default, one per physical core). arena, arena_extend_strategy ("next_power_of_two" is
    onnxruntime's default, "same_as_requested"), execution_order ("priority" or "default"), mem_reuse, mem_pattern,
    optimization ("off", "basic", "extended", "all"): onnxruntime session settings, SETTINGS by default; the
    manifest's quantization.session_config entries are applied as the runtime applies them. head_split: run the
    graph as SeaSession does on the CPU, cut before its lm_head (executor.HeadSplitGraph; where the graph has one;
    settings["head_split"] says whether it was). keep_last: a prefill
    returns the last position's logits only (the LOGITS_TO_KEEP input, where the graph has it; result "logits").
    Inputs are random token ids from the vocabulary (and random past states for decode). The child
    runs without this process's MALLOC_* tuning and LD_PRELOAD, which would change what is measured.

    Returns a dict with (bytes unless said otherwise):
        peak_rss_bytes       VmHWM of the run: the process's peak resident set from just before the run to its end
        rss_after_load       VmRSS once the session is created (weights, graph, runtime), before the run
        load_peak_rss_bytes  VmHWM while the session was created (graph optimization peaks here)
        rss_after_run        VmRSS after the run, outputs still held (arenas keep their memory)
        rss_baseline         VmRSS of the child with numpy and onnxruntime imported, before any session
        seconds              wall time of the run; load_seconds: of creating the session
        output_bytes         bytes of all outputs
        settings             the onnxruntime settings used: arena, arena_extend_strategy, execution_order,
                             mem_reuse, mem_pattern, graph_optimization_level, intra_op_threads, onnxruntime version
        logits               "last" or "all": what the prefill returned
        graph, T, B, past, folder, model_file
    Raises SeaEdgeError off Linux, for a bad argument, or when the child fails (its last error line; a kill by
    signal 9 usually means the system ran out of memory).
    """
    _check_platform()
    folder = Path(folder)
    if graph not in GRAPHS:
        raise SeaEdgeError(f"unknown graph {graph!r}: use one of {', '.join(GRAPHS)}")
    if T < 1 or B < 1:
        raise SeaEdgeError(f"T and B must be >= 1, got T={T}, B={B}")
    if execution_order not in _ORDERS:
        raise SeaEdgeError(f"unknown execution_order {execution_order!r}: use one of {', '.join(_ORDERS)}")
    if arena_extend_strategy not in _STRATEGIES:
        raise SeaEdgeError(f"unknown arena_extend_strategy {arena_extend_strategy!r}: use one of "
                           f"{', '.join(_STRATEGIES)}")
    if optimization not in ("off", "basic", "extended", "all"):
        raise SeaEdgeError(f"unknown optimization {optimization!r}: use off, basic, extended or all")
    man = _manifest(folder)
    sm = man["source_model"]
    max_pos = int(sm.get("max_positions") or 0)
    if max_pos and T + (1 if graph == "decode" else 0) > max_pos:
        raise SeaEdgeError(f"T={T} is beyond the model's {max_pos} positions")
    model_file = man["graphs"][graph]["file"]
    past, tokens = (T, 1) if graph == "decode" else (0, T)
    job = {"model": str(folder / model_file), "B": B, "T": tokens, "past": past, "vocab": int(sm["vocab_size"]),
           "seed": seed, "threads": threads, "arena": bool(arena), "arena_strategy": _STRATEGIES[arena_extend_strategy],
           "execution_order": _ORDERS[execution_order], "mem_reuse": bool(mem_reuse), "mem_pattern": bool(mem_pattern),
           "graph_optimization_level": optimization, "keep_last": bool(keep_last) and graph == "prefill",
           "logits_to_keep": LOGITS_TO_KEEP, "head_split": bool(head_split), "folder": str(folder.resolve()),
           "model_file": model_file, "state_shapes": man["graphs"].get("state_shapes") or {},
           "hidden_size": sm.get("hidden_size"),
           "session_config": dict((man.get("quantization") or {}).get("session_config") or {})}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LD_PRELOAD"))}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], check=False, capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=str(folder))
    except subprocess.TimeoutExpired:
        raise SeaEdgeError(f"measure_peak: the run of {model_file} at T={T} took longer than {timeout} s") from None
    if proc.returncode != 0:
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
        else:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise SeaEdgeError(f"measure_peak: the child running {model_file} at T={T}, B={B} failed: {why}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    settings = {"arena": bool(arena), "arena_extend_strategy": arena_extend_strategy if arena else None,
                "execution_order": execution_order, "mem_reuse": bool(mem_reuse), "mem_pattern": bool(mem_pattern),
                "graph_optimization_level": optimization, "intra_op_threads": threads,
                "head_split": res.pop("head_split"), "onnxruntime": res.pop("onnxruntime"),
                "provider": "CPUExecutionProvider"}
    res.pop("intra_op_threads", None)
    res.update(settings=settings, graph=graph, T=T, B=B, past=past, folder=str(folder), model_file=model_file,
               wall_seconds=time.time() - t0)
    return res
