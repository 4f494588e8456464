"""Weight-only blockwise quantization of Linear layers, torchao-style: `quantize_(model, BnbInt8Config())`.

Layout, the same for every scheme: a Linear weight W is (N, K) = (out_features, in_features); each output row is
cut into blocks of `block_size` consecutive weights along K (the reduction dimension), and each block gets one scale
(and, for int4, one offset). The dequantized weight is computed in fp32 as onnxruntime computes it (ONNX
DequantizeLinear for int8, com.microsoft.MatMulBnb4 for nf4, com.microsoft.MatMulNBits plus a per-block offset
product for int4: sea_edge.export.quantize_onnx), so that the graph's weights equal these (`quantized_weights` hands
the rewrite the numbers).

    scheme  codes                         weight                  per block                   last block of a row
    int8    int8 in [-127, 127]           q * scale               scale absmax / 127 (fp32)   may be short
    int4    uint4 in [0, 15], 2 per byte  q * scale + min         scale (max - min) / 15,     may be short
                                                                  min (both fp16 values)
    nf4     4-bit NormalFloat, 2 per byte NF4 table[q] * absmax   absmax (fp32)               K % B == 0 required

int8 is bitsandbytes' blockwise quantization (`quantize_blockwise`) with a linear symmetric code instead of its
default dynamic one, so that each code is a plain int8 and the scale is absmax / 127: what ONNX DequantizeLinear
(int8, zero point 0) expresses. nf4 is bitsandbytes' `quantize_4bit(quant_type="nf4")` unchanged; its blocks run over
the flattened weight, which is why K must be a multiple of the block size (then they are the per-row blocks above,
and also what MatMulBnb4 reads). int4 has no bitsandbytes equivalent: plain torch, asymmetric round to nearest on
16 levels from the block's min to its max: GGUF's Q4_1 (d * q + m, fp16 d and m), so a model distributed as Q4_1
GGUF (the default teacher) gets exactly its own weights back, where any symmetric grid (absmax / 7) moves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .estimator import SEAEstimator

__all__ = [
    "SCHEMES",
    "TARGETS",
    "BnbInt8Config",
    "BnbNF4Config",
    "Int4Config",
    "QuantizedLinear",
    "check_scheme",
    "dequantize_weight",
    "quantize_",
    "quantize_to_numpy",
    "quantize_weight",
    "quantized_state",
    "quantized_weights",
]

TARGETS = ("estimator", "teacher", "all")

# Block sizes each scheme accepts, and why:
# int8: bitsandbytes' quantize_blockwise (its CUDA kernels exist for these sizes only).
# nf4: bitsandbytes' 4-bit kernels (32..4096) AND onnxruntime's MatMulBnb4 (16..256).
# int4: powers of two >= 16, what onnxruntime's MatMulNBits takes.
SCHEMES: dict[str, tuple[int, ...]] = {
    "int8": (64, 128, 256, 512, 1024, 2048, 4096),
    "nf4": (32, 64, 128, 256),
    "int4": tuple(2**i for i in range(4, 13)),
}


def _bnb():
    """bitsandbytes.functional, imported lazily. Its CPU backend logs a warning at import on AVX512-BF16 machines
    when the optional Hugging Face `kernels` package (a faster 4-bit GEMM we do not use) is absent: silenced."""
    import logging

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    finally:
        log.setLevel(level)
    return bnbf


def check_scheme(scheme: str, block_size: int) -> None:
    """ValueError, naming the bad value, unless `scheme` is known and takes `block_size`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if block_size not in SCHEMES[scheme]:
        raise ValueError(f"{scheme} block_size must be one of {', '.join(map(str, SCHEMES[scheme]))}, got {block_size}")


def _check_config(cfg) -> None:
    check_scheme(cfg.scheme, cfg.block_size)
    if cfg.target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got {cfg.target!r}")


@dataclass(frozen=True)
class BnbInt8Config:
    """int8 weights, bitsandbytes blockwise with a linear code (scale absmax / 127 per block)."""

    block_size: int = 256
    """Weights per scale. 256: on Gaussian weights SQNR moves little with it (44.5 dB at 64, 43.3 at 256), so favour
    few scales (1.6 % of the bytes)."""
    target: str = "estimator"
    """"estimator": the Linears of the SEA estimators; "teacher": every other Linear; "all": both."""
    scheme: ClassVar[str] = "int8"

    def __post_init__(self):
        _check_config(self)


@dataclass(frozen=True)
class BnbNF4Config:
    """4-bit NormalFloat weights, bitsandbytes `quantize_4bit(quant_type="nf4")` (scale absmax per block)."""

    block_size: int = 64
    """Weights per scale. 64: bitsandbytes' and QLoRA's default for NF4 (6 % of the bytes go to scales)."""
    target: str = "estimator"
    """"estimator": the Linears of the SEA estimators; "teacher": every other Linear; "all": both."""
    scheme: ClassVar[str] = "nf4"

    def __post_init__(self):
        _check_config(self)


@dataclass(frozen=True)
class Int4Config:
    """Asymmetric int4 weights: 16 levels from each block's min to its max, fp16 scale and min (GGUF's Q4_1);
    no bitsandbytes equivalent."""

    block_size: int = 32
    """Weights per scale and min. 32: GGUF's Q4_1 block (the default teacher's weights are Q4_1 codes in blocks of
    32, which this grid then reproduces exactly); 4 bytes of scale and min per 32 weights."""
    target: str = "estimator"
    """"estimator": the Linears of the SEA estimators; "teacher": every other Linear; "all": both."""
    scheme: ClassVar[str] = "int4"

    def __post_init__(self):
        _check_config(self)


QuantConfig = BnbInt8Config | BnbNF4Config | Int4Config


# -- the numbers: quantize / dequantize one (N, K) weight -------------------------------------------------------------
def _shapes(scheme: str, N: int, K: int, B: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(codes shape, scales shape) of an (N, K) weight."""
    nb = math.ceil(K / B)
    if scheme == "int8":
        return (N, K), (N, nb)
    return (N, math.ceil(K / 2)), (N, nb)  # int4 / nf4: two codes per byte (int4: mins shaped as scales)


def _pad_to_blocks(w: torch.Tensor, B: int) -> torch.Tensor:
    """(N, K) -> (N, nb * B), zeros appended to each row: a zero never raises a block's absmax, so the short last
    block of a row is quantized as if it stood alone."""
    K = w.shape[1]
    return F.pad(w, (0, math.ceil(K / B) * B - K))


def _div(x: torch.Tensor, d: int) -> torch.Tensor:
    """x / d correctly rounded on every device: CUDA divides by a Python scalar through its reciprocal (1 ulp off
    now and then), by a tensor exactly, so the scales come out the same on CPU and CUDA."""
    return x / torch.full_like(x, d)


def _linear_int8_code(device) -> torch.Tensor:
    """bitsandbytes code map with code[i] = (i - 128) / 127: index i stores the int8 value q = i - 128, and
    quantize_blockwise picks the nearest code to w / absmax. Index 0 (-128 / 127, below -1) is never the nearest to
    a value in [-1, 1], so q stays in [-127, 127] (all-zero blocks aside, fixed in `_quantize_int8`)."""
    return (torch.arange(256, dtype=torch.float32, device=device) - 128) / 127


def _quantize_int8(w: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes rounds to the nearest code up to near-ties: its CPU kernel takes the neighbour within ~0.002 of a
    tie (0.1 % of Gaussian weights, harmless), and its CUDA kernel breaks those ties its own way, so a few codes
    differ between devices (the scales do not)."""
    bnbf = _bnb()

    N, K = w.shape
    wp = _pad_to_blocks(w, B)  # (N, nb * B): bitsandbytes' flat blocks are now per-row blocks
    idx, state = bnbf.quantize_blockwise(wp, code=_linear_int8_code(w.device), blocksize=B)
    absmax = state.absmax.view(N, -1).float()  # (N, nb)
    q = (idx.to(torch.int16) - 128).view(N, -1, B)  # (N, nb, B)
    # bitsandbytes' CPU kernel maps an all-zero block (absmax 0) to index 0; any code times scale 0 is 0, but an
    # int8 of -128 would leave the symmetric range: store 0 instead.
    q = q.masked_fill((absmax == 0).unsqueeze(-1), 0)
    codes = q.view(N, -1)[:, :K].to(torch.int8).contiguous()  # (N, K)
    return codes, _div(absmax, 127)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to the nearest fp16 (what the file stores), kept in fp32."""
    return x.to(torch.float16).to(torch.float32)


def _quantize_int4(w: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K = w.shape
    pad = math.ceil(K / B) * B - K  # the short last block: padding that never sets its min or max
    lo = F.pad(w, (0, pad), value=math.inf).view(N, -1, B).amin(-1)  # (N, nb)
    hi = F.pad(w, (0, pad), value=-math.inf).view(N, -1, B).amax(-1)
    scales, mins = _fp16(_div(hi - lo, 15)), _fp16(lo)
    if not (torch.isfinite(scales).all() and torch.isfinite(mins).all()):
        raise ValueError("int4: a block's min or range exceeds fp16 (65504): int4 stores fp16 scales and mins")
    per = lambda t: t.repeat_interleave(B, 1)[:, :K]  # noqa: E731
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a flat block: codes 0, weight = its min
    q = torch.round((w - per(mins)) / per(safe)).clamp(0, 15).to(torch.uint8)  # (N, K)
    return _pack_int4(q), scales, mins


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> (N, ceil(K / 2)) uint8, element 2j in the low nibble (MatMulNBits' order)."""
    nib = F.pad(q.to(torch.uint8), (0, q.shape[1] % 2))  # row padded to even
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _unpack_int4(codes: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of `_pack_int4`: (N, ceil(K / 2)) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).view(codes.shape[0], -1)[:, :K]


def _quantize_nf4(w: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    bnbf = _bnb()

    N, K = w.shape
    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=B, quant_type="nf4", quant_storage=torch.uint8)
    return packed.view(N, K // 2), state.absmax.float().view(N, K // B)  # flat element 2j in the HIGH nibble


def quantize_weight(weight: torch.Tensor, scheme: str, block_size: int, name: str = "weight"):
    """Quantize an (N, K) weight. Returns (codes, scales, mins): see the module docstring for their layout; mins
    (fp32 (N, ceil(K / B)) holding fp16 values) for int4, None for the symmetric int8 and nf4.

    Runs where the weight is (CPU or CUDA), in fp32. `name` only labels the errors."""
    check_scheme(scheme, block_size)
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: the weight holds inf or NaN")
    K = w.shape[1]
    if scheme == "nf4":
        if K % block_size:
            raise ValueError(f"{name}: in_features {K} is not a multiple of the nf4 block_size {block_size} "
                             "(bitsandbytes and MatMulBnb4 block the flattened weight); pick a block size dividing it")
        return (*_quantize_nf4(w, block_size), None)
    if scheme == "int8":
        return (*_quantize_int8(w, block_size), None)
    try:
        return _quantize_int4(w, block_size)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, scheme: str, block_size: int,
                      shape: tuple[int, int], mins: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) fp32 weight: value(code) * scale of its block (int8, nf4), or code * scale + min (int4, which needs
    `mins`); one fp32 product (and sum) per element."""
    N, K = shape
    if scheme == "nf4":
        bnbf = _bnb()

        # a QuantState rather than absmax= and out=: bitsandbytes 0.50 has no CPU kernel for the out= variant
        state = bnbf.QuantState(absmax=scales.reshape(-1), shape=torch.Size((N, K)), blocksize=block_size,
                                code=bnbf.get_4bit_type("nf4", device=codes.device), quant_type="nf4",
                                dtype=torch.float32)
        return bnbf.dequantize_4bit(codes.reshape(-1, 1), state)
    per = lambda t: t.repeat_interleave(block_size, dim=1)[:, :K]  # noqa: E731 (block -> element)
    if scheme == "int8":
        return codes.float() * per(scales)
    if mins is None:
        raise ValueError("int4 weights need their block mins")
    return _unpack_int4(codes, K).float() * per(scales) + per(mins)


# -- the module --------------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear holding quantized weights: `codes` and `scales` are buffers (state_dict / safetensors
    carry them); forward dequantizes to the input's dtype and calls F.linear. Not trainable (the bias stays a
    Parameter only so that its state_dict key matches nn.Linear's)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, block_size: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_scheme(scheme, block_size)
        if scheme == "nf4" and in_features % block_size:
            raise ValueError(f"nf4: in_features {in_features} is not a multiple of block_size {block_size}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.block_size = scheme, block_size
        cshape, sshape = _shapes(scheme, out_features, in_features, block_size)
        code_dtype = torch.int8 if scheme == "int8" else torch.uint8
        self.register_buffer("codes", torch.zeros(cshape, dtype=code_dtype, device=device))
        self.register_buffer("scales", torch.zeros(sshape, dtype=torch.float32, device=device))
        if scheme == "int4":
            self.register_buffer("mins", torch.zeros(sshape, dtype=torch.float32, device=device))
        else:
            self.register_buffer("mins", None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, block_size: int, name: str = "linear") -> QuantizedLinear:
        w = linear.weight
        codes, scales, mins = quantize_weight(w, scheme, block_size, name)  # first: its errors name the layer
        q = cls(linear.in_features, linear.out_features, scheme, block_size, linear.bias is not None,
                device=w.device, dtype=w.dtype)
        q.codes.copy_(codes)
        q.scales.copy_(scales)
        if mins is not None:
            q.mins.copy_(mins)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def _apply(self, fn, recurse=True):
        """model.half() / .to(torch.bfloat16) cast the bias but not the fp32 scales (rounding them would change the
        weights and break the match with the exported graph); .cuda() / .to(device) move the scales with the codes."""
        scales, mins = self.scales, self.mins
        super()._apply(fn, recurse)
        self.scales = scales.to(self.codes.device)
        if mins is not None:
            self.mins = mins.to(self.codes.device)
        return self

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight this layer multiplies by."""
        return dequantize_weight(self.codes, self.scales, self.scheme, self.block_size,
                                 (self.out_features, self.in_features), self.mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, block_size={self.block_size}")


def _record(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, scheme: str, block_size: int,
            shape: tuple[int, int]) -> dict:
    codes = codes.detach().cpu()
    if scheme == "int4":
        codes = _unpack_int4(codes, shape[1])
    rec = {
        "scheme": scheme,
        "block_size": block_size,
        "shape": tuple(shape),
        "codes": codes.numpy().copy(),
        "scales": scales.detach().cpu().numpy().astype(np.float32, copy=True),
    }
    if mins is not None:
        rec["mins"] = mins.detach().cpu().numpy().astype(np.float32, copy=True)
    return rec


def quantized_weights(module: QuantizedLinear) -> dict:
    """What an ONNX rewrite needs to carry exactly this layer's numbers, as numpy (torch layout, W is (N, K)):

    - scheme, block_size, shape (N, K)
    - codes: int8 (N, K) for int8; uint8 (N, K) in [0, 15] for int4 (unpacked); nf4: uint8 (N, K / 2),
      bitsandbytes' packing (flat element 2j in the high nibble), whose flattening is MatMulBnb4's input B
    - scales: fp32 (N, ceil(K / B)); the dequantized weight is value(code) * scales[n, k // B] (for nf4 the scales
      are the absmax, flattened they are MatMulBnb4's input absmax)
    - mins (int4 only): fp32 (N, ceil(K / B)) holding fp16 values; the weight is code * scale + min
    """
    if not isinstance(module, QuantizedLinear):
        raise TypeError(f"expected a QuantizedLinear, got {type(module).__name__}")
    return _record(module.codes, module.scales, module.mins, module.scheme, module.block_size,
                   (module.out_features, module.in_features))


def quantize_to_numpy(weight: torch.Tensor, scheme: str, block_size: int, name: str = "weight") -> dict:
    """`quantized_weights` of the QuantizedLinear that this (N, K) weight would become (same function, same numbers)."""
    codes, scales, mins = quantize_weight(weight, scheme, block_size, name)
    return _record(codes, scales, mins, scheme, block_size, tuple(weight.shape))


def quantized_state(model: nn.Module) -> dict[str, dict]:
    """`quantized_weights` of every QuantizedLinear of `model`, keyed "<module path>.weight" (the key of the weight
    it replaced, and the name sea_edge.export.quantize_onnx gives the weights of an exported graph)."""
    return {f"{name}.weight" if name else "weight": quantized_weights(m)
            for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# -- quantize_ ---------------------------------------------------------------------------------------------------------
def _targets(model: nn.Module, target: str) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, path, linear) of each Linear to quantize.

    Estimator Linears are those inside any SEAEstimator module: the `.sea` of each layer sea_layers(model) finds, or
    `model` itself when it is a bare estimator. A Linear whose weight IS an embedding's weight (a tied lm_head) is
    left alone: quantizing it would either untie it or quantize the embedding too."""
    in_estimator = {id(m) for est in model.modules() if isinstance(est, SEAEstimator) for m in est.modules()}
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for parent_path, parent in model.named_modules():
        for attr, child in parent.named_children():
            if not isinstance(child, nn.Linear) or id(child.weight) in tied:
                continue
            is_est = id(child) in in_estimator
            if target == "all" or (target == "estimator") == is_est:
                out.append((parent, attr, f"{parent_path}.{attr}" if parent_path else attr, child))
    return out


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace (in place) each Linear of `model` that `config.target` selects by a QuantizedLinear. Returns `model`.

    Every layer is quantized before any is swapped in, so a ValueError (a layer whose shape the scheme cannot take,
    named in the message; no layer matching the target) leaves the model untouched. A Linear shared by several
    parents becomes one QuantizedLinear shared the same way."""
    if not isinstance(config, (BnbInt8Config, BnbNF4Config, Int4Config)):
        raise TypeError(f"config must be BnbInt8Config, BnbNF4Config or Int4Config, got {type(config).__name__}")
    targets = _targets(model, config.target)
    if not targets:
        hint = " (no SEA estimator in the model: call sea_edge.to_sea first)" if config.target == "estimator" else ""
        raise ValueError(f"no nn.Linear of {type(model).__name__} matches target {config.target!r}{hint}")
    done: dict[int, QuantizedLinear] = {}
    with torch.no_grad():
        for _, _, path, linear in targets:
            if id(linear) not in done:
                done[id(linear)] = QuantizedLinear.from_linear(linear, config.scheme, config.block_size, path)
    for parent, attr, _, linear in targets:
        setattr(parent, attr, done[id(linear)])
    return model
