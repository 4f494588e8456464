"""SEA's ops in ONNX.

- `sea_edge::SparseAttention` (domain "sea_edge", version 1): inputs q (B, Hq, T, D), k, v (B, Hkv, S, D),
  idx (B, Hq, T, w) int32 (-1 = empty slot); attribute `scale`; output (B, Hq, T, D) in q's type. The layout and
  semantics of kernels/reference.py. Its schema is registered with onnx (so the checker and shape inference know
  it) and its CPU fallback ships in the model as an ONNX local function (a FunctionProto with the reference
  decomposition), so a stock onnxruntime runs the file with no plugin while a registered kernel for the op (our
  Triton one on GPU) takes priority.
- `sea_edge::ColumnScores` (same domain and version): inputs q (B, Hq, T, D), k (B, Hkv, S, D), key_valid (B, S)
  bool; attributes K, causal (0 or 1), scale; output (B, Hq, T, K) float: the estimate's content term,
  kernels.reference.column_scores_ref. Its body ships as a local function too (a Scan over blocks of rows).
- The mask construction (grouped top-k and interpolation, `sea_edge::sparse_index` in torch) is translated into
  standard ONNX ops, identical to kernels.reference.sparse_index_ref: ONNX TopK breaks ties towards the lower index,
  which is exactly the stable sort the reference uses.

The translations plug into the torch.onnx dynamo exporter through `custom_translation_table()`.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

__all__ = [
    "COLUMN_SCORES",
    "DOMAIN",
    "OP",
    "ROW_CHUNK",
    "VERSION",
    "attach_functions",
    "column_scores_function",
    "custom_translation_table",
    "register_schema",
    "sparse_attention_function",
]

DOMAIN, VERSION, OP = "sea_edge", 1, "SparseAttention"
COLUMN_SCORES = "ColumnScores"
ROW_CHUNK = 64
"""Query rows per step of the fallback's Scan: the gathered keys of a step, (B, Hq, 64, w, D) fp32, bound its memory
(about 38 MB for SmolLM2 at w = 128), where gathering all rows at once would cost T / 64 times that."""


def register_schema() -> None:
    """Register the ops' schemas with onnx (idempotent)."""
    P = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.Attribute
    if not onnx.defs.has(COLUMN_SCORES, DOMAIN):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            COLUMN_SCORES, DOMAIN, VERSION,
            doc="scale * q . (mean valid key of each of the query row's K compressed columns), 0 for a column "
                "without one; a causal row's columns split its own keys [0, pos] (kernels/reference.py).",
            inputs=[P("q", "T", "(B, Hq, T, D)"), P("k", "T", "(B, Hkv, S, D)"),
                    P("key_valid", "tensor(bool)", "(B, S) false for padding keys")],
            outputs=[P("scores", "tensor(float)", "(B, Hq, T, K)")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
            attributes=[A("K", onnx.defs.OpSchema.AttrType.INT, "compressed width"),
                        A("causal", onnx.defs.OpSchema.AttrType.INT, "1: a row's columns cover keys [0, pos]"),
                        A("scale", onnx.defs.OpSchema.AttrType.FLOAT, "score scale")],
        ))
    if onnx.defs.has(OP, DOMAIN):
        return
    schema = onnx.defs.OpSchema(
        OP, DOMAIN, VERSION,
        doc="Attention of each query row over the keys listed in idx (-1 = empty slot), softmax(q.k*scale) @ v; "
            "grouped-query heads (query head h reads key/value head h // (Hq / Hkv)); a row without keys is 0.",
        inputs=[P("q", "T", "(B, Hq, T, D)"), P("k", "T", "(B, Hkv, S, D)"), P("v", "T", "(B, Hkv, S, D)"),
                P("idx", "I", "(B, Hq, T, w) key indices, -1 = empty")],
        outputs=[P("output", "T", "(B, Hq, T, D)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
                          ("I", ["tensor(int32)", "tensor(int64)"], "index types")],
        attributes=[onnx.defs.OpSchema.Attribute("scale", onnx.defs.OpSchema.AttrType.FLOAT, "softmax scale")],
    )
    onnx.defs.register_schema(schema)


class _Builder:
    """A few helpers over onnx.helper for writing a node list by hand (1-d int64 shapes everywhere)."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix, self.n = prefix, 0

    def __call__(self, op_type: str, *inputs: str, n_out: int = 1, **attrs):
        outs = [f"{self.prefix}{self.n}_{i}" for i in range(n_out)]
        self.n += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=TensorProto.INT64):
        t = helper.make_tensor(f"{self.prefix}c{self.n}", dtype, [len(value)] if isinstance(value, list) else [],
                               value if isinstance(value, list) else [value])
        return self("Constant", value=t)

    def dim(self, shape: str, i: int) -> str:
        """shape[i] as a 1-d int64 tensor of one element."""
        return self("Slice", shape, self.const([i]), self.const([i + 1]))


def _rows(s: _Builder, qc: str, ic: str, kf: str, vf: str, scale: str) -> str:
    """Attention of a block of rows of every head: qc (B, Hkv, g, c, D), ic (B, Hkv, g, c, w) int64 key indices
    (-1 = empty), kf / vf (B, Hkv, S, D) fp32 -> (B, Hkv, g, c, D)."""
    shi = s("Shape", ic)
    bB, bH, bg, bc, bw = (s.dim(shi, i) for i in range(5))
    valid = s("GreaterOrEqual", ic, s.const(0))
    flat = s("Reshape", s("Max", ic, s.const(0)), s("Concat", bB, bH, s.const([-1, 1]), axis=0))  # (B, Hkv, g*c*w, 1)
    bD = s.dim(s("Shape", kf), 3)
    shape6 = s("Concat", bB, bH, bg, bc, bw, bD, axis=0)
    kg = s("Reshape", s("GatherND", kf, flat, batch_dims=2), shape6)  # (B, Hkv, g, c, w, D)
    vg = s("Reshape", s("GatherND", vf, flat, batch_dims=2), shape6)
    q6 = s("Unsqueeze", qc, s.const([4]))  # (B, Hkv, g, c, 1, D)
    logits = s("Mul", s("Squeeze", s("MatMul", q6, s("Transpose", kg, perm=[0, 1, 2, 3, 5, 4])), s.const([4])),
               scale)  # (B, Hkv, g, c, w)
    logits = s("Where", valid, logits, s.const(float("-inf"), TensorProto.FLOAT))
    p = s("Softmax", logits, axis=-1)
    p = s("Where", s("IsNaN", p), s.const(0.0, TensorProto.FLOAT), p)  # a row with no key at all -> 0
    return s("Squeeze", s("MatMul", s("Unsqueeze", p, s.const([4])), vg), s.const([4]))  # (B, Hkv, g, c, D)


def sparse_attention_function(opset: int, row_chunk: int | None = ROW_CHUNK) -> onnx.FunctionProto:
    """The reference decomposition of SparseAttention as a FunctionProto: rows are processed `row_chunk` at a time
    by a Scan (keys gathered per row with GatherND, softmax in fp32, empty rows 0); row_chunk None: every row in one
    step, no Scan (the decode graph, one row per sequence: a Scan of one iteration cost ~1 ms per layer and step on
    onnxruntime's CPU provider, a third of SEA's decode time at 4096 tokens).

    Grouped-query heads are not expanded: q (B, Hq, T, D) is viewed as (B, Hkv, g, T, D) (query head h = kv head
    h // g, a free reshape) and each row gathers from its own key/value head, so no (B, Hq, S, D) copy of the cache
    is made (per layer and per decode step that copy was 2 x Hq x S x D x 4 bytes: 19 MB at S = 4096 for SmolLM2)."""
    b = _Builder("sa_")
    qf, kf, vf = (b("Cast", x, to=TensorProto.FLOAT) for x in ("q", "k", "v"))
    shq, shk = b("Shape", "q"), b("Shape", "k")
    B, H, T, D = (b.dim(shq, i) for i in range(4))
    Hkv = b.dim(shk, 1)
    g = b("Div", H, Hkv)
    idx64 = b("Cast", "idx", to=TensorProto.INT64)
    w = b.dim(b("Shape", "idx"), 3)
    scale_node = helper.make_node("Constant", [], ["sa_scale"])  # value_float = the function's `scale`
    scale_node.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT))
    scale_node.attribute[0].ref_attr_name = "scale"
    b.nodes.append(scale_node)
    if row_chunk is None:
        o = _rows(b, b("Reshape", qf, b("Concat", B, Hkv, g, T, D, axis=0)),
                  b("Reshape", idx64, b("Concat", B, Hkv, g, T, w, axis=0)), kf, vf, "sa_scale")
        o = b("Reshape", o, b("Concat", B, H, T, D, axis=0))
    else:
        one, zero = b.const([1]), b.const([0])
        c = b("Min", T, b.const([row_chunk]))
        N = b("Div", b("Sub", b("Add", T, c), one), c)
        pad = b("Sub", b("Mul", N, c), T)
        rows = b("Concat", b.const([0, 0, 0, 0, 0, 0]), pad, zero, axis=0)  # pads: only the end of the T axis
        # (B, Hq, T, .) -> pad T -> (B, Hkv, g, N, c, .)
        qp = b("Reshape", b("Pad", qf, rows), b("Concat", B, Hkv, g, N, c, D, axis=0))
        ip = b("Reshape", b("Pad", idx64, rows, b.const(-1)), b("Concat", B, Hkv, g, N, c, w, axis=0))
        # Scan body: one block of rows of every head. Outer-scope values (kf, vf, sa_scale) are read directly.
        s = _Builder("sb_")
        s.nodes.append(helper.make_node("Identity", [_rows(s, "qc", "ic", kf, vf, "sa_scale")], ["oc"]))
        body = helper.make_graph(
            s.nodes, "sparse_attention_rows",
            [helper.make_tensor_value_info("qc", TensorProto.FLOAT, ["B", "Hkv", "g", "c", "D"]),
             helper.make_tensor_value_info("ic", TensorProto.INT64, ["B", "Hkv", "g", "c", "w"])],
            [helper.make_tensor_value_info("oc", TensorProto.FLOAT, ["B", "Hkv", "g", "c", "D"])],
        )
        o = b("Scan", qp, ip, body=body, num_scan_inputs=2, scan_input_axes=[3, 3], scan_output_axes=[3])
        o = b("Reshape", o, b("Concat", B, H, b("Mul", N, c), D, axis=0))  # (B, Hkv, g, N, c, D) -> (B, Hq, N c, D)
        o = b("Slice", o, zero, T, b.const([2]))
    b.nodes.append(helper.make_node("CastLike", [o, "q"], ["output"]))
    return helper.make_function(
        DOMAIN, OP, ["q", "k", "v", "idx"], ["output"], b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["scale"],
    )


def _attr_const(b: _Builder, name: str, kind: str, attr_type) -> str:
    """A Constant whose value is the function's attribute `name` (kind: "value_int" / "value_float")."""
    node = helper.make_node("Constant", [], [f"{b.prefix}attr_{name}"])
    node.attribute.append(helper.make_attribute_ref(kind, attr_type))
    node.attribute[0].ref_attr_name = name
    b.nodes.append(node)
    return node.output[0]


def column_scores_function(opset: int, row_chunk: int | None = ROW_CHUNK) -> onnx.FunctionProto:
    """kernels.reference.column_scores_ref as a FunctionProto. Each row's K + 1 column boundaries b_j, the valid
    keys' counts n_j, and Z_j = (the sum of q . k over the valid keys before b_j), so that the scores are
    (Z_j+1 - Z_j) * scale / n_j:
    - prefill (`row_chunk` rows per step of a Scan): Z = q . P[b] with P the prefix sums of the valid keys
      (B, Hkv, S + 1, D), gathered at a block of rows' boundaries: linear memory;
    - row_chunk None (the decode graph, one row per sequence): the row's logits q . k over all S keys (one GEMV per
      head) and their prefix sum, gathered at the boundaries. The prefix sums of the keys would be a (S x D) mask,
      sum and copy of the whole cache per layer and step (0.9 of 1.0 ms per layer at S = 4096 on 2 cores); the
      logits' are (S x 1). Quadratic in T, so only for a few rows."""
    b = _Builder("cs_")
    F = TensorProto.FLOAT
    qf, kf = b("Cast", "q", to=F), b("Cast", "k", to=F)
    vf = b("Cast", "key_valid", to=F)  # (B, S)
    shq, shk = b("Shape", "q"), b("Shape", "k")
    B, H, T, D = (b.dim(shq, i) for i in range(4))
    Hkv, S = b.dim(shk, 1), b.dim(shk, 2)
    g = b("Div", H, Hkv)
    one, zero = b.const([1]), b.const([0])
    K = b("Reshape", _attr_const(b, "K", "value_int", onnx.AttributeProto.INT), one)  # (1,) int64
    causal = b("Reshape", _attr_const(b, "causal", "value_int", onnx.AttributeProto.INT), one)
    scale = _attr_const(b, "scale", "value_float", onnx.AttributeProto.FLOAT)
    C = b("Pad", b("CumSum", vf, b.const(1)), b.const([0, 1, 0, 0]))  # (B, S + 1) valid keys before each position
    # L per row: S - causal * (T - 1 - t); column boundaries floor(j L / K), j = 0..K, in int64
    t = b("Range", b.const(0), b("Squeeze", T), b.const(1))
    L = b("Sub", S, b("Mul", causal, b("Sub", b("Sub", T, one), t)))  # (T,)
    j = b("Range", b.const(0), b("Squeeze", b("Add", K, one)), b.const(1))  # (K + 1,)
    bounds = b("Div", b("Mul", b("Unsqueeze", L, b.const([1])), j), K)  # (T, K + 1)
    cb = b("Gather", C, bounds, axis=1)  # (B, T, K + 1)
    n = b("Sub", b("Slice", cb, one, b("Add", K, one), b.const([2])), b("Slice", cb, zero, K, b.const([2])))
    inv = b("Div", scale, b("Max", n, b.const(1.0, F)))  # (B, T, K): 0 keys -> any value, Z's difference is 0
    q5 = b("Reshape", qf, b("Concat", B, Hkv, g, T, D, axis=0))  # (B, Hkv, g, T, D)
    if row_chunk is None:
        # logits (B, Hkv, g T, S) = q @ k^T (onnxruntime fuses the transpose into the product: no copy of the
        # cache), masked, summed along the keys and read at each row's boundaries
        gT = b("Mul", g, T)
        logits = b("MatMul", b("Reshape", q5, b("Concat", B, Hkv, gT, D, axis=0)), b("Transpose", kf, perm=[0, 1, 3, 2]))
        logits = b("Mul", logits, b("Reshape", vf, b("Concat", B, one, one, S, axis=0)))
        cum = b("Pad", b("CumSum", logits, b.const(3)), b.const([0, 0, 0, 1, 0, 0, 0, 0]))  # (B, Hkv, g T, S + 1)
        at = b("Reshape", b("Expand", bounds, b("Concat", B, Hkv, g, T, b("Add", K, one), axis=0)),
               b("Concat", B, Hkv, gT, b.const([-1]), axis=0))  # (B, Hkv, g T, K + 1)
        z = b("GatherElements", cum, at, axis=3)  # (B, Hkv, g T, K + 1)
    else:
        P = b("Pad", b("CumSum", b("Mul", kf, b("Unsqueeze", vf, b.const([1, 3]))), b.const(2)),
              b.const([0, 0, 1, 0, 0, 0, 0, 0]))  # (B, Hkv, S + 1, D)
        c = b("Min", T, b.const([row_chunk]))
        N = b("Div", b("Sub", b("Add", T, c), one), c)
        pad = b("Sub", b("Mul", N, c), T)
        qp = b("Reshape", b("Pad", q5, b("Concat", b.const([0, 0, 0, 0, 0, 0, 0, 0]), pad, zero, axis=0)),
               b("Concat", B, Hkv, g, N, c, D, axis=0))  # (B, Hkv, g, N, c, D)
        bp = b("Reshape", b("Pad", bounds, b("Concat", zero, zero, pad, zero, axis=0)),
               b("Concat", N, c, b.const([-1]), axis=0))  # (N, c, K + 1), padded rows -> boundary 0
        # Scan body: Z of one block of rows of every head, from the prefix sums gathered at its boundaries
        # (B, Hkv, c, K + 1, D), the block's one large tensor; the product takes them on the left so that only q
        # and Z are transposed. Outer-scope P is read directly.
        sb = _Builder("csb_")
        Pg = sb("Gather", P, "bc", axis=2)  # (B, Hkv, c, K + 1, D)
        zc = sb("MatMul", Pg, sb("Transpose", "qc", perm=[0, 1, 3, 4, 2]))  # (B, Hkv, c, K + 1, g)
        sb.nodes.append(helper.make_node("Transpose", [zc], ["zc"], perm=[0, 1, 4, 2, 3]))
        body = helper.make_graph(
            sb.nodes, "column_scores_rows",
            [helper.make_tensor_value_info("qc", F, ["B", "Hkv", "g", "c", "D"]),
             helper.make_tensor_value_info("bc", TensorProto.INT64, ["c", "K1"])],
            [helper.make_tensor_value_info("zc", F, ["B", "Hkv", "g", "c", "K1"])],
        )
        z = b("Scan", qp, bp, body=body, num_scan_inputs=2, scan_input_axes=[3, 0], scan_output_axes=[3])
        z = b("Slice", b("Reshape", z, b("Concat", B, Hkv, g, b("Mul", N, c), b.const([-1]), axis=0)), zero, T,
              b.const([3]))  # (B, Hkv, g, T, K + 1)
    z = b("Reshape", z, b("Concat", B, H, T, b.const([-1]), axis=0))  # (B, Hq, T, K + 1)
    dz = b("Sub", b("Slice", z, one, b("Add", K, one), b.const([3])), b("Slice", z, zero, K, b.const([3])))
    b.nodes.append(helper.make_node("Mul", [dz, b("Unsqueeze", inv, one)], ["scores"]))
    return helper.make_function(
        DOMAIN, COLUMN_SCORES, ["q", "k", "key_valid"], ["scores"], b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["K", "causal", "scale"],
    )


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_functions(model: onnx.ModelProto, opset: int | None = None, row_chunk: int | None = ROW_CHUNK
                     ) -> onnx.ModelProto:
    """Add (or replace) the function bodies of the sea_edge ops the graph uses (SparseAttention, ColumnScores), at
    the model's default opset unless `opset` is given (the checker wants a function to import the model's own
    version), and the sea_edge opset import (in place). `row_chunk`: as sparse_attention_function (None for the
    decode graph)."""
    opset = default_opset(model) if opset is None else opset
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in (OP, COLUMN_SCORES))]
    del model.functions[:]
    model.functions.extend([*keep, sparse_attention_function(opset, row_chunk)])
    if COLUMN_SCORES in used:
        model.functions.append(column_scores_function(opset, row_chunk))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model


# -- torch.onnx (dynamo) translations -----------------------------------------------------------------------------

def custom_translation_table() -> dict:
    """{torch op overload: onnxscript translation} for torch.onnx.export(..., custom_translation_table=...)."""
    import onnxscript
    import sea_edge.kernels  # noqa: F401  (registers the torch ops)
    import torch
    from onnxscript import opset18 as op

    register_schema()  # onnxscript looks the op up in onnx's schema registry
    sea = onnxscript.values.Opset(DOMAIN, VERSION)
    INT64, INT32, DOUBLE = onnxscript.INT64.dtype, onnxscript.INT32.dtype, onnxscript.DOUBLE.dtype

    def ints(*v):
        return op.Constant(value_ints=list(v))

    def f64(x: float):
        return op.Constant(value=helper.make_tensor("value", TensorProto.DOUBLE, [], [x]))

    def i32(x: int):
        return op.Constant(value=helper.make_tensor("value", TensorProto.INT32, [], [x]))

    def i64(x):
        """A python int or a symbolic size (an int64 value of the graph) -> 1-d int64 of one element."""
        if isinstance(x, int):
            return op.Constant(value_ints=[x])
        return op.Reshape(op.Cast(x, to=INT64), op.Constant(value_ints=[1]))

    def sparse_attention(q, k, v, idx, scale: float):
        return sea.SparseAttention(q, k, v, idx, scale=float(scale))

    def column_scores(q, k, key_valid, K: int, causal: bool, scale: float):
        if key_valid is None:  # the op's key_valid input is not optional: every key valid
            shk = op.Shape(k)
            key_valid = op.Expand(op.Constant(value=helper.make_tensor("value", TensorProto.BOOL, [], [True])),
                                  op.Concat(op.Slice(shk, ints(0), ints(1)), op.Slice(shk, ints(2), ints(3)),
                                            axis=0))
        return sea.ColumnScores(q, k, key_valid, K=int(K), causal=int(bool(causal)), scale=float(scale))

    def _distinct_keys(probs, selectable, H, K):
        """Softmax probabilities (B, H, T, K), all >= 0, and the row's selectable columns (T, K) -> fp64 keys that
        order as the probabilities do, with every tie broken towards the lower (head, column): the reference's
        stable sorts. TopK's order among equal values is the provider's choice (the CUDA provider's differs from
        the CPU's, and at short lengths many scores are equal: zeros from the softmax, unselectable columns), so
        the selection must not depend on it.

        With t = H*K - (h*K + j) in [1, 2^23): a selectable p becomes p (1 + t 2^-48) + t 2^-1000. For p > 0 (at
        least 2^-149, fp32's smallest) the product moves p by less than half an fp32 step (2^-24 relative) and
        keeps distinct t apart by 8 fp64 steps, and the added term is far below half an fp64 step of it (it
        changes nothing); a zero becomes t 2^-1000, between 0 and every positive fp32 number, a normal fp64. A
        column outside the row's span becomes -2^1000 (1 - t 2^-48), below every real key and finite: the CUDA
        provider's TopK returns wrong values and out-of-range indices for k = n > 1024 when -inf is among the
        values (onnxruntime-gpu 1.31.1 on an H200, f32 and f64: runtime/results/gpu_h200/topk_probe.json), the
        very case of the candidates' full ranking at short lengths. Such columns never count: keep requires a key
        above -2^999. Four ops on (B, H, T, K) fp64 (Cast, Mul, Add, Where): the general form with sign, zero and
        -inf tests took ten, about 2 s of a 30 s prefill at T = 4096 on 2 cores."""
        HK = op.Mul(H, K)  # H, K: 1-d sizes
        n = op.Range(op.Constant(value_int=0), op.Squeeze(HK), op.Constant(value_int=1))
        t = op.Cast(op.Sub(HK, n), to=DOUBLE)  # (H*K,): H*K .. 1
        t = op.Reshape(t, op.Concat(ints(1), H, ints(1), K, axis=0))  # (1, H, 1, K)
        one, step = f64(1.0), op.Mul(t, f64(2.0 ** -48))
        kept = op.Add(op.Mul(op.Cast(probs, to=DOUBLE), op.Add(one, step)), op.Mul(t, f64(2.0 ** -1000)))
        return op.Where(selectable, kept, op.Mul(f64(-(2.0 ** 1000)), op.Sub(one, step)))

    def sparse_index(probs, key_valid, n_cols, head_cap, S, causal: bool, n_keys: int, span):
        """kernels.reference.sparse_index_ref in ONNX: select_columns_ref then expand_columns_ref."""
        shp = op.Shape(probs)
        B, H, T, K = (op.Slice(shp, ints(i), ints(i + 1)) for i in range(4))
        S, n_cols, head_cap, span = i64(S), i64(n_cols), i64(head_cap), i64(span)
        one = op.Constant(value_ints=[1])
        Ts, Ss, Ks = (op.Squeeze(x) for x in (T, S, K))
        # L per query row: the keys its K columns span
        if causal:
            L = op.Range(op.Add(op.Sub(Ss, Ts), op.Constant(value_int=1)), op.Add(Ss, op.Constant(value_int=1)),
                         op.Constant(value_int=1))
        else:
            L = op.Expand(S, T)
        Lc = op.Unsqueeze(L, ints(1))  # (T, 1)
        j = op.Range(op.Constant(value_int=0), Ks, op.Constant(value_int=1))  # (K,)
        selectable = op.Greater(op.Div(op.Mul(op.Add(j, op.Constant(value_int=1)), Lc), Ks),
                                op.Div(op.Mul(j, Lc), Ks))  # (T, K)
        p = _distinct_keys(probs, selectable, H, K)
        # (1) each head's top c columns; (2) the top n_row of the H*c candidates of a token, head-major
        c = op.Min(head_cap, K)
        vals, cols = op.TopK(p, c, axis=-1, largest=1, sorted=1)  # (B, H, T, c)
        flat = op.Reshape(op.Transpose(vals, perm=[0, 2, 1, 3]), op.Concat(B, T, ints(-1), axis=0))  # (B, T, H*c)
        Hc = op.Mul(H, c)
        _, order = op.TopK(flat, Hc, axis=-1, largest=1, sorted=1)
        if n_keys > 0:  # reference.row_columns: rows whose columns span fewer keys keep more of them
            n_row = op.Max(op.Div(op.Constant(value_int=n_keys),
                                  op.Div(op.Sub(op.Add(L, Ks), op.Constant(value_int=1)), Ks)),
                           op.Constant(value_int=1))
        else:
            n_row = op.Expand(n_cols, T)
        rank = op.Range(op.Constant(value_int=0), op.Squeeze(Hc), op.Constant(value_int=1))  # (H*c,)
        in_budget = op.Cast(op.Less(op.Unsqueeze(rank, ints(0)), op.Unsqueeze(n_row, ints(1))), to=INT64)  # (T, H*c)
        keep = op.ScatterElements(op.Expand(op.Constant(value_int=0), op.Shape(flat)), order,
                                  op.Expand(in_budget, op.Shape(flat)), axis=-1)
        keep = op.And(op.Cast(keep, to=onnxscript.BOOL.dtype),
                      op.Greater(flat, f64(-(2.0 ** 999))))
        keep = op.Transpose(op.Reshape(keep, op.Concat(B, T, H, c, axis=0)), perm=[0, 2, 1, 3])  # (B, H, T, c)
        cols = op.Where(keep, cols, Ks)
        cols, _ = op.TopK(cols, c, axis=-1, largest=0, sorted=1)  # ascending, unused (= K) last
        cols = op.Where(op.Equal(cols, Ks), op.Constant(value_int=-1), cols)
        # interpolation: column j of a row covers keys [floor(j L / K), floor((j + 1) L / K)); the products in
        # int64 (j L can pass 2^31 at long context), the (B, H, T, c, span) keys and their compaction in int32, the
        # output's type (half the bytes of int64 on the largest tensors of the mask)
        colc = op.Max(cols, op.Constant(value_int=0))
        L4 = op.Reshape(L, op.Constant(value_ints=[1, 1, -1, 1]))
        start = op.Cast(op.Div(op.Mul(colc, L4), Ks), to=INT32)
        end = op.Cast(op.Div(op.Mul(op.Add(colc, op.Constant(value_int=1)), L4), Ks), to=INT32)
        key = op.Add(op.Unsqueeze(start, ints(-1)), op.Range(i32(0), op.Cast(op.Squeeze(span), to=INT32),
                                                          i32(1)))  # (B, H, T, c, span)
        ok = op.And(op.Unsqueeze(op.GreaterOrEqual(cols, op.Constant(value_int=0)), ints(-1)),
                    op.Less(key, op.Unsqueeze(end, ints(-1))))
        if key_valid is not None:
            kv = op.Cast(key_valid, to=INT32)  # (B, S)
            last = op.Cast(op.Sub(S, one), to=INT32)
            got = op.GatherElements(kv, op.Reshape(op.Min(key, last), op.Concat(B, ints(-1), axis=0)), axis=1)
            ok = op.And(ok, op.Cast(op.Reshape(got, op.Shape(key)), to=onnxscript.BOOL.dtype))
        # Compaction: valid keys keep their (ascending) order and move to the front, holes (-1) after. A cumulative
        # count gives each valid key its slot; holes are all written to one extra slot that is cut off. (Not a
        # TopK: its unread second output, as large as idx, stays allocated until the run ends in onnxruntime.)
        w = op.Mul(c, span)
        shape4 = op.Concat(B, H, T, w, axis=0)
        ok = op.Reshape(ok, shape4)
        key = op.Reshape(key, shape4)
        slot = op.Sub(op.CumSum(op.Cast(ok, to=INT32), op.Constant(value_int=-1)), i32(1))
        slot = op.Where(ok, slot, op.Cast(op.Squeeze(w), to=INT32))  # holes -> the extra slot w
        minus1 = i32(-1)
        dst = op.Expand(minus1, op.Concat(B, H, T, op.Add(w, one), axis=0))
        idx = op.ScatterElements(dst, slot, op.Where(ok, key, minus1), axis=-1)  # (B, H, T, w + 1) int32
        return op.Slice(idx, ints(0), w, ints(3))

    return {
        torch.ops.sea_edge.sparse_attention.default: sparse_attention,
        torch.ops.sea_edge.column_scores.default: column_scores,
        torch.ops.sea_edge.sparse_index.default: sparse_index,
    }
