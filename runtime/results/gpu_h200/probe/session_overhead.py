"""What one more onnxruntime CUDA session costs in GPU memory: the SEA runtime opens 31 (one per segment), the dense
export one, and the SEA folder's load memory measured 3553 MiB against dense's 1373 (~73 MiB per extra session).

Each case runs in a fresh process: torch initializes CUDA and a stream (as the runtime does), one CUDA arena is
registered with the environment (the runtime's `session.use_env_allocators`), then N sessions of the same small graph
are opened and each run once at T rows; NVML's per-process memory is read before, after opening and after running.
The slope over N (N = 1 vs N = 16) is the per-session cost; the shared arena's activations are counted once.

    python runtime/results/gpu_h200/probe/session_overhead.py --out DIR   (writes session_overhead.json)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {  # name: (graph, extra environment, extra provider options)
    "matmul": ("matmul", {}, {}),
    "matmul cublas_ws=:4096:1": ("matmul", {"CUBLAS_WORKSPACE_CONFIG": ":4096:1"}, {}),
    "matmul cublas_ws=:1024:1": ("matmul", {"CUBLAS_WORKSPACE_CONFIG": ":1024:1"}, {}),
    "matmul cublas_ws=:0:0": ("matmul", {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, {}),
    # :0:0 set inside the process, at three points before onnxruntime opens a session: after `import torch`, after
    # torch has started CUDA and made a stream (what the runtime's backend does), after torch ran a GEMM
    "matmul cublas_ws=:0:0 after import": ("matmul", {"LATE_WS": ":0:0", "LATE_STAGE": "import"}, {}),
    "matmul cublas_ws=:0:0 after init": ("matmul", {"LATE_WS": ":0:0", "LATE_STAGE": "init"}, {}),
    "matmul cublas_ws=:0:0 after gemm": ("matmul", {"LATE_WS": ":0:0", "LATE_STAGE": "gemm"}, {}),
    "matmul no user stream": ("matmul", {}, {"user_compute_stream": None}),
    "conv": ("conv", {}, {}),
    "conv heuristic no max ws": ("conv", {}, {"cudnn_conv_algo_search": "HEURISTIC",
                                             "cudnn_conv_use_max_workspace": "0"}),
    "conv cublas_ws=:0:0": ("conv", {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, {}),
    "relu only": ("relu", {}, {}),
    "relu only cublas_ws=:0:0": ("relu", {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, {}),
}
ONLY = [c for c in os.environ.get("PROBE_CASES", "").split(",") if c]  # run only these (names as above)


def graph(kind: str, t: int) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, 576])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits, nodes = [], []
    if kind == "relu":
        nodes.append(helper.make_node("Relu", ["x"], ["y"]))
    else:
        inits += [numpy_helper.from_array(rng.standard_normal((576, 1536), np.float32) * 0.02, "w1"),
                  numpy_helper.from_array(rng.standard_normal((1536, 576), np.float32) * 0.02, "w2")]
        nodes += [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
        if kind == "matmul":
            nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"]))
        else:  # the decoder CNN's kind of work: a 3x3 Conv over a (1, 4, T/8, 192) map made of the activations
            inits += [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3), np.float32) * 0.1, "wc"),
                      numpy_helper.from_array(np.array([1, 4, -1, 192], np.int64), "shape")]
            nodes += [helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["c"]),
                      helper.make_node("Conv", ["c", "wc"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, kind, [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def child(case: str, n: int, t: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import pynvml
    import torch

    kind, _, extra = CASES[case]
    def late(stage: str) -> None:
        if os.environ.get("LATE_STAGE") == stage:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = os.environ["LATE_WS"]

    late("import")
    torch.cuda.init()
    stream = torch.cuda.Stream()
    torch.empty(1, device="cuda")
    late("init")
    a = torch.ones(64, 64, device="cuda")
    (a @ a).sum().item()  # torch's cuBLAS up, as in a process whose caller used torch first
    late("gemm")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)

    def used() -> float:
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid():
                return p.usedGpuMemory / 2**20
        return 0.0

    mem = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator_v2("CUDAExecutionProvider", mem, {"device_id": "0"},
                                         ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    opts = {"device_id": "0", "user_compute_stream": str(stream.cuda_stream), "use_tf32": "0",
            "arena_extend_strategy": "kSameAsRequested"}
    opts.update(extra)
    opts = {k: v for k, v in opts.items() if v is not None}
    data = graph(kind, t)
    m0 = used()
    sessions = []
    for _ in range(n):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.use_env_allocators", "1")
        sessions.append(ort.InferenceSession(data, so, providers=[("CUDAExecutionProvider", opts)]))
    m1 = used()
    x = np.random.default_rng(1).standard_normal((t, 576), np.float32)
    for s in sessions:
        s.run(None, {"x": x})
    torch.cuda.synchronize()
    m2 = used()
    return {"case": case, "n": n, "t": t, "base_mib": m0, "opened_mib": m1, "ran_mib": m2,
            "providers": sessions[0].get_providers()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.t)))
        return
    import onnxruntime as ort

    rows = []
    for case, (_, env, _) in CASES.items():
        if ONLY and case not in ONLY:
            continue
        got = {}
        for n in (1, 16):
            p = subprocess.run([sys.executable, __file__, "--out", str(a.out), "--t", str(a.t), "--child", case, str(n)],
                               check=False, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
            if p.returncode:
                got[n] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
            else:
                got[n] = json.loads(p.stdout.strip().splitlines()[-1])
        row = {"case": case, "env": env, "runs": got}
        if all("error" not in got[n] for n in got):
            row["per_session_open_mib"] = (got[16]["opened_mib"] - got[16]["base_mib"]
                                           - got[1]["opened_mib"] + got[1]["base_mib"]) / 15
            row["per_session_after_run_mib"] = (got[16]["ran_mib"] - got[1]["ran_mib"]) / 15
        rows.append(row)
        print(f"{case:28s} open/session {row.get('per_session_open_mib', float('nan')):7.1f} MiB   "
              f"after run/session {row.get('per_session_after_run_mib', float('nan')):7.1f} MiB   "
              + "  ".join(f"N={n}: {got[n].get('error') or round(got[n]['ran_mib'])}" for n in got), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "session_overhead.json").write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
