"""The estimate's content term, one layer: sea_edge.ColumnScores as onnxruntime runs its ONNX function body (what a
segment ran before the runtime split at the node) against our Triton kernel (what the split runs), side by side.

    python -m sea_edge.runtime.bench_column_scores [--lengths 1024,4096,16384] [--heads 9/3] [--out DIR]

One graph with one ColumnScores node (B = 1, fp32, causal, K = 256, D = 64: SmolLM2's prefill), its body attached
by sea_edge.export.onnx_ops; onnxruntime on its CUDA provider when onnxruntime-gpu is installed (IO binding on the
torch tensors: no copy is timed), else on the CPU provider (one call, with its copies). The Triton kernel on the
same tensors; medians of CUDA-event timings (triton.testing.do_bench). Prints the machine, versions and a table (ms
per call, the ratio, the max |difference| of the two outputs); writes bench_column_scores.json to --out. Needs torch, onnx and onnxruntime (and for the GPU, CUDA and triton);
without CUDA it checks itself on the CPU: onnxruntime's CPU provider against the torch reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _graph(Hq: int, Hkv: int, D: int, K: int, scale: float) -> bytes:
    import onnx
    from onnx import TensorProto, helper
    from sea_edge.export.onnx_ops import COLUMN_SCORES, DOMAIN, attach_functions, register_schema

    register_schema()
    F = TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node(COLUMN_SCORES, ["q", "k", "key_valid"], ["scores"], domain=DOMAIN, K=K, causal=1,
                          scale=scale)],
        "column_scores",
        [helper.make_tensor_value_info("q", F, [1, Hq, "T", D]),
         helper.make_tensor_value_info("k", F, [1, Hkv, "T", D]),
         helper.make_tensor_value_info("key_valid", TensorProto.BOOL, [1, "T"])],
        [helper.make_tensor_value_info("scores", F, [1, Hq, "T", K])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    attach_functions(m)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _time_ms(fn) -> float:
    """Median ms of `fn` (triton.testing.do_bench: CUDA events around each call; onnxruntime's run returns only when
    its stream is done, so the events bound its work too)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--heads", default="9/3", help="query/key heads")
    p.add_argument("--out", type=Path, default=Path("bench_column_scores"))
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        import triton
        from sea_edge.kernels.triton_column_scores import column_scores_triton as kernel
        kernel_name, version = "Triton", f"triton {triton.__version__}"
    else:  # a CPU check of the program: the torch reference in place of the kernel
        from sea_edge.kernels.reference import column_scores_ref as kernel
        kernel_name, version = "reference", "torch reference (no CUDA)"
    Hq, Hkv = (int(x) for x in args.heads.split("/"))
    D, K, scale = 64, 256, 64**-0.5
    cuda_ep = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(_graph(Hq, Hkv, D, K, scale), so,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_ep
                                else ["CPUExecutionProvider"])
    dev = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name() if cuda else "no GPU"
    head = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}",
            "versions": {"torch": torch.__version__, "kernel": version, "onnxruntime": ort.__version__,
                         "provider": sess.get_providers()[0]},
            "shape": {"B": 1, "Hq": Hq, "Hkv": Hkv, "D": D, "K": K, "causal": True, "dtype": "fp32"}}
    print(f"machine: {head['machine']}\nversions: {head['versions']}\nshape: {head['shape']}")
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device=dev).manual_seed(T)
        q = torch.randn(1, Hq, T, D, device=dev, generator=g)
        k = torch.randn(1, Hkv, T, D, device=dev, generator=g)
        valid = torch.ones(1, T, dtype=torch.bool, device=dev)

        def kernel_call(q=q, k=k, valid=valid):
            return kernel(q, k, K, True, scale, valid)

        ref = kernel_call()
        if cuda_ep:
            out = torch.empty(1, Hq, T, K, device=dev)
            io = sess.io_binding()
            for name, t, typ in (("q", q, np.float32), ("k", k, np.float32), ("key_valid", valid, np.bool_)):
                io.bind_input(name, "cuda", 0, typ, list(t.shape), t.data_ptr())
            io.bind_output("scores", "cuda", 0, np.float32, list(out.shape), out.data_ptr())
            body, ker = _time_ms(lambda io=io: sess.run_with_iobinding(io)), _time_ms(kernel_call)
            got = out
        else:
            feeds = {"q": q.cpu().numpy(), "k": k.cpu().numpy(), "key_valid": valid.cpu().numpy()}
            t0 = time.perf_counter()
            got = torch.from_numpy(sess.run(None, feeds)[0]).to(dev)
            body = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            kernel_call()
            ker = (time.perf_counter() - t0) * 1e3
        diff = float((got - ref).abs().max())
        rows.append({"T": T, "onnx_body_ms": body, "kernel_ms": ker, "body_over_kernel": body / ker,
                     "max_abs_diff": diff, "scale_of_scores": float(ref.abs().max())})
        print(f"  T={T}: body {body:.3f} ms, {kernel_name} {ker:.3f} ms, max |diff| {diff:.2e}", flush=True)
    kn = f"{kernel_name} ms"
    print(f"\n{'T':>6} | {'ONNX body ms':>12} {kn:>12} {'body/kernel':>11} | {'x 30 layers: body s':>19} "
          f"{'kernel s':>9} | max |diff|")
    for r in rows:
        print(f"{r['T']:>6} | {r['onnx_body_ms']:>12.3f} {r['kernel_ms']:>12.3f} {r['body_over_kernel']:>11.1f} | "
              f"{r['onnx_body_ms'] * 30e-3:>19.3f} {r['kernel_ms'] * 30e-3:>9.4f} | {r['max_abs_diff']:.2e} "
              f"(scores up to {r['scale_of_scores']:.1f})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_column_scores.json").write_text(json.dumps({**head, "rows": rows}, indent=1))
    print(f"\nwrote bench_column_scores.json to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
