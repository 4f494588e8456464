"""The few ONNX protobuf messages the graph splitter reads and writes, in the protobuf wire format, so that the
runtime needs no `onnx` package (an edge device has numpy and onnxruntime only).

A message is a sequence of fields, each a varint key (field number << 3 | wire type) and a payload: a varint
(type 0), 8 bytes (1), a length-prefixed byte string (2: strings, bytes, sub-messages, packed repeated numbers) or
4 bytes (5). Reading keeps each field's raw bytes, so a message is rewritten by copying the fields it keeps
(nodes, initializers, value infos stay byte-identical) and appending the few it builds. Field numbers are those of
onnx/onnx.proto (ONNX IR version 10); only what the splitter needs is named below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Field", "Graph", "Model", "Node", "WireError", "function_calls", "function_key", "int64_tensor",
           "int_field", "message", "node", "parse_model", "read_fields", "static_dims", "string_field", "tensor_dims",
           "tensor_ints", "value_info", "value_info_like"]

# ModelProto
MODEL_IR_VERSION, MODEL_OPSET_IMPORT, MODEL_GRAPH, MODEL_FUNCTIONS = 1, 8, 7, 25
# OperatorSetIdProto
OPSET_DOMAIN = 1
# FunctionProto
FUNCTION_NAME, FUNCTION_NODE, FUNCTION_DOMAIN = 1, 7, 10
# GraphProto
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 1, 2, 5, 11, 12, 13
GRAPH_SPARSE_INITIALIZER = 15
# NodeProto
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 3, 4, 5, 7
# AttributeProto
ATTR_NAME, ATTR_F, ATTR_I, ATTR_T, ATTR_G, ATTR_GRAPHS, ATTR_TYPE = 1, 2, 3, 5, 6, 11, 20
ATTR_TYPE_INT = 2
# TensorProto, SparseTensorProto, ValueInfoProto (TypeProto, TypeProto.Tensor, TensorShapeProto, Dimension)
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_INT64_DATA, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 7, 8, 9
INT64 = 7
SPARSE_VALUES, VALUE_INFO_NAME, VALUE_INFO_TYPE = 1, 1, 2
TYPE_TENSOR, TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE, SHAPE_DIM, DIM_VALUE = 1, 1, 2, 1, 1


class WireError(ValueError):
    """The bytes are not the protobuf message expected (truncated or not an ONNX model)."""


@dataclass(frozen=True)
class Field:
    number: int
    wire: int
    value: int | bytes  # varint / fixed as int (little-endian), length-delimited as bytes
    raw: bytes  # the whole field, key included


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def read_fields(buf: bytes) -> list[Field]:
    """Every field of one message, in order."""
    out, pos, n = [], 0, len(buf)
    while pos < n:
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise WireError(f"unsupported wire type {wire} (field {number})")
        if pos > n or number == 0:
            raise WireError("truncated message" if pos > n else "field number 0")
        out.append(Field(number, wire, value, bytes(buf[start:pos])))
    return out


def _encode_varint(x: int) -> bytes:
    out = bytearray()
    while True:
        b = x & 0x7F
        x >>= 7
        if x:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def int_field(number: int, x: int) -> bytes:
    """A varint field (negative numbers as 64-bit two's complement, as protobuf writes int64)."""
    return _encode_varint(number << 3) + _encode_varint(x & 0xFFFFFFFFFFFFFFFF)


def message(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a sub-message)."""
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def string_field(number: int, s: str) -> bytes:
    return message(number, s.encode("utf-8"))


def value_info(name: str) -> bytes:
    """A ValueInfoProto with a name and no type (onnxruntime infers a graph output's type)."""
    return string_field(VALUE_INFO_NAME, name)


def value_info_like(name: str, other_payload: bytes) -> bytes | None:
    """A ValueInfoProto named `name` with the tensor element type of another ValueInfoProto and no shape; None
    when the other one has no tensor type."""
    t = next((f.value for f in read_fields(other_payload) if f.number == VALUE_INFO_TYPE), None)
    tensor = next((f.value for f in read_fields(t) if f.number == TYPE_TENSOR), None) if t else None
    if tensor is None:
        return None
    elem = b"".join(f.raw for f in read_fields(tensor) if f.number == TENSOR_TYPE_ELEM)
    return string_field(VALUE_INFO_NAME, name) + message(VALUE_INFO_TYPE, message(TYPE_TENSOR, elem))


def node(op_type: str, inputs: list[str], outputs: list[str], name: str, int_attributes: dict | None = None) -> bytes:
    """A NodeProto (default domain) with int attributes."""
    out = b"".join(string_field(NODE_INPUT, x) for x in inputs)
    out += b"".join(string_field(NODE_OUTPUT, x) for x in outputs)
    out += string_field(NODE_NAME, name) + string_field(NODE_OP_TYPE, op_type)
    for key, value in (int_attributes or {}).items():
        out += message(NODE_ATTRIBUTE, string_field(ATTR_NAME, key) + int_field(ATTR_I, value) +
                       int_field(ATTR_TYPE, ATTR_TYPE_INT))
    return out


def int64_tensor(name: str, values: list[int]) -> bytes:
    """A 1-d int64 TensorProto."""
    raw = b"".join((v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for v in values)
    return (int_field(TENSOR_DIMS, len(values)) + int_field(TENSOR_DATA_TYPE, INT64) + string_field(TENSOR_NAME, name)
            + message(TENSOR_RAW_DATA, raw))


def _ints(f: Field) -> list[int]:
    """A repeated int64 field's values (packed or not), signed."""
    if f.wire == 0:
        vals = [f.value]
    else:
        vals, pos = [], 0
        while pos < len(f.value):
            v, pos = _varint(f.value, pos)
            vals.append(v)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in vals]


def tensor_dims(payload: bytes) -> list[int]:
    return [d for f in read_fields(payload) if f.number == TENSOR_DIMS for d in _ints(f)]


def tensor_ints(payload: bytes) -> list[int] | None:
    """The values of an int64 TensorProto held inline (raw_data or int64_data); None for any other tensor."""
    fields = read_fields(payload)
    if next((f.value for f in fields if f.number == TENSOR_DATA_TYPE), None) != INT64:
        return None
    for f in fields:
        if f.number == TENSOR_RAW_DATA:
            raw = f.value
            return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw), 8)]
    return [v for f in fields if f.number == TENSOR_INT64_DATA for v in _ints(f)]


def static_dims(value_info_payload: bytes) -> list[int | None] | None:
    """The dims of a tensor ValueInfoProto (None for a symbolic one); None when it has no shape."""
    t = next((f.value for f in read_fields(value_info_payload) if f.number == VALUE_INFO_TYPE), None)
    tensor = next((f.value for f in read_fields(t) if f.number == TYPE_TENSOR), None) if t else None
    shape = next((f.value for f in read_fields(tensor) if f.number == TENSOR_TYPE_SHAPE), None) if tensor else None
    if shape is None:
        return None
    dims = []
    for d in read_fields(shape):
        if d.number == SHAPE_DIM:
            dims.append(next((x.value for x in read_fields(d.value) if x.number == DIM_VALUE and x.wire == 0), None))
    return dims


def _text(v: int | bytes) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else ""


def _first_string(buf: bytes, number: int) -> str:
    return next((_text(f.value) for f in read_fields(buf) if f.number == number and f.wire == 2), "")


@dataclass
class Node:
    """A NodeProto: its names, and the outer-scope values its subgraphs (If, Loop, Scan bodies) read."""

    op_type: str
    domain: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Field]  # attribute name -> the attribute's value field (f, i, g, ...)
    implicit_inputs: list[str]
    raw: bytes  # the NodeProto's bytes

    def int_attribute(self, name: str, default: int) -> int:
        f = self.attributes.get(name)
        if f is None or f.wire != 0:
            return default
        return f.value - (1 << 64) if f.value >= 1 << 63 else f.value

    def float_attribute(self, name: str) -> float:
        import struct

        f = self.attributes.get(name)
        if f is None or f.wire != 5:
            raise WireError(f"node {self.name or self.op_type} has no float attribute {name!r}")
        return struct.unpack("<f", int(f.value).to_bytes(4, "little"))[0]


@dataclass
class Graph:
    """A GraphProto: raw fields by kind, plus what the splitter reads."""

    name: str = ""
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, bytes] = field(default_factory=dict)  # name -> the whole field (key included)
    sparse_initializers: dict[str, bytes] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)  # name -> the whole ValueInfoProto field
    outputs: dict[str, bytes] = field(default_factory=dict)
    value_info: dict[str, bytes] = field(default_factory=dict)

    def free_names(self) -> list[str]:
        """Names read by this graph's nodes that it does not define (a subgraph's outer-scope reads)."""
        defined = set(self.initializers) | set(self.sparse_initializers) | set(self.inputs)
        free: dict[str, None] = {}
        for n in self.nodes:
            for i in [*n.inputs, *n.implicit_inputs]:
                if i and i not in defined:
                    free[i] = None
            defined.update(n.outputs)
        return list(free)


def _node(raw_field: bytes, payload: bytes) -> Node:
    op_type = domain = name = ""
    inputs, outputs, attributes, implicit = [], [], {}, {}
    for f in read_fields(payload):
        if f.number == NODE_INPUT:
            inputs.append(_text(f.value))
        elif f.number == NODE_OUTPUT:
            outputs.append(_text(f.value))
        elif f.number == NODE_OP_TYPE:
            op_type = _text(f.value)
        elif f.number == NODE_DOMAIN:
            domain = _text(f.value)
        elif f.number == NODE_NAME:
            name = _text(f.value)
        elif f.number == NODE_ATTRIBUTE:
            aname, avalue = "", None
            for a in read_fields(f.value):
                if a.number == ATTR_NAME:
                    aname = _text(a.value)
                elif a.number in (ATTR_G, ATTR_GRAPHS):
                    implicit.update(dict.fromkeys(_graph(a.value).free_names()))
                    avalue = a
                elif a.number in (ATTR_F, ATTR_I, ATTR_T) and avalue is None:
                    avalue = a
            if avalue is not None:
                attributes[aname] = avalue
    return Node(op_type, domain, name, inputs, outputs, attributes, list(implicit), raw_field)


def _graph(payload: bytes) -> Graph:
    g = Graph()
    for f in read_fields(payload):
        if f.number == GRAPH_NODE:
            g.nodes.append(_node(f.raw, f.value))
        elif f.number == GRAPH_NAME:
            g.name = _text(f.value)
        elif f.number == GRAPH_INITIALIZER:
            g.initializers[_first_string(f.value, TENSOR_NAME)] = f.raw
        elif f.number == GRAPH_SPARSE_INITIALIZER:
            values = next((v.value for v in read_fields(f.value) if v.number == SPARSE_VALUES), b"")
            g.sparse_initializers[_first_string(values, TENSOR_NAME)] = f.raw
        elif f.number in (GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO):
            target = {GRAPH_INPUT: g.inputs, GRAPH_OUTPUT: g.outputs, GRAPH_VALUE_INFO: g.value_info}[f.number]
            target[_first_string(f.value, VALUE_INFO_NAME)] = f.raw
    return g


@dataclass
class Model:
    """A ModelProto: its graph, and every other top-level field's raw bytes (functions apart)."""

    graph: Graph
    header: list[Field]  # ir_version, producer, opset imports, metadata ... (not the graph, not functions)
    functions: list[bytes]

    def opset_domains(self) -> dict[str, Field]:
        return {_first_string(f.value, OPSET_DOMAIN): f for f in self.header if f.number == MODEL_OPSET_IMPORT}


def function_key(raw_field: bytes) -> tuple[str, str]:
    """(domain, name) of a ModelProto.functions field (its raw bytes, key included)."""
    payload = next(f.value for f in read_fields(raw_field))
    return _first_string(payload, FUNCTION_DOMAIN), _first_string(payload, FUNCTION_NAME)


def function_calls(raw_field: bytes) -> set[tuple[str, str]]:
    """(domain, op_type) of the nodes in a ModelProto.functions field's body (top level of the body)."""
    payload = next(f.value for f in read_fields(raw_field))
    calls = set()
    for f in read_fields(payload):
        if f.number == FUNCTION_NODE and f.wire == 2:
            n = _node(f.raw, f.value)
            calls.add((n.domain, n.op_type))
    return calls


def parse_model(buf: bytes) -> Model:
    """A ModelProto's graph and header. Raises WireError on bytes that are not one."""
    graph, header, functions = None, [], []
    for f in read_fields(buf):
        if f.number == MODEL_GRAPH and f.wire == 2:
            graph = _graph(f.value)
        elif f.number == MODEL_FUNCTIONS:
            functions.append(f.raw)
        else:
            header.append(f)
    if graph is None or not any(f.number == MODEL_IR_VERSION for f in header):
        raise WireError("not an ONNX model (no graph or no ir_version)")
    return Model(graph, header, functions)
