"""Blockwise weight quantization: configs, the numbers (against bitsandbytes' own dequantization), accuracy of
quantized layers (SQNR on Gaussian weights), state_dict round trip, and the ONNX rewrite run in onnxruntime on CPU
(the same numbers bit for bit, outputs equal to the torch QuantizedLinear's, custom nodes and functions untouched)."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from sea_edge.export.quantize_onnx import quantize_matmul_weights
from torch import nn

from sea_edge.config import SEAConfig
from sea_edge.estimator import SEAEstimator
from sea_edge.quantize import (
    BnbInt8Config,
    BnbNF4Config,
    Int4Config,
    QuantizedLinear,
    dequantize_weight,
    quantize_,
    quantize_weight,
    quantized_state,
    quantized_weights,
)
from sea_edge.testing import assert_rel_err, sqnr_db

CONFIGS = {"int8": BnbInt8Config, "nf4": BnbNF4Config, "int4": Int4Config}
SCHEMES = list(CONFIGS)


def _gaussian_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Linear weights ~ N(0, 1 / in_features): the bell shape of trained weights (nn.Linear's default init is
    uniform, on which a uniform int4 grid would look better than NF4 than it is)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def _mlp() -> nn.Sequential:
    # in_features 384 and 512: int8's default 256-blocks leave a short last block on the first layer
    return _gaussian_(nn.Sequential(nn.Linear(384, 512), nn.GELU(), nn.Linear(512, 200))).eval()


def _estimator() -> SEAEstimator:
    torch.manual_seed(0)
    cfg = SEAConfig().resolve(causal=True, head_dim=64)
    return _gaussian_(SEAEstimator(cfg, 64, 9, 2048)).eval()


# -- configs -----------------------------------------------------------------------------------------------------------
def test_config_defaults():
    assert (BnbInt8Config().block_size, BnbNF4Config().block_size, Int4Config().block_size) == (256, 64, 32)
    assert {c().target for c in CONFIGS.values()} == {"estimator"}
    assert [c.scheme for c in CONFIGS.values()] == SCHEMES


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: BnbInt8Config(block_size=100), "int8 block_size must be one of 64, 128"),
        (lambda: BnbInt8Config(block_size=32), "int8 block_size"),
        (lambda: BnbNF4Config(block_size=512), "nf4 block_size must be one of 32, 64, 128, 256"),
        (lambda: Int4Config(block_size=24), "int4 block_size"),
        (lambda: Int4Config(block_size=0), "int4 block_size"),
        (lambda: BnbInt8Config(target="decoder"), "target must be one of 'estimator', 'teacher', 'all'"),
    ],
    ids=["int8-B100", "int8-B32", "nf4-B512", "int4-B24", "int4-B0", "target-decoder"],
)
def test_config_rejects(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- the numbers -------------------------------------------------------------------------------------------------------
def test_int8_is_bitsandbytes_blockwise_with_a_linear_code():
    """Our codes come from bitsandbytes' quantize_blockwise, and bitsandbytes' dequantize_blockwise agrees with our
    int8 * (absmax / 127): exactly when handed the scales and the integer code, to one rounding with its own
    (absmax, linear code) state. K = 300 with 64-blocks: a short last block per row; row 5 is all zeros."""
    import bitsandbytes.functional as bnbf

    B, N, K = 64, 37, 300
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    w[5] = 0
    codes, scales, zeros = quantize_weight(w, "int8", B)  # (N, K) int8, (N, 5) fp32
    assert zeros is None
    assert codes.dtype == torch.int8 and codes.shape == (N, K) and scales.shape == (N, 5)
    assert codes.min() >= -127 and codes[5].abs().sum() == 0 and scales[5].abs().sum() == 0
    ours = dequantize_weight(codes, scales, "int8", B, (N, K))
    nb = scales.shape[1]
    padded = torch.nn.functional.pad(codes.int(), (0, nb * B - K))  # the per-row blocks bitsandbytes saw
    idx = (padded + 128).to(torch.uint8)
    exact = bnbf.dequantize_blockwise(idx, absmax=scales.reshape(-1), code=torch.arange(-128.0, 128.0), blocksize=B)
    assert torch.equal(exact[:, :K], ours)
    linear = (torch.arange(256.0) - 128) / 127
    theirs = bnbf.dequantize_blockwise(idx, absmax=(scales * 127).reshape(-1), code=linear, blocksize=B)[:, :K]
    assert ((theirs - ours).abs() <= scales.repeat_interleave(B, 1)[:, :K] * 127 * 2**-22).all()
    # round to nearest, up to bitsandbytes' CPU kernel picking the neighbour within 0.002 of a tie
    x = w / scales.repeat_interleave(B, 1)[:, :K].clamp(min=1e-30)
    off = (codes.float() - x).abs()
    assert (off <= 0.502).all() and (off > 0.5).float().mean() < 0.01


def test_nf4_is_bitsandbytes():
    import bitsandbytes.functional as bnbf

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    codes, scales, _ = quantize_weight(w, "nf4", 64)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(codes.reshape(-1), packed.reshape(-1)) and torch.equal(scales.reshape(-1), state.absmax)
    assert torch.equal(dequantize_weight(codes, scales, "nf4", 64, (48, 128)), bnbf.dequantize_4bit(packed, state))


def test_int4_round_to_nearest_and_packing():
    """Codes in [0, 15] from each block's min to its max, scale and min fp16 values, error at most half a step
    (plus the min's fp16 rounding), two codes per byte (odd K: the last byte half used, the last block short); an
    all-zero row comes back exactly zero."""
    N, K, B = 5, 77, 32
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(3))
    w[2] = 0
    codes, scales, mins = quantize_weight(w, "int4", B)
    assert codes.dtype == torch.uint8 and codes.shape == (N, 39) and scales.shape == mins.shape == (N, 3)
    assert torch.equal(scales, scales.half().float()) and torch.equal(mins, mins.half().float())
    per = lambda t: t.repeat_interleave(B, 1)[:, :K]  # noqa: E731
    deq = dequantize_weight(codes, scales, "int4", B, (N, K), mins)
    assert ((deq - w).abs() <= per(scales) * 0.5 + per(mins).abs() * 2**-11 + 1e-7).all()
    assert not deq[2].any()
    q = _unpack(codes, K)
    assert q.max() <= 15 and all((q[n].view(-1, 1) == torch.tensor([0, 15])).any(0).all() for n in (0, 1, 3, 4))
    ql = QuantizedLinear.from_linear(nn.Linear(K, N), "int4", B)
    rec = quantized_weights(ql)
    assert rec["codes"].dtype == np.uint8 and rec["codes"].shape == (N, K) and rec["codes"].max() <= 15
    assert rec["mins"].shape == rec["scales"].shape == (N, 3)
    with pytest.raises(ValueError, match="need their block mins"):
        dequantize_weight(codes, scales, "int4", B, (N, K))


def _unpack(codes: torch.Tensor, K: int) -> torch.Tensor:
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).view(codes.shape[0], -1)[:, :K]


def test_int4_gives_back_a_q4_1_grid():
    """Weights that are a Q4_1 GGUF block's dequantized values (d * q + m in fp32, fp16 d and m, codes spanning
    0..15: how the default teacher ships) quantize back to the same d, m and codes, so dequantize to the very same
    weights: the round trip that symmetric int4 (any absmax / 7 grid) cannot make."""
    g = torch.Generator().manual_seed(11)
    N, K, B = 64, 256, 32
    q = torch.randint(0, 16, (N, K), generator=g)
    q[:, ::B], q[:, 1::B] = 0, 15  # every block spans the whole grid
    d = (torch.rand(N, K // B, generator=g) * 0.02 + 1e-3).half().float()
    m = (-d * (torch.rand(N, K // B, generator=g) * 15)).half().float()
    w = q * d.repeat_interleave(B, 1) + m.repeat_interleave(B, 1)
    codes, scales, mins = quantize_weight(w, "int4", B)
    assert torch.equal(scales, d) and torch.equal(mins, m)
    assert torch.equal(_unpack(codes, K), q.to(torch.uint8))
    assert torch.equal(dequantize_weight(codes, scales, "int4", B, (N, K), mins), w)


def test_int4_flat_block():
    """A constant block (range 0) comes back as that constant (to fp16), with codes 0."""
    w = torch.cat([torch.full((2, 32), -0.3), torch.randn(2, 32, generator=torch.Generator().manual_seed(4))], 1)
    codes, scales, mins = quantize_weight(w, "int4", 32)
    deq = dequantize_weight(codes, scales, "int4", 32, tuple(w.shape), mins)
    assert torch.equal(deq[:, :32], torch.full((2, 32), -0.3).half().float())
    assert not _unpack(codes, 64)[:, :32].any()


# -- accuracy: SQNR on Gaussian weights ------------------------------------------------------------------------------
# Floors a few dB below what these seeds measure, and what theory says for N(0, 1) blocks:
# - int8, B=256: step = absmax / 127 ~ 2.8 sigma / 127, noise step^2 / 12 -> 43.9 dB per weight (measured 43.4);
# - int4, B=32:  asymmetric, step = range / 15 ~ 4.1 sigma / 15 -> 22.1 dB per weight measured (symmetric: 20.3);
# - nf4, B=64:   the NormalFloat grid, measured 20.7 dB per weight.
# Outputs lose ~3 dB per extra quantized layer in the path (independent errors add): the 2-layer MLP measures
# 40.3 / 17.7 / 17.2 dB (int8 / nf4 / int4), the estimator's logits (encoder.0, encoder.2, to_rows in series)
# 38.3 / 15.5 / 14.8 dB.
WEIGHT_FLOOR = {"int8": 41.0, "nf4": 19.0, "int4": 18.5}
MLP_FLOOR = {"int8": 37.0, "nf4": 15.0, "int4": 15.0}
ESTIMATOR_FLOOR = {"int8": 35.0, "nf4": 13.0, "int4": 12.5}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sqnr_teacher_mlp(scheme):
    m = _mlp()
    w0 = m[0].weight.detach().clone()
    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(x)
        quantize_(m, CONFIGS[scheme](target="teacher"))
        out = m(x)
    assert isinstance(m[0], QuantizedLinear) and isinstance(m[2], QuantizedLinear)
    assert sqnr_db(m[0].dequantize(), w0) >= WEIGHT_FLOOR[scheme]
    assert sqnr_db(out, ref) >= MLP_FLOOR[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sqnr_estimator(scheme):
    est = _estimator()
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 9, 63, 64, generator=g), torch.randn(1, 3, 63, 64, generator=g), torch.randn(
        1, 3, 63, 64, generator=g)
    selectable = torch.ones(63, est.K, dtype=torch.bool)  # every column: finite logits to compare
    with torch.no_grad():
        ref = est(q, k, v, selectable)
        quantize_(est, CONFIGS[scheme]())
        out = est(q, k, v, selectable)
    assert all(isinstance(m, QuantizedLinear) for m in (est.encoder[0], est.encoder[2], est.to_rows, est.mixer))
    assert sqnr_db(out.logits, ref.logits) >= ESTIMATOR_FLOOR[scheme]
    assert sqnr_db(out.features, ref.features) >= ESTIMATOR_FLOOR[scheme]


class _TinyLM(nn.Module):
    """A teacher-shaped module: embeddings, one attention with a `sea` estimator, an MLP, a tied lm_head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(64, 64)
        self.attn.sea = SEAEstimator(SEAConfig().resolve(causal=True, head_dim=64), 64, 1, 128)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


@pytest.mark.parametrize("target", ["estimator", "teacher", "all"])
def test_targets(target):
    model = _TinyLM()
    quantize_(model, BnbInt8Config(target=target))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    est = {"attn.sea.encoder.0", "attn.sea.encoder.2", "attn.sea.to_rows", "attn.sea.mixer"}
    teacher = {"attn.q_proj", "mlp.0", "mlp.2"}  # not lm_head: its weight is the embedding's
    assert quantized == {"estimator": est, "teacher": teacher, "all": est | teacher}[target]
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed.weight


def test_quantize_errors_name_the_layer_and_leave_the_model_alone():
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 100), nn.Linear(100, 8))
    with pytest.raises(ValueError, match=r"^2: in_features 100 is not a multiple of the nf4 block_size 64"):
        quantize_(model, BnbNF4Config(target="teacher"))
    assert all(isinstance(m, nn.Linear) for m in model)
    with pytest.raises(ValueError, match="no nn.Linear of Sequential matches target 'estimator'.*to_sea"):
        quantize_(model, BnbInt8Config())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_round_trip_through_safetensors(scheme, tmp_path):
    from safetensors.torch import load_file, save_file

    m = quantize_(_mlp(), CONFIGS[scheme](target="teacher"))
    save_file(m.state_dict(), tmp_path / "q.safetensors")
    B = CONFIGS[scheme]().block_size
    fresh = nn.Sequential(QuantizedLinear(384, 512, scheme, B), nn.GELU(), QuantizedLinear(512, 200, scheme, B))
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(3, 384)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
        m.to(torch.bfloat16)  # casts the bias, never the scales: the weights stay the ones exported
        assert m[0].scales.dtype == torch.float32 and m[0].bias.dtype == torch.bfloat16
        assert torch.equal(m[0].dequantize(), fresh[0].dequantize())
        assert m(x.bfloat16()).dtype == torch.bfloat16


# -- ONNX --------------------------------------------------------------------------------------------------------------
IR = 10  # what torch.onnx writes; helper.make_model's default follows onnx and may be newer than onnxruntime reads


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 40)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _export_with_custom_node(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """torch.onnx (dynamo) export, then out -> sea_edge::Twice(out), Twice a model-local function (Y = X + X)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    g = proto.graph
    out = g.output[0].name
    for node in g.node:
        for i, o in enumerate(node.output):
            if o == out:
                node.output[i] = "before_twice"
    g.node.append(helper.make_node("Twice", ["before_twice"], [out], domain="sea_edge", name="twice"))
    twice = helper.make_function("sea_edge", "Twice", ["X"], ["Y"], [helper.make_node("Add", ["X", "X"], ["Y"])],
                                 [helper.make_opsetid("", 20)])
    proto.functions.append(twice)
    proto.opset_import.append(helper.make_opsetid("sea_edge", 1))
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.fixture(scope="module")
def exported():
    """{form: (torch model, input, exported proto)}: a 3-D input exports Linear as MatMul with a folded (K, N)
    transpose, a 2-D input as Gemm(transB=1) on the (N, K) parameter."""
    out = {}
    for form, x in (("matmul", torch.randn(2, 7, 128)), ("gemm", torch.randn(7, 128))):
        model = _gaussian_(_Tiny(), seed=6).eval()
        out[form] = model, x, _export_with_custom_node(model, x)
    return out


def _run(proto: onnx.ModelProto, feeds: dict, level, config: dict | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _dequantized_in_ort(proto: onnx.ModelProto, report) -> np.ndarray:
    """The (N, K) weight onnxruntime multiplies by, read out of the rewritten graph: the DequantizeLinear alone, or
    MatMulBnb4 / MatMulNBits applied to the identity (each output is one weight times 1, so exact)."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    N, K = report.shape
    dq = next((n for n in g.node if n.op_type == "DequantizeLinear" and n.name.startswith(report.initializer)), None)
    if dq is not None:
        out = helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None)
        graph = helper.make_graph([dq], "dq", [], [out], initializer=[inits[i] for i in dq.input])
        w = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=IR), {},
                 ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        axis = next(helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis")
        return w if axis == 1 else w.T  # axis 1: an (N, K) Gemm weight; axis 0: a (K, N) MatMul weight
    q = next(n for n in g.node if n.op_type in ("MatMulBnb4", "MatMulNBits")
             and n.input[1].startswith(report.initializer))
    x, out = q.input[0], q.output[0]
    if q.op_type == "MatMulNBits":  # int4: the Add of MatMul(MatMul(x, S), mins^T) ends the product
        out = next(n for n in g.node if n.op_type == "Add" and out in n.input).output[0]
    made = {o: n for n in g.node for o in n.output}
    keep, todo = set(), [out]
    while todo:  # every node between x and out
        v = todo.pop()
        if v in made and v != x and made[v].name not in keep:
            keep.add(made[v].name)
            todo += list(made[v].input)
    nodes = [copy.deepcopy(n) for n in g.node if n.name in keep]  # graph order: topological
    for n in nodes:
        n.input[:] = ["eye" if i == x else i for i in n.input]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("eye", onnx.TensorProto.FLOAT, [K, K])],
                              [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [K, N])],
                              initializer=[inits[i] for i in sorted(used) if i in inits])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR)
    return _run(model, {"eye": np.eye(K, dtype=np.float32)}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).T


# onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits, whose default accuracy level quantizes activations
FP32_ACTIVATIONS = {"session.qdq_matmulnbits_accuracy_level": "1"}
LEVELS = {"opt-off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "opt-all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@pytest.mark.parametrize("form", ["matmul", "gemm"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnx_rewrite_matches_torch(exported, scheme, form):
    model, x, base = exported[form]
    cfg = CONFIGS[scheme](target="teacher")
    qmodel = quantize_(copy.deepcopy(model), cfg)
    with torch.no_grad():
        ref = 2 * qmodel(x)  # Twice
    proto = copy.deepcopy(base)
    functions_before = [f.SerializeToString() for f in proto.functions]
    reports = quantize_matmul_weights(proto, scheme, cfg.block_size)
    onnx.checker.check_model(proto, full_check=True)

    assert [(r.name, r.shape) for r in reports] == [("up.weight", (64, 128)), ("down.weight", (40, 64))]
    assert all(r.bytes_after < r.bytes_before / 3 for r in reports)
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    if scheme != "int8":
        op = "MatMulBnb4" if scheme == "nf4" else "MatMulNBits"
        # int4: per weight, x @ S (block sums) and its product with the mins: 4 small MatMuls
        small = 4 if scheme == "int4" else 0
        assert ops.count(("com.microsoft", op)) == 2 and ops.count(("", "MatMul")) == small and ("", "Gemm") not in ops
        assert ("com.microsoft", 1) in [(o.domain, o.version) for o in proto.opset_import]
    else:
        assert ops.count(("", "DequantizeLinear")) == 2
        assert ("", 21) in [(o.domain, o.version) for o in proto.opset_import]
    assert ("sea_edge", "Twice") in ops
    assert [f.SerializeToString() for f in proto.functions] == functions_before
    assert not {r.initializer for r in reports} & {i.name for i in proto.graph.initializer}  # fp32 weights gone

    # the same numbers: what onnxruntime dequantizes is the torch layer's weight, bit for bit
    for r, layer in zip(reports, (qmodel.up, qmodel.down)):
        assert np.array_equal(_dequantized_in_ort(proto, r), layer.dequantize().numpy()), r.name

    feeds = {proto.graph.input[0].name: x.numpy()}
    for level in LEVELS.values():
        out = _run(proto, feeds, level, FP32_ACTIVATIONS)  # see test_onnx_fused_matmulnbits_quantizes_activations
        # int4 sums x @ (q * s)^T and (x @ S) @ mins^T apart: terms of opposite sign, a few ulps more than one product
        assert_rel_err(torch.from_numpy(out), ref, 3e-6 if scheme == "int4" else 1e-6, f"{scheme}-{form}-{level}")


def test_onnx_fused_matmulnbits_quantizes_activations(exported):
    """With optimizations on, onnxruntime (1.32) fuses DequantizeLinear (int8, axis 0) + MatMul into MatMulNBits
    (the Gemm form stays unfused), whose default accuracy level 4 quantizes the activations to int8 too: ~1e-2
    relative error where fp32 activations give ~1e-7. session.qdq_matmulnbits_accuracy_level = 1 keeps them fp32."""
    model, x, base = exported["matmul"]
    qmodel = quantize_(copy.deepcopy(model), BnbInt8Config(target="teacher"))
    with torch.no_grad():
        ref = 2 * qmodel(x)
    proto = copy.deepcopy(base)
    quantize_matmul_weights(proto, "int8", 256)
    feeds = {proto.graph.input[0].name: x.numpy()}
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert_rel_err(torch.from_numpy(_run(proto, feeds, level, FP32_ACTIVATIONS)), ref, 1e-6)
    assert_rel_err(torch.from_numpy(_run(proto, feeds, level)), ref, 5e-2)


def test_onnx_int4_accuracy_level_is_the_nodes(exported):
    """int4's MatMulNBits carries its accuracy level: 1 computes in fp32 (~1e-6 off torch), 4 quantizes the
    activations of the code product to int8 (~2e-2 off, and measurably so)."""
    model, x, base = exported["matmul"]
    qmodel = quantize_(copy.deepcopy(model), Int4Config(target="teacher"))
    with torch.no_grad():
        ref = 2 * qmodel(x)
    errs = {}
    for acc in (1, 4):
        proto = copy.deepcopy(base)
        quantize_matmul_weights(proto, "int4", 32, accuracy_level=acc)
        levels = {helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {acc}
        out = torch.from_numpy(_run(proto, {proto.graph.input[0].name: x.numpy()},
                                    ort.GraphOptimizationLevel.ORT_ENABLE_ALL))
        errs[acc] = float((out - ref).norm() / ref.norm())
    assert errs[1] < 3e-6 and 1e-4 < errs[4] < 5e-2, errs


def test_onnx_writes_the_torch_models_own_numbers(exported):
    model, _, base = exported["matmul"]
    qmodel = quantize_(copy.deepcopy(model), BnbInt8Config(target="teacher"))
    state = quantized_state(qmodel)
    assert set(state) == {"up.weight", "down.weight"}
    state["down.weight"] = dict(state["down.weight"], codes=np.zeros_like(state["down.weight"]["codes"]))
    proto = copy.deepcopy(base)
    reports = quantize_matmul_weights(proto, "int8", 256, weights=state)
    assert not _dequantized_in_ort(proto, reports[1]).any()  # the zeros handed in, not a fresh quantization
    with pytest.raises(ValueError, match="the given numbers are int8 block 256"):
        quantize_matmul_weights(copy.deepcopy(base), "int8", 64, weights=state)


def test_onnx_names_and_min_size(exported):
    _, _, base = exported["gemm"]
    proto = copy.deepcopy(base)
    assert [r.name for r in quantize_matmul_weights(proto, "int4", 32, names={"down.weight"})] == ["down.weight"]
    proto = copy.deepcopy(base)
    assert [r.name for r in quantize_matmul_weights(proto, "int4", 32, names=lambda n: n.startswith("up"))] == [
        "up.weight"]
    proto = copy.deepcopy(base)
    assert [r.name for r in quantize_matmul_weights(proto, "int4", 32, min_size=64 * 128)] == ["up.weight"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scheme": "int3", "block_size": 32}, "unknown quantization scheme 'int3'"),
        ({"scheme": "nf4", "block_size": 48}, "nf4 block_size must be one of"),
        ({"scheme": "int8", "block_size": 256, "names": {"mlp.weight"}}, "weights not found in the graph: mlp.weight"),
        ({"scheme": "nf4", "block_size": 128}, "down.weight: in_features 64 is not a multiple of the nf4 block_size"),
    ],
    ids=["scheme-int3", "nf4-B48", "unknown-name", "nf4-K64-B128"],
)
def test_onnx_rejects(exported, kwargs, match):
    proto = copy.deepcopy(exported["gemm"][2])
    with pytest.raises(ValueError, match=match):
        quantize_matmul_weights(proto, **kwargs)


def test_onnx_refuses_an_opset_bump_that_changes_meaning():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 16])
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["n"], num_groups=2),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    s, b = (onnx.numpy_helper.from_array(np.ones(2, np.float32), n) for n in "sb")
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=[w, s, b]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=IR)
    with pytest.raises(ValueError, match="would change the meaning of GroupNormalization"):
        quantize_matmul_weights(proto, "int8", 64)
    assert quantize_matmul_weights(proto, "nf4", 32)  # MatMulBnb4 needs no new opset


@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnx_weight_read_by_two_matmuls(scheme):
    """One weight, two readers: quantized once, both read the same codes."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 64])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[onnx.numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=IR)
    B = CONFIGS[scheme]().block_size
    (report,) = quantize_matmul_weights(proto, scheme, B)
    onnx.checker.check_model(proto, full_check=True)
    c, sc, mn = quantize_weight(torch.from_numpy(w.T.copy()), scheme, B)
    wq = dequantize_weight(c, sc, scheme, B, (64, 64), mn).T
    xv = rng.standard_normal((3, 64)).astype(np.float32)
    ref = torch.from_numpy(xv) @ wq @ wq
    for level in LEVELS.values():
        assert_rel_err(torch.from_numpy(_run(proto, {"x": xv}, level, FP32_ACTIVATIONS)), ref, 1e-6)
    # codes + scales, and for int4 mins, zero points and the block-sum matrix: each once
    assert report.shape == (64, 64) and len(proto.graph.initializer) == (5 if scheme == "int4" else 2)


def _tied_lm(V=300, E=192, seed=0):
    """input_ids -> Gather(W) -> x; logits = MatMul(x * 1.5, Transpose(W)): torch.onnx's tied embedding / lm_head."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, E)).astype(np.float32)
    W[3, :] = 0.0  # an all-zero row (scale 0) must gather zeros, not NaN
    nodes = [helper.make_node("Gather", ["lm_head.weight", "input_ids"], ["x"], axis=0),
             helper.make_node("Mul", ["x", "c"], ["h"]),
             helper.make_node("Transpose", ["lm_head.weight"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "wt"], ["logits"])]
    ids = helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["B", "T"])
    g = helper.make_graph(nodes, "tied", [ids],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", "T", V]),
                           helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "T", E])],
                          [onnx.numpy_helper.from_array(W, "lm_head.weight"),
                           onnx.numpy_helper.from_array(np.array(1.5, np.float32), "c")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), W


@pytest.mark.parametrize("scheme", ["int8"])
def test_onnx_tied_embedding_gather_and_lm_head_share_one_table(scheme, tmp_path):
    """GatherBlockQuantized + MatMulNBits on one code table: the gather is exactly the dequantized rows of
    sea_edge.quantize's codes, the lm_head matches their fp32 product (accuracy level 1), and the table is stored
    once."""
    from sea_edge.export.quantize_onnx import embedding_block, quantize_tied_embedding
    from sea_edge.quantize import dequantize_weight, quantize_weight

    model, W = _tied_lm()
    block = embedding_block(scheme, 128, W.shape[1])
    assert block == 64  # 128 does not divide 192; 64 does
    r = quantize_tied_embedding(model, scheme, 128)
    assert r is not None and r.block_size == block and r.shape == W.shape
    ops = [n.op_type for n in model.graph.node]
    assert "Gather" not in ops and "Transpose" not in ops and "MatMul" not in ops
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1
    assert not any(i.name == "lm_head.weight" for i in model.graph.initializer)
    codes = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert len(codes) == 1  # one table, read by both
    onnx.checker.check_model(model)
    path = tmp_path / "q.onnx"
    onnx.save(model, str(path))
    ids = np.random.default_rng(1).integers(0, W.shape[0], (2, 7))
    ids[0, 0] = 3
    logits, x = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    c, s, _ = quantize_weight(torch.from_numpy(W), scheme, block)
    deq = dequantize_weight(c, s, scheme, block, W.shape).numpy()
    np.testing.assert_array_equal(x, deq[ids])
    assert not x[0, 0].any()
    np.testing.assert_allclose(logits, (1.5 * deq[ids]) @ deq.T, rtol=1e-4, atol=1e-4)
    for other in ("nf4", "int4"):
        with pytest.raises(ValueError, match="embedding takes"):
            quantize_tied_embedding(_tied_lm()[0], other, 64)


def test_onnx_tied_embedding_left_alone_when_not_the_pattern():
    """An embedding read by anything besides Gather and the lm_head's Transpose -> MatMul is not touched."""
    from sea_edge.export.quantize_onnx import quantize_tied_embedding

    model, _ = _tied_lm()
    model.graph.node.append(helper.make_node("ReduceSum", ["lm_head.weight"], ["total"]))
    model.graph.output.append(helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, None))
    before = model.SerializeToString()
    assert quantize_tied_embedding(model, "int8", 256) is None
    assert model.SerializeToString() == before
    odd, _ = _tied_lm(E=96)  # no int8 block size (64 and up) divides 96
    assert quantize_tied_embedding(odd, "int8", 256) is None
