"""Weight-only quantization of an exported ONNX graph's Linear weights, with exactly the numbers of
`sea_edge.quantize` (same quantizer, same blocks: along the reduction dimension, `block_size` weights per scale).

What torch.onnx (dynamo=True, torch 2.13, opset 20) emits for nn.Linear:
- a 2-D input: Gemm(x, W, b; transB=1), W the (N, K) parameter itself, named like its state_dict key ("0.weight");
- a higher-rank input: MatMul(x, Wt) [+ Add(b)], Wt a folded (K, N) transpose named "val_<i>"; the module path
  survives only in the node's metadata (the last but one entry of "pkg.torch.onnx.name_scopes").
Each weight is named here "<module path>.weight" when the metadata gives the path (the state_dict key, and the key of
`sea_edge.quantize.quantized_state`), else by its initializer's name.

Rewrites (every other node, the model-local functions and the other domains' opset imports are left as they are):
- int8: W -> DequantizeLinear(codes, scales; axis = the reduction axis of W, block_size) whose output feeds the
  same MatMul / Gemm input. Codes are an INT8 initializer, scales fp32 with ceil(K / B) entries along the axis
  (the last block of a row may be short, as in sea_edge.quantize). Blocked DequantizeLinear needs the default
  domain at opset >= 21: an import of 18-20 is raised to 21 unless the graph holds an op whose meaning changed on the
  way (GroupNormalization, DFT, GridSample), which is refused; below 18, re-export.
- int4: y = x @ W^T with W = q * scale + min (GGUF's Q4_1) becomes two products, MatMul / Gemm ->
      com.microsoft.MatMulNBits(x, codes, Cast(scales), zero points 0; bits 4, block_size, accuracy_level)
    + MatMul(MatMul(x, S), Cast(mins)^T)   [+ Add(C) for a Gemm bias]
  where S is the (K, ceil(K / B)) 0/1 matrix summing x over each block (one per K and block size, shared by every
  weight; and x @ S is computed once per input that several weights read, as q / k / v). B is (N, ceil(K / B),
  B / 2) uint8 (element 2j of a block in the low nibble, the last block zero-padded); scales and mins are fp16
  initializers (sea_edge.quantize rounded them so) cast to fp32, a Cast onnxruntime folds at load. The offset could
  be a float zero point of MatMulNBits ((q - zero) * scale), but onnxruntime 1.32 runs float zero points on a slow
  path (30x slower at one token a step, measured) and no int8-activation kernel; integer zero points cannot place a
  Q4_1 grid. The default domain needs no new opset (MatMul, Cast).
- nf4: MatMul / Gemm -> com.microsoft.MatMulBnb4(x, codes, absmax; K, N, block_size, quant_type=1) [+ Add(C) for a Gemm
  bias]. MatMulBnb4 reads the flattened (N, K) weight with flat element 2j in the high nibble and one absmax per block
  of the flat index (onnxruntime contrib_ops/cpu/quantization/blockwise_quant_block_bnb4.h): bitsandbytes'
  quantize_4bit layout as it is, so its packed codes go in unchanged.

Only nodes of the main graph are rewritten (weights used inside a subgraph or by any other node are left as fp32).

Same numbers: quantized here (on CPU), a weight gets the codes and scales that sea_edge.quantize gives it on CPU.
On CUDA, bitsandbytes' int8 kernel breaks near-ties differently in ~0.1 % of the codes: to export a model quantized
there, pass `weights=quantized_state(model)`.

In onnxruntime (1.32, CPU): with graph optimizations on, DequantizeLinear (int8, axis 0) + MatMul is fused
into MatMulNBits, whose default accuracy level 4 quantizes the activations to int8 as well (~1e-2 relative error);
the session config entry "session.qdq_matmulnbits_accuracy_level" = "1" keeps them fp32 (~1e-7). A Gemm reading a
DequantizeLinear is not fused. The int4 MatMulNBits written here carries its accuracy level as an attribute (1 by
default; the offset product stays fp32). MatMulBnb4's CPU kernel dequantizes the whole weight to fp32 on every call, then runs
an fp32 GEMM: nf4 saves file size and resident memory, not time.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sea_edge.quantize import check_scheme, quantize_to_numpy

__all__ = ["DQ_OPSET", "EMBED_BITS", "WeightReport", "embedding_block", "embedding_entry", "quantize_embedding_pair",
           "quantize_matmul_weights", "quantize_tied_embedding"]

DQ_OPSET = 21  # DequantizeLinear with block_size, and the INT4 type
_MS_DOMAIN = "com.microsoft"
_NF4 = 1  # MatMulBnb4 quant_type: 0 FP4, 1 NF4
# default-domain ops whose meaning changed between opset 18 and 21 (the rest only gained types or attributes)
_CHANGED = {"GroupNormalization": 21, "DFT": 20, "GridSample": 20}


@dataclass(frozen=True)
class WeightReport:
    """One rewritten weight."""

    name: str  # "<module path>.weight", or the initializer's name
    initializer: str  # the fp32 initializer it replaced
    shape: tuple[int, int]  # (N, K) = (out, in), torch layout
    scheme: str
    block_size: int
    bytes_before: int  # fp32 weight
    bytes_after: int  # codes + scales


def _weight_name(node: onnx.NodeProto, init_name: str) -> str:
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    if init_name.endswith(".weight") or len(scopes) < 2 or not scopes[-2]:
        return init_name
    return f"{scopes[-2]}.weight"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _subgraph_uses(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes of the subgraphs (If / Loop / Scan bodies) under `graph`, at any depth."""
    used = set()
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used.update(i for n in g.node for i in n.input)
                used |= _subgraph_uses(g)
    return used


def _reduction_axis(node: onnx.NodeProto) -> int | None:
    """Axis of the weight (input 1) that the node sums over, or None if this node is not a plain x @ W."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul":
        return 0  # W is (K, N)
    if node.op_type == "Gemm":
        return 1 if _attrs(node).get("transB", 0) else 0
    return None


def _plain_ok(node: onnx.NodeProto) -> bool:
    """MatMulBnb4 and MatMulNBits compute A @ W^T, nothing more: a Gemm must not transpose A nor scale anything."""
    if node.op_type == "MatMul":
        return True
    a = _attrs(node)
    return a.get("transA", 0) == 0 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0


class _Names:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.taken = {i.name for i in g.initializer} | {v.name for v in (*g.input, *g.output, *g.value_info)}
        self.taken |= {o for n in g.node for o in n.output} | {n.name for n in g.node}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _default_opset(model: onnx.ModelProto) -> onnx.OperatorSetIdProto | None:
    return next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _raise_opset(model: onnx.ModelProto) -> None:
    """The model's default-domain import to >= DQ_OPSET, where that keeps the meaning of every node."""
    imp = _default_opset(model)
    if imp is None:
        model.opset_import.append(helper.make_opsetid("", DQ_OPSET))
        return
    version = imp.version
    if version >= DQ_OPSET:
        return
    if version < 18:
        raise ValueError(f"default-domain opset {version} < 18: re-export the model with opset >= 18 (21 best) "
                         f"before adding blocked DequantizeLinear (opset {DQ_OPSET})")

    def ops(graph):
        for n in graph.node:
            yield n
            for a in n.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    yield from ops(g)

    # local functions keep their own opset imports (the checker and onnxruntime accept a function at 20 in a model
    # at 21), so only the main graph and its subgraphs are read in the new version
    found = {n.op_type for n in ops(model.graph)
             if n.domain in ("", "ai.onnx") and version < _CHANGED.get(n.op_type, 0)}
    if found:
        raise ValueError(f"raising opset {version} to {DQ_OPSET} for DequantizeLinear would change the meaning of "
                         f"{', '.join(sorted(found))}: re-export with opset {DQ_OPSET}")
    imp.version = DQ_OPSET


def _add_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def _first_index(g: onnx.GraphProto, nodes) -> int:
    """Position in g.node of the first of `nodes`, found by identity: `list(g.node).index(n)` compares protobuf
    messages field by field, which over a ~10k-node graph and ~1000 weights took 33 s of a 53 s int8 rewrite. (upb
    hands back the same wrapper for an element while one is alive, and the callers hold theirs.)"""
    ids = {id(n) for n in nodes}
    i = next((i for i, x in enumerate(g.node) if id(x) in ids), None)
    if i is None:
        raise ValueError("node not in the graph")
    return i


def _replace(g: onnx.GraphProto, node: onnx.NodeProto, new: list) -> None:
    """`node` (found by identity, see _first_index) gives its place in g.node to the nodes `new`."""
    pos = _first_index(g, [node])
    del g.node[pos]
    for i, n in enumerate(new):
        g.node.insert(pos + i, n)


def quantize_matmul_weights(
    model: onnx.ModelProto,
    scheme: str,
    block_size: int,
    names: Collection[str] | Callable[[str], bool] | None = None,
    min_size: int = 0,
    weights: Mapping[str, dict] | None = None,
    accuracy_level: int = 1,
) -> list[WeightReport]:
    """Quantize (in place) the fp32 weights of `model`'s MatMul and Gemm nodes. Returns one report per weight.

    scheme "int8" | "int4" | "nf4", block_size: as sea_edge.quantize's configs (ValueError otherwise).
    names: which weights (see the module docstring for how they are named): None = every eligible one (or, when
        `weights` is given, exactly its keys), a collection of names (each must be found and eligible), or a predicate.
    min_size: leave weights of fewer elements in fp32.
    weights: `sea_edge.quantize.quantized_state(torch_model)` to write a quantized torch model's own numbers; without
        it each weight is quantized here by the same function, which gives the same numbers on CPU.
    accuracy_level: the int4 MatMulNBits' (1: fp32 activations; 4: int8 activations, onnxruntime's fast path).
    A weight is eligible when it is a 2-D fp32 initializer (not also a graph input or output) read only as input 1
    of MatMul / Gemm nodes of the main graph (for int4 and nf4: Gemm without transA, alpha or beta).
    """
    check_scheme(scheme, block_size)
    if names is None and weights is not None:
        names = set(weights)
    wanted = names if callable(names) or names is None else set(names)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    blocked = {v.name for v in (*g.input, *g.output)} | _subgraph_uses(g)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for pos, inp in enumerate(node.input):
            if inp in inits:
                uses.setdefault(inp, []).append((node, pos))

    plan = []  # (weight name, initializer, [consumer nodes])
    seen = set()
    for init_name, consumers in uses.items():
        first = next((n for n, pos in consumers if pos == 1 and _reduction_axis(n) is not None), None)
        if first is None:
            continue  # not the weight of any MatMul / Gemm (a bias, a shape, ...)
        init = inits[init_name]
        nodes = [n for n, _ in consumers]
        name = _weight_name(first, init_name)
        if callable(wanted):
            if not wanted(name):
                continue
        elif wanted is not None and name not in wanted:
            continue
        seen.add(name)
        ok = (init.data_type == TensorProto.FLOAT and len(init.dims) == 2 and init_name not in blocked
              and all(pos == 1 and _reduction_axis(n) is not None for n, pos in consumers)
              and (scheme == "int8" or all(_plain_ok(n) for n in nodes))
              and len({_reduction_axis(n) for n in nodes}) == 1)
        if not ok:
            if wanted is not None and not callable(wanted):
                raise ValueError(f"weight {name!r} ({init_name}) cannot be quantized: it is not a 2-D fp32 "
                                 "initializer read only as the weight of MatMul / Gemm nodes of the main graph")
            continue
        if init.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"weight {name!r} is stored outside the model: load it with its external data first")
        if int(np.prod(init.dims)) < min_size:
            continue
        plan.append((name, init, nodes))
    if wanted is not None and not callable(wanted):
        missing = sorted(set(wanted) - seen)
        if missing:
            raise ValueError(f"weights not found in the graph: {', '.join(missing)}")
    if not plan:
        return []

    if scheme == "int8":
        _raise_opset(model)
    else:
        _add_opset(model, _MS_DOMAIN, 1)
    fresh = _Names(model)
    reports = []
    block_sums: dict[tuple[str, int, int], str] = {}  # (input, K, B) -> x @ S, computed once (int4)
    for name, init, nodes in plan:
        axis = _reduction_axis(nodes[0])
        w = numpy_helper.to_array(init)
        w_nk = w if axis == 1 else w.T  # torch layout (N, K)
        rec = _numbers(name, w_nk, scheme, block_size, weights)
        codes, scales = rec["codes"], rec["scales"]
        N, K = w_nk.shape
        q_name, s_name = fresh(f"{init.name}_{scheme}"), fresh(f"{init.name}_scale")
        if scheme == "nf4":
            new = [numpy_helper.from_array(codes.reshape(-1), q_name),
                   numpy_helper.from_array(scales.reshape(-1), s_name)]
            _replace_matmuls(g, nodes, fresh, partial(_bnb4_product, q_name=q_name, s_name=s_name, K=K, N=N,
                                                      B=block_size))
        elif scheme == "int4":
            m_name = fresh(f"{init.name}_min")
            zp = np.zeros(N * ((-(-K // block_size) + 1) // 2), np.uint8)  # packed 4-bit zero points, all 0
            new = [numpy_helper.from_array(_nbits_blocks(codes, block_size), q_name),
                   numpy_helper.from_array(scales.reshape(-1).astype(np.float16), f"{s_name}_fp16"),
                   numpy_helper.from_array(np.ascontiguousarray(rec["mins"].T).astype(np.float16), f"{m_name}_fp16"),
                   numpy_helper.from_array(zp, fresh(f"{init.name}_zp0"))]
            fresh.taken |= {f"{s_name}_fp16", f"{m_name}_fp16"}
            at = _first_index(g, nodes)
            for i, nm in enumerate((s_name, m_name)):  # fp16 in the file, fp32 for the kernels
                g.node.insert(at + i, helper.make_node("Cast", [f"{nm}_fp16"], [nm], name=fresh(f"{nm}_Cast"),
                                                       to=TensorProto.FLOAT))
            _replace_matmuls(g, nodes, fresh, partial(
                _int4_product, g, q_name=q_name, s_name=s_name, zp_name=new[-1].name, m_name=m_name, K=K, N=N,
                B=block_size, accuracy_level=accuracy_level, fresh=fresh, block_sums=block_sums))
        else:
            if axis == 0:  # (K, N) weight: codes (K, N), scales (ceil(K / B), N)
                codes, scales = codes.T, scales.T
            new = [numpy_helper.from_array(np.ascontiguousarray(codes).astype(np.int8), q_name),
                   numpy_helper.from_array(np.ascontiguousarray(scales), s_name)]
            out = fresh(f"{init.name}_dequantized")
            dq = helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                  name=fresh(f"{init.name}_DequantizeLinear"), axis=axis, block_size=block_size)
            at = _first_index(g, nodes)  # before its first reader: the order stays topological
            g.node.insert(at, dq)
            for n in nodes:
                n.input[1] = out
        g.initializer.remove(init)
        g.initializer.extend(new)
        for v in [v for v in g.value_info if v.name == init.name]:
            g.value_info.remove(v)
        if scheme == "int8":
            after = N * K + scales.size * 4
        elif scheme == "nf4":
            after = (N * K + 1) // 2 + scales.size * 4
        else:  # codes padded to whole blocks, fp16 scale and min
            after = N * (-(-K // block_size)) * (block_size // 2 + 4)
        reports.append(WeightReport(name, init.name, (N, K), scheme, block_size, N * K * 4, after))
    return reports


def _numbers(name: str, w_nk: np.ndarray, scheme: str, block_size: int, weights: Mapping[str, dict] | None) -> dict:
    if weights is not None and name in weights:
        rec = weights[name]
        if (rec["scheme"], rec["block_size"], tuple(rec["shape"])) != (scheme, block_size, w_nk.shape):
            raise ValueError(f"weight {name!r}: the given numbers are {rec['scheme']} block {rec['block_size']} of "
                             f"shape {tuple(rec['shape'])}, the graph wants {scheme} block {block_size} of "
                             f"{w_nk.shape}")
        return rec
    import torch

    return quantize_to_numpy(torch.from_numpy(np.array(w_nk, dtype=np.float32)), scheme, block_size, name)


def _nbits_blocks(codes: np.ndarray, block_size: int) -> np.ndarray:
    """(N, K) uint8 codes in [0, 15] -> MatMulNBits' B: (N, ceil(K / B), B / 2) uint8, the last block zero-padded,
    element 2j of a block in the low nibble."""
    N, K = codes.shape
    nb = -(-K // block_size)
    q = np.zeros((N, nb * block_size), np.uint8)
    q[:, :K] = codes
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(N, nb, block_size // 2)


def _bnb4_product(x: str, out: str, name: str, *, q_name: str, s_name: str, K: int, N: int,
                  B: int) -> onnx.NodeProto:
    return helper.make_node("MatMulBnb4", [x, q_name, s_name], [out], domain=_MS_DOMAIN, name=name, K=K, N=N,
                            block_size=B, quant_type=_NF4)


def _int4_product(g, x: str, out: str, name: str, *, q_name: str, s_name: str, zp_name: str, m_name: str, K: int,
                  N: int, B: int, accuracy_level: int, fresh, block_sums: dict) -> list:
    """The nodes of out = x @ (q * scale + min)^T: MatMulNBits(x) + MatMul(x @ S, mins^T) (module docstring)."""
    nodes = []
    key = (x, K, B)
    if key not in block_sums:
        s_mat = f"block_sum_{K}_{B}"
        if s_mat not in fresh.taken:  # one S per K and B in the graph
            nb = -(-K // B)
            S = (np.arange(K)[:, None] // B == np.arange(nb)[None, :]).astype(np.float32)  # (K, nb)
            g.initializer.append(numpy_helper.from_array(S, s_mat))
            fresh.taken.add(s_mat)
        block_sums[key] = fresh(f"{x}_block_sums")
        nodes.append(helper.make_node("MatMul", [x, s_mat], [block_sums[key]], name=fresh(f"{name}_block_sums")))
    main, offset = fresh(f"{out}_codes"), fresh(f"{out}_mins")
    nodes.append(helper.make_node("MatMulNBits", [x, q_name, s_name, zp_name], [main], domain=_MS_DOMAIN, name=name,
                                  K=K, N=N, bits=4, block_size=B, accuracy_level=accuracy_level))
    nodes.append(helper.make_node("MatMul", [block_sums[key], m_name], [offset], name=fresh(f"{name}_mins")))
    nodes.append(helper.make_node("Add", [main, offset], [out], name=fresh(f"{name}_add")))
    return nodes


def _replace_matmuls(g: onnx.GraphProto, nodes, fresh, make) -> None:
    """Each MatMul / Gemm reading the weight becomes make(x, out, name) (a node or a list of nodes; + Add of the
    Gemm's C), in the same place."""
    for node in nodes:
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        out = fresh(f"{node.output[0]}_nobias") if bias else node.output[0]
        made = make(node.input[0], out, fresh(f"{node.name or node.output[0]}_q"))
        new = made if isinstance(made, list) else [made]
        for q in new:
            q.metadata_props.extend(node.metadata_props)  # keeps where it came from (module path, stack trace)
        if bias:
            add = helper.make_node("Add", [out, bias], [node.output[0]], name=fresh(f"{node.name}_bias"))
            add.metadata_props.extend(node.metadata_props)
            new.append(add)
        _replace(g, node, new)  # found only now: make may have added nodes (int4's block-sum matrix) before it


# -- the tied embedding / lm_head ------------------------------------------------------------------------------------

EMBED_BITS = {"int8": 8}
"""Schemes whose codes the embedding can take: com.microsoft GatherBlockQuantized and MatMulNBits read unsigned
8-bit codes with a zero point, which a symmetric int8 code plus 128 is exactly (no NF4 gather exists, and int4's
float zero points are not GatherBlockQuantized's). sea-edge quantize uses int8 for the embedding under every scheme:
on the default model a (symmetric) int4 table cost +19 points of perplexity (2 x 256 validation tokens) for 15 MB."""


EMBED_INT8_BLOCK = 256
"""The block size asked for the embedding's int8 codes (that of the int8 scheme); embedding_block picks the largest
power of two <= it that divides the width (64 for SmolLM2's 576)."""


def embedding_block(scheme: str, block_size: int, width: int) -> int | None:
    """The block size for a (V, width) embedding: the largest size `scheme` accepts (sea_edge.quantize.SCHEMES) that is
    a power of two >= 16, at most block_size, and divides `width` (MatMulNBits wants a power of two, and the gather
    and the lm_head share one unpadded table); None if there is none."""
    from sea_edge.quantize import SCHEMES

    fits = [b for b in SCHEMES[scheme] if 16 <= b <= block_size and b & (b - 1) == 0 and width % b == 0]
    return max(fits) if fits else None


def _tied_embedding(g: onnx.GraphProto) -> tuple[TensorProto, list, list] | None:
    """(table, gathers, lm_head matmuls) when one 2-D fp32 initializer (V, E) is read only by Gather(axis 0) nodes
    and by Transpose(perm 1, 0) nodes whose outputs are read only as input 1 of MatMul nodes (the tied lm_head as
    torch.onnx writes it); else None."""
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n, k))
    sub, graph_io = _subgraph_uses(g), {v.name for v in (*g.input, *g.output)}
    for name, init in inits.items():
        if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT or name in sub or name in graph_io:
            continue
        gathers, heads, ok = [], [], True
        for n, k in readers.get(name, []):
            if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and k == 0 and _attrs(n).get("axis", 0) == 0:
                gathers.append(n)
            elif n.op_type == "Transpose" and n.domain in ("", "ai.onnx") and list(_attrs(n).get("perm", [])) == [1, 0]:
                users = readers.get(n.output[0], [])
                if n.output[0] in sub or n.output[0] in graph_io or not users or any(
                        u.op_type != "MatMul" or u.domain not in ("", "ai.onnx") or j != 1 for u, j in users):
                    ok = False
                heads += [(n, u) for u, _ in users]
            else:
                ok = False
        if ok and gathers and heads:
            return init, gathers, heads
    return None


def quantize_tied_embedding(model: onnx.ModelProto, scheme: str, block_size: int,
                            accuracy_level: int = 1) -> WeightReport | None:
    """Quantize (in place) a tied embedding / lm_head table: Gather -> com.microsoft.GatherBlockQuantized, the lm_head
    MatMul(x, Transpose(W)) -> com.microsoft.MatMulNBits(x, Reshape(codes), scales) (accuracy_level 1: fp32
    activations; 4: int8 activations, onnxruntime's fast path). Both read ONE table of unsigned codes (the
    symmetric sea_edge.quantize int8 codes + 128) in blocks along E, so the
    file holds it once; onnxruntime folds the Reshape at load. Returns None (and changes nothing) when the graph has
    no tied table in that pattern or no block size (embedding_block) fits its width."""
    import torch

    if scheme not in EMBED_BITS:
        raise ValueError(f"the embedding takes {' or '.join(EMBED_BITS)} codes, not {scheme!r}")
    g = model.graph
    found = _tied_embedding(g)
    if found is None:
        return None
    init, gathers, heads = found
    W = numpy_helper.to_array(init).astype(np.float32)
    V, E = W.shape
    B = embedding_block(scheme, block_size, E)
    if B is None:
        return None
    bits = EMBED_BITS[scheme]
    rec = quantize_to_numpy(torch.from_numpy(W), scheme, B, init.name)
    codes = (rec["codes"].astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)  # (V, E), unsigned
    scales = rec["scales"].reshape(V, E // B).astype(np.float32)
    names = _Names(model)
    q_name, s_name, shp_name = names(f"{init.name}_q{bits}"), names(f"{init.name}_scales"), names(f"{init.name}_nbits")
    g.initializer.remove(init)
    g.initializer.extend([numpy_helper.from_array(codes, q_name), numpy_helper.from_array(scales, s_name),
                          numpy_helper.from_array(np.array([V, E // B, B * bits // 8], np.int64), shp_name)])
    for n in gathers:
        new = helper.make_node("GatherBlockQuantized", [q_name, n.input[1], s_name], list(n.output),
                               name=names(f"{n.name or 'gather'}_q"), domain=_MS_DOMAIN, gather_axis=0,
                               quantize_axis=1, block_size=B, bits=bits)
        _replace(g, n, [new])
    b3 = names(f"{init.name}_blocks")
    first = _first_index(g, [t for t, _ in heads])
    g.node.insert(first, helper.make_node("Reshape", [q_name, shp_name], [b3], name=names("lm_head_blocks")))
    for t, mm in heads:
        new = helper.make_node("MatMulNBits", [mm.input[0], b3, s_name], list(mm.output),
                               name=names(f"{mm.name or 'lm_head'}_nbits"), domain=_MS_DOMAIN, K=E, N=V, bits=bits,
                               block_size=B, accuracy_level=accuracy_level)
        _replace(g, mm, [new])
        if any(x is t for x in g.node):  # a Transpose read by several heads goes with the first
            _replace(g, t, [])
    _add_opset(model, _MS_DOMAIN, 1)
    return WeightReport(name=init.name, initializer=init.name, shape=(V, E), scheme=scheme, block_size=B,
                        bytes_before=W.nbytes, bytes_after=codes.nbytes + scales.nbytes)


def quantize_embedding_pair(prefill: onnx.ModelProto, decode: onnx.ModelProto,
                            accuracy_level: int = 1) -> WeightReport | None:
    """quantize_tied_embedding on both graphs of an export, in int8 (EMBED_BITS says why) with the int8 block size
    that fits the table (embedding_block(int8, 256, E))."""
    report = quantize_tied_embedding(prefill, "int8", EMBED_INT8_BLOCK, accuracy_level)
    if report is not None:
        quantize_tied_embedding(decode, "int8", EMBED_INT8_BLOCK, accuracy_level)
    return report


def embedding_entry(report: WeightReport | None, accuracy_level: int = 1) -> dict | None:
    """The manifest's quantization.embedding for a quantize_embedding_pair result."""
    if report is None:
        return None
    acts = "fp32 activations" if accuracy_level == 1 else "int8 activations"
    return {"name": report.name, "scheme": "int8", "bits": 8, "block_size": report.block_size,
            "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
            "computes": f"com.microsoft GatherBlockQuantized (embedding) and MatMulNBits (lm_head, accuracy level "
                        f"{accuracy_level}: {acts}) on one table of uint8 codes, zero point 128"}
