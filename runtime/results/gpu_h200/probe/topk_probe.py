"""CUDA provider vs CPU provider on TopK (and the exported mask graph): run on the GPU machine."""
import json, os, sys, time
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
import onnx

out = os.environ.get("OUT", "/tmp")
print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)

def sess(m, prov):
    so = ort.SessionOptions(); so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    p = [(prov, {"use_tf32": "0"}), "CPUExecutionProvider"] if prov.startswith("CUDA") else [prov]
    return ort.InferenceSession(m.SerializeToString(), so, providers=p)

def topk_model(dt, N, k, largest):
    x = helper.make_tensor_value_info("x", dt, [1, None, N])
    kk = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    n = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=largest, sorted=1)
    g = helper.make_graph([n], "g", [x], [helper.make_tensor_value_info("v", dt, None),
                                           helper.make_tensor_value_info("i", TensorProto.INT64, None)], [kk])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)

rows = []
rng = np.random.default_rng(0)
for dtn, dt, npdt in (("f32", TensorProto.FLOAT, np.float32), ("f64", TensorProto.DOUBLE, np.float64),
                      ("i64", TensorProto.INT64, np.int64)):
    for N in (128, 1152, 2304, 4608):
        for k in sorted({N, N // 2, 64, 5}):
            for content in ("distinct", "neg_inf30", "neg_big30", "zeros40", "ties"):
                if dtn == "i64" and content != "ties" and content != "distinct":
                    continue
                T = 256
                if dtn == "i64":
                    x = (rng.integers(0, 8, (1, T, N)) if content == "ties" else
                         np.argsort(rng.random((1, T, N)), -1)).astype(npdt)
                else:
                    x = rng.standard_normal((1, T, N)).astype(npdt)
                    if content == "neg_inf30": x[rng.random(x.shape) < 0.3] = -np.inf
                    if content == "neg_big30": x[rng.random(x.shape) < 0.3] = -1e30 if npdt == np.float32 else -1e300
                    if content == "zeros40": x[rng.random(x.shape) < 0.4] = 0
                    if content == "ties": x = np.round(x * 2) / 2
                for largest in (1, 0):
                    m = topk_model(dt, N, k, largest)
                    (vc, ic), (vg, ig) = sess(m, "CPUExecutionProvider").run(None, {"x": x}), sess(m, "CUDAExecutionProvider").run(None, {"x": x})
                    ref = -np.sort(-x, -1)[..., :k] if largest else np.sort(x, -1)[..., :k]
                    r = dict(dtype=dtn, N=N, k=k, content=content, largest=largest,
                             cpu_values_ok=bool(np.array_equal(vc, ref)), cuda_values_ok=bool(np.array_equal(vg, ref)),
                             cuda_indices_match_cpu=float(np.mean(ig == ic)),
                             cuda_indices_in_range=bool(((ig >= 0) & (ig < N)).all()),
                             cuda_indices_consistent=bool(((ig >= 0) & (ig < N)).all() and np.array_equal(np.take_along_axis(x, np.clip(ig, 0, N - 1), -1), vg)))
                    rows.append(r)
                    if not (r["cuda_values_ok"] and r["cuda_indices_consistent"]) or (content == "distinct" and r["cuda_indices_match_cpu"] < 0.999):
                        print("BAD", r, flush=True)
bad = [r for r in rows if not (r["cuda_values_ok"] and r["cuda_indices_consistent"])]
print("BAD cases (values or indices wrong):", sorted({(r["dtype"], r["N"], r["k"], r["content"]) for r in bad}))
print(f"{len(rows)} TopK cases; bad: {sum(not (r['cuda_values_ok'] and r['cuda_indices_consistent']) for r in rows)}", flush=True)
json.dump(rows, open(f"{out}/topk_probe.json", "w"), indent=1)

# the exported mask graph (sea_edge::sparse_index's translation), saved with inputs by the local machine
here = os.path.dirname(os.path.abspath(__file__))
mask_rows = []
for f in sorted(os.listdir(here)):
    if not f.startswith("mask_") or not f.endswith(".onnx"):
        continue
    m = onnx.load(os.path.join(here, f))
    inferred = onnx.shape_inference.infer_shapes(m)
    have = {o.name for o in m.graph.output}
    for vi in inferred.graph.value_info:
        if vi.name not in have and vi.type.tensor_type.elem_type:
            m.graph.output.append(vi); have.add(vi.name)
    names = [o.name for o in m.graph.output]
    prod = {o: n for n in m.graph.node for o in n.output}
    order = {n.name: i for i, n in enumerate(m.graph.node)}
    sc, sg = sess(m, "CPUExecutionProvider"), sess(m, "CUDAExecutionProvider")
    for nz in sorted(x for x in os.listdir(here) if x.startswith("in_T")):
        feeds = dict(np.load(os.path.join(here, nz)))
        a, b = sc.run(None, feeds), sg.run(None, feeds)
        row = dict(graph=f, inputs=nz, idx_equal=bool(np.array_equal(a[0], b[0])), idx_share_differing=float(np.mean(a[0] != b[0])))
        bad = []
        for nm, x, y in zip(names, a, b):
            same = x.shape == y.shape and (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else np.array_equal(x, y))
            if not same:
                n = prod.get(nm)
                bad.append((order.get(n.name, -1) if n else -1, nm, n.op_type if n else "?", list(x.shape), str(x.dtype)))
        bad.sort()
        row["first_differing"] = bad[:3]
        mask_rows.append(row)
        print(row, flush=True)
json.dump(mask_rows, open(f"{out}/mask_probe.json", "w"), indent=1)
