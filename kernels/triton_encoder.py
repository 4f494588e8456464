"""Triton kernel of a SEA estimator's encoder MLP, its decoder's input rows and its output-mix scalars, in one pass
over the normalised encoder input (reference.encoder_ref):

    feat = W2 GELU(W1 x + b1) + b2 + head_embed[h]
    img = W_rows feat + b_rows;  mix, gain = sigmoid(W_mix feat + b_mix)

Layout: x (B, H, T, F) fp32 with F = 2D + E (performer_query_triton / performer_causal_triton write it), Wd = 2D the
encoder width, N = C K / r the decoder's input row; img (B, H, T, N), mix and gain (B, H, T), fp32.

Why: in eager torch these are three GEMMs and ~6 elementwise passes over (B, H, T, Wd) fp32 tensors (GELU, the
second bias, the head embedding, the mixer's GEMM and sigmoid), each a round trip through HBM: 402 MB per pass at
T = 65536 and 12 heads. Here one program per (BLOCK_T rows, head) reads its rows of x once in chunks of BLOCK_F
columns (the first product accumulates on tensor cores), keeps the hidden and feature rows in registers, and writes
only img and the two scalars. The weights (~200 KB fp32) are read from L2 by every program. Products run in fp32
("ieee") unless torch allows TF32 matmuls, as torch's own path would. feat itself is never written: nothing in
inference reads it (EstimatorOutput.features is None on this path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["encoder_triton"]

_CFG = {"encoder_block_t": 64, "encoder_block_f": 64, "encoder_block_n": 64, "encoder_warps": 4}


@triton.jit
def _tf32(x):
    """fp32 rounded to TF32's 10 mantissa bits (to nearest, ties away), as cuBLAS's TF32 GEMMs round their inputs;
    tl.dot's TF32 path drops the 13 low bits instead, about twice the error (triton-lang/triton#4574)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = 0xFFFFE000


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(_tf32(a), _tf32(b), acc)


@triton.jit
def _encoder_fwd_kernel(
    X, W1, B1, W2, B2, HeadEmbed, WRows, BRows, WMix, BMix, Img, Mix, Gain,
    T,
    H: tl.constexpr, F: tl.constexpr, WD: tl.constexpr, N: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_WD: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    h = bh % H
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    grow = bh * T + rows  # (BLOCK_T,) the rows' index in (B * H * T)
    w = tl.arange(0, BLOCK_WD)
    wmask = w < WD
    # hidden = x @ W1^T over F in chunks: the (BLOCK_T x F) rows never sit in registers whole
    acc = tl.zeros([BLOCK_T, BLOCK_WD], dtype=tl.float32)
    for f0 in tl.range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < F
        xc = tl.load(X + grow[:, None] * F + f[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0)
        w1t = tl.load(W1 + w[None, :] * F + f[:, None], mask=fmask[:, None] & wmask[None, :], other=0.0)  # (BF, BWD)
        acc = _dot(xc, w1t, acc, IEEE)
    hid = acc + tl.load(B1 + w, mask=wmask, other=0.0)[None, :]
    hid = 0.5 * hid * (1.0 + tl.erf(hid * 0.7071067811865476))  # nn.GELU(): the exact erf form
    w2t = tl.load(W2 + w[None, :] * WD + w[:, None], mask=wmask[:, None] & wmask[None, :], other=0.0)  # (BWD, BWD)
    bias = tl.load(B2 + w, mask=wmask, other=0.0) + tl.load(HeadEmbed + h * WD + w, mask=wmask, other=0.0)
    feat = _dot(hid, w2t, tl.zeros([BLOCK_T, BLOCK_WD], dtype=tl.float32), IEEE) + bias[None, :]
    # the output mix: two dot products per row on the CUDA cores (a (BLOCK_T x 2) product is below tl.dot's 16)
    zm = tl.sum(feat * tl.load(WMix + w, mask=wmask, other=0.0)[None, :], axis=1) + tl.load(BMix)
    zg = tl.sum(feat * tl.load(WMix + WD + w, mask=wmask, other=0.0)[None, :], axis=1) + tl.load(BMix + 1)
    tl.store(Mix + grow, tl.sigmoid(zm), mask=rmask)
    tl.store(Gain + grow, tl.sigmoid(zg), mask=rmask)
    # the decoder's rows, BLOCK_N outputs at a time
    for n0 in tl.static_range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < N
        w3t = tl.load(WRows + n[None, :] * WD + w[:, None], mask=wmask[:, None] & nmask[None, :], other=0.0)
        o = _dot(feat, w3t, tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32), IEEE)
        o += tl.load(BRows + n, mask=nmask, other=0.0)[None, :]
        tl.store(Img + grow[:, None] * N + n[None, :], o, mask=rmask[:, None] & nmask[None, :])


def encoder_triton(x, w1, b1, w2, b2, head_embed, w_rows, b_rows, w_mix, b_mix):
    """reference.encoder_ref on the GPU (inference: no autograd): (img (B, H, T, N), mix (B, H, T), gain (B, H, T)),
    fp32."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, T, F), got shape {tuple(x.shape)}")
    B, H, T, F = x.shape
    Wd, N = w1.shape[0], w_rows.shape[0]
    shapes = {"w1": (w1, (Wd, F)), "b1": (b1, (Wd,)), "w2": (w2, (Wd, Wd)), "b2": (b2, (Wd,)),
              "head_embed": (head_embed, (H, Wd)), "w_rows": (w_rows, (N, Wd)), "b_rows": (b_rows, (N,)),
              "w_mix": (w_mix, (2, Wd)), "b_mix": (b_mix, (2,))}
    for name, (t, want) in shapes.items():
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be {want} for x {tuple(x.shape)}, got {tuple(t.shape)}")
    f32 = (lambda t: t.detach().to(device=x.device, dtype=torch.float32).contiguous())
    x = f32(x)
    img = torch.empty(B, H, T, N, device=x.device, dtype=torch.float32)
    mix = torch.empty(B, H, T, device=x.device, dtype=torch.float32)
    gain = torch.empty_like(mix)
    if img.numel() == 0:
        return img, mix, gain
    bt = _CFG["encoder_block_t"]
    _encoder_fwd_kernel[(triton.cdiv(T, bt), B * H)](
        X=x, W1=f32(w1), B1=f32(b1), W2=f32(w2), B2=f32(b2), HeadEmbed=f32(head_embed), WRows=f32(w_rows),
        BRows=f32(b_rows), WMix=f32(w_mix), BMix=f32(b_mix), Img=img, Mix=mix, Gain=gain,
        T=T, H=H, F=F, WD=Wd, N=N, BLOCK_T=bt, BLOCK_F=_CFG["encoder_block_f"],
        BLOCK_WD=max(16, triton.next_power_of_2(Wd)),
        BLOCK_N=min(_CFG["encoder_block_n"], max(16, triton.next_power_of_2(N))),
        IEEE=not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32),  # as torch's own fp32 matmuls would
        num_warps=_CFG["encoder_warps"],
    )
    return img, mix, gain
