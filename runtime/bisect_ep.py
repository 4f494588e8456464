"""Where does an execution provider part from the CPU one? Each segment of a split export graph runs on the CPU
provider and on another one (CUDA) on the very same inputs (the CPU's values, carried from segment to segment), so a
segment's difference is its own, not one accumulated upstream; the first segment that differs is then run again with
every intermediate value as an output, to name the first node that differs, and at each optimization level, to tell
a kernel from an optimizer's fusion. Plain `InferenceSession.run` with numpy on both sides: no IO binding, no torch,
no Triton: what differs is onnxruntime's.

    python -m sea_edge.runtime.bisect_ep DIR [--seq-len 256] [--decode] [--provider CUDAExecutionProvider]
        [--out report.json]

--decode bisects the decode graph: one token after a CPU prefill of --seq-len tokens (its KV cache and SEA state
as the past). Prints a table per segment (worst relative difference of its outputs) and the verdict; writes JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from sea_edge.errors import SeaEdgeError

__all__ = ["bisect"]

_LEVELS = ("all", "extended", "basic", "off")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|b|, 1e-6) over finite entries; inf where the finite/non-finite pattern differs."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return float(np.mean(a != b)) if a.size else 0.0  # share of entries that differ
    fa, fb = np.isfinite(a), np.isfinite(b)
    if (fa != fb).any() or (a[~fa] != b[~fb]).any():
        return float("inf")
    if not fa.any():
        return 0.0
    d = np.abs(a[fa].astype(np.float64) - b[fb].astype(np.float64)).max()
    return float(d / max(float(np.abs(b[fb]).max()), 1e-6))


def _session(ort, model: bytes, folder: Path, provider: str, level: str = "all"):
    from .executor import EXTERNAL_DATA_FOLDER
    from .ort_workarounds import disabled_optimizers

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.log_severity_level = 3
    so.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(folder).resolve()))
    providers = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]
    if provider == "CUDAExecutionProvider":
        providers[0] = (provider, {"use_tf32": "0"})
    off = disabled_optimizers(ort)
    return ort.InferenceSession(model, so, providers=providers, **({"disabled_optimizers": off} if off else {}))


def _expose_all(model: bytes) -> tuple[bytes, list[str]]:
    """The segment with every typed node output as a graph output (shape inference gives the types)."""
    import onnx

    m = onnx.load_from_string(model)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    types = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    have = {o.name for o in m.graph.output}
    names = []
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have and o in types and types[o].type.tensor_type.elem_type:
                m.graph.output.append(types[o])
                have.add(o)
                names.append(o)
    return m.SerializeToString(), names


def _feeds(sess_cpu, seq_len: int, decode: bool) -> tuple[dict, str]:
    """Graph feeds: a validation window (prefill), or one token after a CPU prefill of it (decode)."""
    from sea_edge.data import load_corpus

    from .perplexity import token_windows

    ids = np.ascontiguousarray(token_windows(sess_cpu.tokenizer, load_corpus("validation"), seq_len, 1), np.int64)
    B, T = ids.shape
    mask, pos = np.ones((B, T), np.int64), np.arange(T, dtype=np.int64)[None].repeat(B, 0)
    if not decode:
        return sess_cpu._feeds(sess_cpu._prefill, ids, mask, pos, None), sess_cpu._files["prefill"]
    logits, state = sess_cpu._run(sess_cpu._prefill, ids, mask, pos, None)
    tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask = np.ones((B, T + 1), np.int64)
    state = {k: np.asarray(v) for k, v in state.items()}
    return sess_cpu._feeds(sess_cpu._decode, tok, mask, np.full((B, 1), T, np.int64), state), sess_cpu._files["decode"]


def bisect(folder: str | Path, seq_len: int = 256, decode: bool = False, provider: str = "CUDAExecutionProvider",
           tol: float = 1e-3, progress=print) -> dict:
    import onnxruntime as ort

    from . import SeaSession
    from .executor import NumpyBackend, run_op
    from .segments import load_plan

    folder = Path(folder)
    if provider not in ort.get_available_providers():
        raise SeaEdgeError(f"onnxruntime {ort.__version__} has no {provider} (providers: "
                           f"{', '.join(ort.get_available_providers())})")
    cpu = SeaSession(folder, verify=False)
    feeds, file = _feeds(cpu, seq_len, decode)
    plan = load_plan(folder, file)
    values = dict(feeds)
    rows, first, numpy_ops = [], None, NumpyBackend()
    for step in plan.steps:
        if step.kind == "op":  # the split nodes by their NumPy twins, on both sides
            values[step.outputs[0]] = run_op(numpy_ops, step, values)
            continue
        model = plan.segment_bytes(step)
        ins = {x: values[x] for x in step.inputs if x in values}
        outs = list(step.outputs)
        ref = dict(zip(outs, _session(ort, model, folder, "CPUExecutionProvider").run(outs, ins)))
        got = dict(zip(outs, _session(ort, model, folder, provider).run(outs, ins)))
        diffs = {o: _rel(got[o], ref[o]) for o in outs}
        worst = max(diffs, key=diffs.get) if diffs else None
        row = {"segment": step.name, "nodes": step.nodes, "worst_output": worst,
               "worst_rel_diff": diffs.get(worst, 0.0) if worst else 0.0}
        rows.append(row)
        progress(f"{step.name:>14} {step.nodes:5d} nodes  worst {row['worst_rel_diff']:.3g}  ({worst})")
        if first is None and row["worst_rel_diff"] > tol:
            first = (step, model, ins, outs)
        values.update(ref)
    report = {"folder": str(folder), "graph": file, "seq_len": seq_len, "decode": decode, "provider": provider,
              "onnxruntime": ort.__version__, "tol": tol, "segments": rows, "first_bad_segment": None}
    if first is None:
        report["verdict"] = f"every segment within {tol:g} of the CPU provider"
        return report
    step, model, ins, outs = first
    levels = {}
    for lvl in _LEVELS:
        got = _session(ort, model, folder, provider, lvl).run(outs, ins)
        ref = _session(ort, model, folder, "CPUExecutionProvider", lvl).run(outs, ins)
        levels[lvl] = max(_rel(a, b) for a, b in zip(got, ref))
    exposed, names = _expose_all(model)
    want = outs + names
    got = dict(zip(want, _session(ort, exposed, folder, provider, "off").run(want, ins)))
    ref = dict(zip(want, _session(ort, exposed, folder, "CPUExecutionProvider", "off").run(want, ins)))
    import onnx

    producer = {o: n for n in onnx.load_from_string(model).graph.node for o in n.output}
    nodes = []
    for name in names:  # graph order: the first one over tol is where it starts
        d = _rel(got[name], ref[name])
        if d > tol:
            n = producer[name]
            nodes.append({"value": name, "op": n.op_type, "node": n.name, "rel_diff": d,
                          "shape": list(np.shape(ref[name])), "dtype": str(np.asarray(ref[name]).dtype),
                          "inputs": list(n.input)})
            if len(nodes) >= 8:
                break
    report["first_bad_segment"] = {"segment": step.name, "by_optimization_level": levels,
                                   "exposed_values": len(names), "first_bad_nodes": nodes}
    where = nodes[0] if nodes else None
    report["verdict"] = (f"{step.name} differs ({levels}); with optimizations off and every value exposed, the first "
                         f"value over {tol:g} is " + (f"{where['value']} of {where['op']} {where['node']!r} "
                                                       f"(rel diff {where['rel_diff']:.3g})" if where else "none"))
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sea_edge.runtime.bisect_ep", description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--decode", action="store_true")
    p.add_argument("--provider", default="CUDAExecutionProvider")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--out")
    a = p.parse_args(argv)
    try:
        r = bisect(a.folder, a.seq_len, a.decode, a.provider, a.tol)
    except SeaEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(r["verdict"])
    if r["first_bad_segment"]:
        for n in r["first_bad_segment"]["first_bad_nodes"]:
            print(f"  {n['op']:>20} {n['node']:<50} {n['rel_diff']:.3g} {n['shape']} {n['dtype']}")
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
