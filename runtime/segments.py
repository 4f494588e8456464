"""A graph split at its custom nodes (`sea_edge.SparseAttention`, `sea_edge.ColumnScores`) into onnxruntime
segments, and the on-disk cache of the split (standard library + runtime/onnx_wire.py only: no onnx package).

    plan = load_plan(folder, "model.onnx")         # built once per graph (keyed by its sha256), then read back
    plan.steps                                     # [Step("ort", "seg-000.onnx", ...), Step("op", ...), ...]
    plan.segment_bytes(step)                       # a ModelProto to hand to onnxruntime.InferenceSession

How the graph is cut. Every value gets a stage: graph inputs and initializers 0; a node's outputs the largest stage
of its inputs, plus one after a split node. Segment k holds the other nodes of stage k, in the graph's own
(topological) order; the split nodes of stage k run after it, so the steps are segment 0, split nodes of stage 0,
segment 1, ... (empty segments are skipped). For SmolLM2 that is 61 segments, 30 ColumnScores and 30
SparseAttention steps. A node runs in the earliest segment whose inputs are all available, so shape arithmetic on
the graph inputs lands in segment 0 and its results are handed on like any other value.

A segment is a ModelProto built from the original bytes: its nodes and the initializers they read are copied byte
for byte (weights stay external-data references into the export folder's weights file, with their offsets), its
inputs are the values it reads from earlier steps (typed by the graph's value_info), its outputs the values later
steps or the caller read. onnxruntime refuses external data outside the folder of the model file (symlinks
resolved, '..' refused; 1.24+), so segments are opened from bytes with the session option
`session.model_external_initializers_file_folder_path` set to the export folder (sea_edge.runtime.executor).

The cache: <cache>/<sha256 of the graph file>.<FORMAT_TAG>/ holds plan.json (the steps, and each segment file's
size and sha256) and the segment files. An entry is written in a temporary folder beside it and renamed into place,
so a crash never leaves a half entry under the final name; on reading, every segment file is checked against
plan.json, and an entry that fails is removed and rebuilt. A cache folder that cannot be written (a read-only home
on a device) costs the cache, not the run: the split is then kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sea_edge.errors import SeaEdgeError

from . import onnx_wire as w
from .manifest import sha256_file

__all__ = ["FORMAT", "HEAD_OUTPUT", "MODES", "SPLIT_OPS", "SegmentPlan", "Step", "build_plan", "default_cache_dir",
           "head_node", "load_plan"]

FORMAT, FORMAT_TAG = "sea-edge-segments/5", "seg5"  # 3: segments carry the local functions their nodes call;
# 4: cut at ColumnScores too; 5: the split mode (ops / head)
SPLIT_OPS = {("sea_edge", "SparseAttention"): ("q", "k", "v", "idx"),
             ("sea_edge", "ColumnScores"): ("q", "k", "key_valid")}
"""(domain, op_type) of the nodes the graph is cut at -> their input names, in order."""
MODES = ("ops", "head")
"""How a graph is split: "ops" at its SPLIT_OPS nodes (the CUDA path), "head" before its lm_head (the CPU path: the
body's arena is given back before the (B, T, V) logits are allocated; see sea_edge.runtime.session)."""
HEAD_OUTPUT, HEAD_OPS = "logits", ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul")
_LAYOUT_OPS = ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Transpose")


def default_cache_dir() -> Path:
    """$SEA_EDGE_CACHE, else $XDG_CACHE_HOME/sea-edge, else ~/.cache/sea-edge; segments live under segments/."""
    root = os.environ.get("SEA_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sea-edge")
    return Path(root) / "segments"


@dataclass
class Step:
    """One step of a split graph: an onnxruntime segment ("ort") or a split node ("op")."""

    kind: str  # "ort" | "op"
    name: str  # segment file name, or the node's name
    inputs: list[str]
    outputs: list[str]
    op: str = ""  # "SparseAttention" or "ColumnScores" for an "op" step
    attributes: dict = field(default_factory=dict)  # {"scale": float}; ColumnScores: also {"K": int, "causal": bool}
    nodes: int = 0  # onnx nodes in a segment


@dataclass
class SegmentPlan:
    """The steps of a split graph and where its segment files are (see the module docstring)."""

    graph_file: str
    graph_sha256: str
    mode: str  # "ops" or "head" (MODES)
    inputs: list[str]  # the original graph's inputs, in order
    outputs: list[str]  # its outputs, in order
    overridable: list[str]  # graph inputs that have an initializer (a default value), e.g. num_logits_to_keep
    steps: list[Step]
    segment_files: dict[str, dict]  # segment file -> {"bytes": n, "sha256": hex}
    rewrites: dict = field(default_factory=dict)  # {rewrite: nodes} applied while splitting (split_sequences)
    defaults: dict = field(default_factory=dict)  # mode "head": {overridable int64 input: its default values}
    cache: str = ""  # "built", "read", "rebuilt: <why>", "memory: <why>"
    entry: Path | None = None  # the cache entry folder (None: kept in memory)
    _memory: dict[str, bytes] = field(default_factory=dict, repr=False)

    def segment_bytes(self, step: Step) -> bytes:
        if step.name in self._memory:
            return self._memory[step.name]
        return (self.entry / step.name).read_bytes()

    @property
    def n_segments(self) -> int:
        return sum(s.kind == "ort" for s in self.steps)

    def to_json(self) -> dict:
        return {"format": FORMAT, "graph_file": self.graph_file, "graph_sha256": self.graph_sha256, "mode": self.mode,
                "inputs": self.inputs, "outputs": self.outputs, "overridable": self.overridable,
                "defaults": self.defaults,
                "steps": [asdict(s) for s in self.steps], "segment_files": self.segment_files,
                "rewrites": self.rewrites}


# -- building ------------------------------------------------------------------------------------------------------
def _payload(raw_field: bytes) -> bytes:
    return w.read_fields(raw_field)[0].value


def head_node(g: w.Graph, graph_file: str = "graph") -> int:
    """Index of the node that starts the head of a language model's graph: the matrix product that makes its
    HEAD_OUTPUT, directly or through layout ops only (the lm_head: after the final norm and any slicing)."""
    producer = {o: i for i, n in enumerate(g.nodes) for o in n.outputs if o}
    x, seen = HEAD_OUTPUT, set()
    while x in producer and x not in seen:
        seen.add(x)
        n = g.nodes[producer[x]]
        if n.op_type in HEAD_OPS:
            return producer[x]
        if n.op_type not in _LAYOUT_OPS:
            break
        x = n.inputs[0] if n.inputs else ""
    raise SeaEdgeError(f"{graph_file}: no matrix product ({', '.join(HEAD_OPS)}) produces the {HEAD_OUTPUT!r} output "
                       "(cannot cut the graph before its head)")


def build_plan(model_bytes: bytes, graph_file: str, graph_sha256: str,
               mode: str = "ops") -> tuple[SegmentPlan, dict[str, bytes]]:
    """Split a ModelProto. mode "ops": at its SPLIT_OPS nodes (the split nodes become "op" steps); "head": into two
    onnxruntime segments, the body and the head (head_node and what follows it), and nothing else. Returns the plan
    and {segment file name: ModelProto bytes}."""
    if mode not in MODES:
        raise SeaEdgeError(f"unknown split mode {mode!r}: use one of {', '.join(MODES)}")
    try:
        model = w.parse_model(model_bytes)
    except w.WireError as exc:
        raise SeaEdgeError(f"{graph_file} is not a readable ONNX model: {exc}") from None
    g = model.graph
    rewrites = {"SplitToSequence+SequenceAt -> Split": split_sequences(g, _opset(model))}
    nodes = g.nodes
    inits = set(g.initializers) | set(g.sparse_initializers)
    graph_inputs, graph_outputs = list(g.inputs), list(g.outputs)
    split_ops = SPLIT_OPS if mode == "ops" else {}
    is_split = [(n.domain, n.op_type) in split_ops for n in nodes]
    # a barrier node starts a new segment (its stage is one past its inputs'), an onnxruntime node all the same
    barrier = head_node(g, graph_file) if mode == "head" else -1
    if barrier >= 0:  # the head's activation input crosses the cut: onnxruntime needs its type (the logits' dtype)
        x = nodes[barrier].inputs[0]
        if x not in g.inputs and x not in g.value_info and x not in g.outputs:
            vi = w.value_info_like(x, _payload(g.outputs[HEAD_OUTPUT]))
            if vi is None:
                raise SeaEdgeError(f"{graph_file}: the {HEAD_OUTPUT!r} output has no tensor type")
            g.value_info[x] = w.message(w.GRAPH_VALUE_INFO, vi)
    reads = [[x for x in [*n.inputs, *n.implicit_inputs] if x] for n in nodes]

    # stage (ASAP) and "free" (computable from the graph inputs and initializers alone) of every value
    # (mode "head": from the initializers alone, so that only constants, e.g. a transposed tied embedding, move
    # into the head; the body's own work stays in the body)
    stage: dict[str, int] = {x: 0 for x in [*graph_inputs, *inits]}
    free: dict[str, bool] = {x: mode == "ops" or x in inits for x in stage}
    producer: dict[str, int] = {}
    asap: list[int] = []
    for i, n in enumerate(nodes):
        missing = [x for x in reads[i] if x not in stage]
        if missing:
            raise SeaEdgeError(f"{graph_file}: node {n.name or n.op_type} reads {missing[0]!r}, which no earlier "
                               "node, input or initializer defines (the graph is not topologically sorted)")
        asap.append(max((stage[x] for x in reads[i]), default=0) + (1 if i == barrier else 0))
        node_free = not is_split[i] and i != barrier and all(free[x] for x in reads[i])
        for o in n.outputs:
            if o:
                stage[o], free[o], producer[o] = asap[i] + (1 if is_split[i] else 0), node_free, i
    for o in graph_outputs:
        if o not in stage:
            raise SeaEdgeError(f"{graph_file}: graph output {o!r} is not produced by any node")
        if o in inits and o not in graph_inputs:
            raise SeaEdgeError(f"{graph_file}: graph output {o!r} is an initializer (not supported by the split)")

    # placement: a node that depends on a split node runs at its stage; a free one as late as its first reader
    # allows (shape arithmetic and per-layer constants are computed where they are used, not all up front)
    consumers: dict[str, list[int]] = {}
    for i in range(len(nodes)):
        for x in reads[i]:
            consumers.setdefault(x, []).append(i)
    place = list(asap)
    for i in reversed(range(len(nodes))):
        if is_split[i] or not all(free.get(o, False) for o in nodes[i].outputs if o):
            continue
        later = [place[c] for o in nodes[i].outputs if o for c in consumers.get(o, [])]
        if later:
            place[i] = min(later)

    # a SparseAttention output has its first input's type and shape (like q); ColumnScores' (B, Hq, T, K) float
    # must be in the graph's value_info
    like = {n.outputs[0]: n.inputs[0] for i, n in enumerate(nodes)
            if is_split[i] and n.outputs and n.op_type == "SparseAttention"}

    def typed(x: str) -> bool:
        seen = set()
        while x not in seen:
            seen.add(x)
            if x in g.inputs or x in g.value_info or x in g.outputs:
                return True
            if x not in like:
                return False
            x = like[x]
        return False

    # the steps in order: segment k, then the split nodes of stage k
    n_stages = max(place, default=0) + 1
    by_stage: list[list[int]] = [[] for _ in range(n_stages)]
    for i in range(len(nodes)):
        by_stage[place[i]].append(i)
    groups: list[tuple[str, list[int]]] = []
    for k in range(n_stages):
        seg = [i for i in by_stage[k] if not is_split[i]]
        if seg:
            groups.append(("ort", seg))
        groups.extend(("op", [i]) for i in by_stage[k] if is_split[i])

    # an untyped free value that a later segment reads is recomputed there (its untyped free ancestors with it):
    # onnxruntime needs a type for every input of a segment, and these are the exporter's shape arithmetic
    for j, (kind, idx) in enumerate(groups):
        if kind != "ort":
            continue
        have = set(idx)
        defined = {o for i in idx for o in nodes[i].outputs if o}
        todo = [x for i in idx for x in reads[i]]
        while todo:
            x = todo.pop()
            if x in defined or x not in producer or not free[x] or typed(x):
                continue
            i = producer[x]
            if i not in have:
                have.add(i)
                defined.update(o for o in nodes[i].outputs if o)
                todo.extend(reads[i])
        groups[j] = (kind, sorted(have))  # the graph's order is topological

    # backwards: each step outputs what a later step (or the caller) reads and it is the last to produce; dead
    # nodes are dropped; what is left must be a graph input or an initializer
    demand = set(graph_outputs)
    planned: list[tuple[str, list[int], list[str], list[str]]] = []
    for kind, idx in reversed(groups):
        produced = {o for i in idx for o in nodes[i].outputs if o}
        outs = [o for i in idx for o in nodes[i].outputs if o and o in demand]
        if not outs:
            continue  # nothing of it is read: dead nodes
        if kind == "ort":
            live, need = [], set(outs)
            for i in reversed(idx):
                if any(o in need for o in nodes[i].outputs if o):
                    live.append(i)
                    need.update(reads[i])
            idx = sorted(live)
        step_reads, defined = {}, set()
        for i in idx:  # what the step reads from outside itself
            step_reads.update((x, None) for x in reads[i] if x not in defined)
            defined.update(o for o in nodes[i].outputs if o)
        step_reads = list(step_reads)
        demand = (demand - produced) | set(step_reads)
        planned.append((kind, idx, step_reads, list(dict.fromkeys(outs))))
    planned.reverse()
    left = [x for x in demand if x not in graph_inputs and x not in inits]
    if left:
        raise SeaEdgeError(f"{graph_file}: value {left[0]!r} is read but no step produces it before")

    defaults = {}
    if mode == "head":
        for x in graph_inputs:
            if x in g.initializers:
                values, dims = w.tensor_ints(_payload(g.initializers[x])), w.tensor_dims(_payload(g.initializers[x]))
                if values is None or len(values) != math.prod(dims):  # not int64, or external data
                    raise SeaEdgeError(f"{graph_file}: overridable input {x!r} is not an inline int64 tensor (not "
                                       "supported by the head split)")
                defaults[x] = {"dims": dims, "values": values}
    steps, files = [], {}
    split_domains = {d for d, _ in SPLIT_OPS}
    for kind, idx, step_reads, outs in planned:
        if kind == "op":
            n = nodes[idx[0]]
            names = SPLIT_OPS[(n.domain, n.op_type)]
            if len(n.inputs) != len(names) or not all(n.inputs) or len(outs) != 1:
                raise SeaEdgeError(f"{graph_file}: {n.op_type} node {n.name!r} has inputs {n.inputs} and outputs "
                                   f"{n.outputs}; expected {len(names)} inputs ({', '.join(names)}) and one output")
            direct = [x for x in n.inputs if x in inits]
            if direct:
                raise SeaEdgeError(f"{graph_file}: {n.op_type} node {n.name!r} reads initializer {direct[0]!r} "
                                   "directly (not supported by the split)")
            attrs = {"scale": n.float_attribute("scale")}
            if n.op_type == "ColumnScores":
                attrs.update(K=n.int_attribute("K", 0), causal=bool(n.int_attribute("causal", 1)))
                if attrs["K"] < 1:
                    raise SeaEdgeError(f"{graph_file}: ColumnScores node {n.name!r} has no positive attribute K")
            steps.append(Step("op", n.name or f"{n.op_type}_{idx[0]}", list(n.inputs), outs, n.op_type, attrs))
            continue
        # mode "head": an overridable initializer is a plain input of its segment (the runtime feeds the default:
        # onnxruntime's IO binding cannot bind an initializer)
        seg_inits = [x for x in step_reads if x in inits and (mode == "ops" or x not in graph_inputs)]
        ins = [x for x in step_reads if x not in inits or x in graph_inputs]  # overridable initializers stay inputs
        produced = [o for i in idx for o in nodes[i].outputs if o]
        name = f"seg-{len(files):03d}.onnx"
        files[name] = _segment_model(model, idx, ins, seg_inits, outs, produced, f"{g.name or 'graph'}_{name[:-5]}",
                                     split_domains, graph_file, like)
        steps.append(Step("ort", name, ins, outs, nodes=len(idx)))
    plan = SegmentPlan(graph_file=graph_file, graph_sha256=graph_sha256, mode=mode, inputs=graph_inputs,
                       outputs=graph_outputs, overridable=[x for x in graph_inputs if x in inits], steps=steps,
                       defaults=defaults,
                       segment_files={n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                                      for n, b in files.items()}, rewrites=rewrites)
    return plan, files


def _opset(model: w.Model) -> int:
    f = model.opset_domains().get("") or model.opset_domains().get("ai.onnx")
    if f is None:
        return 0
    return next((int(x.value) for x in w.read_fields(f.value) if x.number == 2 and x.wire == 0), 0)


def split_sequences(g: w.Graph, opset: int) -> int:
    """Rewrite SplitToSequence(x, split) read only by SequenceAt(seq, constant i) nodes into one Split(x, sizes)
    whose i-th output is what SequenceAt i gave (in place; returns how many were rewritten). The same tensors,
    without a sequence: onnxruntime's CUDA provider has no SplitToSequence kernel (its SequenceAt it has), so the
    exporter's torch.chunk (SEA's rotary embedding, twice a layer) would otherwise run on the CPU, q and k copied to
    the host and back in every layer. Needs x's size on the axis in the value_info and constant split and
    positions; anything else is left as it is."""
    if opset < 13:  # Split takes its sizes as an input from opset 13
        return 0
    producer = {o: i for i, n in enumerate(g.nodes) for o in n.outputs if o}
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(g.nodes):
        for x in [*n.inputs, *n.implicit_inputs]:
            readers.setdefault(x, []).append(i)

    def constant(name: str) -> tuple[list[int], list[int]] | None:
        """(dims, values) of an int64 constant (initializer or Constant node)."""
        if name in g.initializers:
            payload = _payload(g.initializers[name])
        elif name in producer and g.nodes[producer[name]].op_type == "Constant":
            f = g.nodes[producer[name]].attributes.get("value")
            if f is None or f.wire != 2:
                return None
            payload = f.value
        else:
            return None
        values = w.tensor_ints(payload)
        return None if values is None else (w.tensor_dims(payload), values)

    replace: dict[int, list[w.Node]] = {}
    done = 0
    for i, n in enumerate(g.nodes):
        if n.op_type != "SplitToSequence" or n.domain not in ("", "ai.onnx") or len(n.inputs) < 2 or not n.inputs[1]:
            continue
        seq = n.outputs[0]
        reads = readers.get(seq, [])
        if not reads or seq in g.outputs or any(g.nodes[r].op_type != "SequenceAt" for r in reads):
            continue
        split = constant(n.inputs[1])
        vi = g.value_info.get(n.inputs[0]) or g.inputs.get(n.inputs[0])
        dims = w.static_dims(_payload(vi)) if vi is not None else None
        axis = n.int_attribute("axis", 0)
        if split is None or not dims or not -len(dims) <= axis < len(dims) or dims[axis] is None:
            continue
        size = dims[axis]
        split_dims, split_values = split
        if not split_dims and len(split_values) == 1 and split_values[0] > 0:  # a scalar: chunks of that size
            c = split_values[0]
            sizes = [c] * (size // c) + ([size % c] if size % c else [])
        elif len(split_dims) == 1 and sum(split_values) == size:
            sizes = list(split_values)
        else:
            continue
        positions = []
        for r in reads:
            p = constant(g.nodes[r].inputs[1])
            if p is None or len(p[1]) != 1:
                break
            k = p[1][0] + len(sizes) if p[1][0] < 0 else p[1][0]
            if not 0 <= k < len(sizes):
                break
            positions.append(k)
        else:
            outs = [f"{seq}__part{k}" for k in range(len(sizes))]
            taken: set[int] = set()
            for r, k in zip(reads, positions):
                target = g.nodes[r].outputs[0]
                if k not in taken:
                    outs[k] = target
                    taken.add(k)
                    replace[r] = []
                else:  # a second reader of the same part: an Identity of the first
                    replace[r] = [_new_node("Identity", [outs[k]], [target], f"{g.nodes[r].name}__identity")]
            sizes_name = f"{seq}__sizes"
            g.initializers[sizes_name] = w.message(w.GRAPH_INITIALIZER, w.int64_tensor(sizes_name, sizes))
            replace[i] = [_new_node("Split", [n.inputs[0], sizes_name], outs, f"{n.name}__as_split",
                                    {"axis": axis})]
            done += 1
    if replace:
        g.nodes = [m for i, n in enumerate(g.nodes) for m in replace.get(i, [n])]
    return done


def _new_node(op_type: str, inputs: list[str], outputs: list[str], name: str, ints: dict | None = None) -> w.Node:
    payload = w.node(op_type, inputs, outputs, name, ints)
    return w._node(w.message(w.GRAPH_NODE, payload), payload)


def _segment_model(model: w.Model, idx: list[int], ins: list[str], seg_inits: list[str], outs: list[str],
                   produced: list[str], name: str, split_domains: set[str], graph_file: str,
                   like: dict[str, str]) -> bytes:
    g = model.graph

    def typed(x: str) -> bytes | None:
        """x's ValueInfoProto payload, named x (a split node's output borrows its first input's)."""
        seen = set()
        y = x
        while y not in seen:
            seen.add(y)
            vi = g.inputs.get(y) or g.value_info.get(y) or g.outputs.get(y)
            if vi is not None:
                payload = _payload(vi)
                if y == x:
                    return payload
                rest = b"".join(f.raw for f in w.read_fields(payload) if f.number != w.VALUE_INFO_NAME)
                return w.string_field(w.VALUE_INFO_NAME, x) + rest
            if y not in like:
                return None
            y = like[y]
        return None

    parts = [w.string_field(w.GRAPH_NAME, name)]
    parts += [g.nodes[i].raw for i in idx]
    for x in seg_inits:
        if x in g.initializers:
            parts.append(g.initializers[x])
        else:
            parts.append(g.sparse_initializers[x])
    for x in ins:
        vi = typed(x)
        if vi is None:
            raise SeaEdgeError(f"{graph_file}: value {x!r} crosses a segment boundary but the graph has no type "
                               "for it (no value_info); re-export the folder")
        parts.append(w.message(w.GRAPH_INPUT, vi))
    for x in outs:
        vi = g.outputs.get(x) or g.value_info.get(x)
        parts.append(w.message(w.GRAPH_OUTPUT, _payload(vi) if vi is not None else w.value_info(x)))
    inner = set(produced) - set(outs)
    parts += [w.message(w.GRAPH_VALUE_INFO, _payload(g.value_info[x])) for x in g.value_info if x in inner]
    graph = b"".join(parts)

    used_domains = {g.nodes[i].domain for i in idx}
    header = []
    for f in model.header:
        if f.number == w.MODEL_OPSET_IMPORT:
            domain = w._first_string(f.value, w.OPSET_DOMAIN)
            if domain in split_domains and domain not in used_domains:
                continue  # the custom op's domain: its function is not carried into the segments
        header.append(f.raw)
    return b"".join(header) + w.message(w.MODEL_GRAPH, graph) + b"".join(
        _functions_called(model, {(g.nodes[i].domain, g.nodes[i].op_type) for i in idx}))


def _functions_called(model: w.Model, calls: set[tuple[str, str]]) -> list[bytes]:
    """The model's local functions that `calls` reach (directly or through other functions' bodies), in the
    model's order: a segment carries the functions of its own nodes (any local function a future graph calls
    outside SPLIT_OPS), not those of the split ops."""
    by_key = {w.function_key(raw): raw for raw in model.functions}
    reached, todo = set(), [c for c in calls if c in by_key]
    while todo:
        key = todo.pop()
        if key in reached:
            continue
        reached.add(key)
        todo += [c for c in w.function_calls(by_key[key]) if c in by_key]
    return [raw for raw in model.functions if w.function_key(raw) in reached]


# -- the cache -----------------------------------------------------------------------------------------------------
def _check_entry(entry: Path, sha: str, mode: str) -> tuple[SegmentPlan | None, str]:
    """(plan, "") when `entry` is a whole, matching cache entry, else (None, why)."""
    try:
        meta = json.loads((entry / "plan.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "no plan.json"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable plan.json ({type(exc).__name__})"
    if (not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("graph_sha256") != sha
            or meta.get("mode") != mode):
        return None, "plan.json of another format or graph"
    try:
        steps = [Step(**s) for s in meta["steps"]]
        files = meta["segment_files"]
        for s in steps:
            if s.kind == "ort" and s.name not in files:
                return None, f"plan.json lists no file for {s.name}"
        for name, info in files.items():
            p = entry / name
            if not p.is_file() or p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
                return None, f"{name} is missing or fails its sha256 check"
        plan = SegmentPlan(graph_file=meta["graph_file"], graph_sha256=sha, mode=mode, inputs=meta["inputs"],
                           outputs=meta["outputs"], overridable=meta["overridable"], steps=steps,
                           defaults=meta.get("defaults", {}),
                           segment_files=files, rewrites=meta.get("rewrites", {}), cache="read", entry=entry)
    except (KeyError, TypeError) as exc:
        return None, f"malformed plan.json ({exc})"
    return plan, ""


def _write_entry(root: Path, entry: Path, plan: SegmentPlan, files: dict[str, bytes]) -> None:
    """Write the entry in a temporary folder in `root`, then rename it to `entry` (atomic on one filesystem)."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / "plan.json", "w", encoding="utf-8") as f:
            json.dump(plan.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.exists():
                raise
            # another process finished the same entry first: keep theirs (it is checked on the next read)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_plan(folder: str | Path, graph_file: str, cache_dir: str | Path | None = None,
              mode: str = "ops") -> SegmentPlan:
    """The split of `folder/graph_file` (mode: see MODES): read from the cache when a whole entry for this graph's
    sha256 and mode is there, else built (and cached). `cache_dir` None: default_cache_dir()."""
    if mode not in MODES:
        raise SeaEdgeError(f"unknown split mode {mode!r}: use one of {', '.join(MODES)}")
    folder = Path(folder)
    path = folder / graph_file
    sha = sha256_file(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / f"{sha}.{FORMAT_TAG}{'' if mode == 'ops' else '-' + mode}"
    why = ""
    if entry.is_dir():
        plan, why = _check_entry(entry, sha, mode)
        if plan is not None:
            return plan
        bad = entry.with_name(f".{entry.name}.bad-{os.getpid()}")
        try:
            os.rename(entry, bad)  # out of the way first, so no reader sees it half deleted
            shutil.rmtree(bad, ignore_errors=True)
        except OSError:
            pass
    plan, files = build_plan(path.read_bytes(), graph_file, sha, mode)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_entry(root, entry, plan, files)
        cached, why2 = _check_entry(entry, sha, mode)
        if cached is None:
            raise OSError(f"the entry just written does not read back: {why2}")
        cached.cache = f"rebuilt: {why}" if why else "built"
        return cached
    except OSError as exc:
        plan.cache, plan._memory = f"memory: cache {root} not writable ({exc})", files
        return plan
