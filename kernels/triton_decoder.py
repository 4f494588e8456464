"""Triton kernels of the estimator's decoder CNN (reference.decoder_ref; layout in reference.py): the two 3x3
convolutions over the (T x W) image of C channels, the residual GELU and the LayerNorm over W between them, the pixel
shuffle into K = r W logit columns, the content term and the -inf of unselectable columns, in two launches.

Why: in eager torch the decoder is a dozen passes over (N, C, T, W) fp32 tensors, with cuDNN's NCHW <-> NHWC
transposes around each 4-channel convolution and torch's LayerNorm over rows of only W = 32 or 64 values; at
T = 65536 that was ~15 of the layer's ~38 ms (kernels/NOTES.md, profile of 2026-12-01). Here:
  1. `_decoder_conv1_fwd_kernel`, one program per (BT rows, image n): the C x C x 9 taps as C * 9 shifted loads of
     (BT, W) tiles of the image (the shifts hit L1/L2: each row is read by 3 row taps of the same program), the
     residual, GELU and LayerNorm in registers, z (N, C, T, W) fp32 written once.
  2. `_decoder_conv2_fwd_kernel`, the same tiling over z: r output channels, stored straight into their shuffled
     columns x * r + i of the (N, T, K) logits, with the content term added and the mask applied on the way.
The convolutions are a few dozen multiply-adds per pixel (C = 4): CUDA cores, fp32, no tensor cores needed; the
launches are bound by their memory traffic (image, z twice, content, logits). Causal: output row t sees rows t-2..t,
and rows before the first come from the decode state `rows` (N, C, 2, W) instead of zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decoder_triton"]

# (channels x rows x W) values per 3-D tile: 4096 = 32 fp32 registers per thread at 4 warps; sea_edge.bench_layer --sweep
_CFG = {"decoder_block": 4096, "decoder_warps": 4}


@triton.jit
def _conv3x3_taps(X, Rows, n, rows, xw, T, stride_xn, stride_xc, stride_xt, stride_xw, Wt, Bias,
                  CI: tl.constexpr, CO: tl.constexpr, COP: tl.constexpr, W: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_ROWS: tl.constexpr, BT: tl.constexpr, WP: tl.constexpr):
    """3x3 conv of image X (n, CI, T, W) at output rows `rows` (BT,), all W columns: (COP, BT, WP) fp32 with bias.
    Output row t reads rows t-1..t+1 (bidirectional) or t-2..t (causal; rows -2, -1 from Rows (N, CI, 2, W) when
    given), zero outside the image. Weights Wt (CO, CI, 3, 3) contiguous fp32."""
    co = tl.arange(0, COP)
    chan = (co * 0)[:, None, None]  # (COP, 1, 1) zeros: each tap is loaded straight into the accumulator's 3-D
    acc = tl.zeros([COP, BT, WP], dtype=tl.float32)  # layout (repeated per output channel from L1), so no tile
    for ci in tl.static_range(CI):  # changes layout through shared memory
        for dy in tl.static_range(3):
            r = rows + dy - (2 if CAUSAL else 1)  # (BT,) input row of this tap
            inside = ((r >= 0) & (r < T))[None, :, None] & (chan == 0)
            for dx in tl.static_range(3):
                xs = (xw + dx - 1)[None, None, :]  # (1, 1, WP) input column of this tap
                xm = (xs >= 0) & (xs < W)
                v = tl.load(X + n * stride_xn + ci * stride_xc + chan + r[None, :, None] * stride_xt
                            + xs * stride_xw, mask=inside & xm, other=0.0).to(tl.float32)  # (COP, BT, WP)
                if CAUSAL and HAS_ROWS:
                    prior = ((r >= -2) & (r < 0))[None, :, None] & (chan == 0)
                    v += tl.load(Rows + ((n * CI + ci) * 2 + r[None, :, None] + 2) * W + chan + xs,
                                 mask=prior & xm, other=0.0)
                w = tl.load(Wt + co * (CI * 9) + ci * 9 + dy * 3 + dx, mask=co < CO, other=0.0)  # (COP,)
                acc += w[:, None, None] * v
    return acc + tl.load(Bias + co, mask=co < CO, other=0.0)[:, None, None]


@triton.jit
def _decoder_conv1_fwd_kernel(
    Img, Rows, W1, B1, LnW, LnB, Z,
    T, eps,
    stride_in, stride_ic, stride_it, stride_iw,
    C: tl.constexpr, CP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ROWS: tl.constexpr, BT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rows = pid_t * BT + tl.arange(0, BT)  # (BT,)
    xw = tl.arange(0, WP)
    co = tl.arange(0, CP)
    y = _conv3x3_taps(Img, Rows, n, rows, xw, T, stride_in, stride_ic, stride_it, stride_iw, W1, B1,
                      CI=C, CO=C, COP=CP, W=W, CAUSAL=CAUSAL, HAS_ROWS=HAS_ROWS, BT=BT, WP=WP)  # (CP, BT, WP)
    xm = (xw < W)[None, None, :]
    m3 = (co < C)[:, None, None] & (rows < T)[None, :, None] & xm
    res = tl.load(Img + n * stride_in + co[:, None, None] * stride_ic + rows[None, :, None] * stride_it
                  + xw[None, None, :] * stride_iw, mask=m3, other=0.0).to(tl.float32)
    u = res + 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # exact GELU (nn.GELU's default)
    u = tl.where(xm, u, 0.0)
    mean = tl.sum(u, axis=2) / W  # LayerNorm over the W columns of each (channel, row)
    d = tl.where(xm, u - mean[:, :, None], 0.0)
    var = tl.sum(d * d, axis=2) / W  # biased, as torch's
    lw = tl.load(LnW + xw, mask=xw < W, other=0.0)
    lb = tl.load(LnB + xw, mask=xw < W, other=0.0)
    z = d * tl.math.rsqrt(var + eps)[:, :, None] * lw[None, None, :] + lb[None, None, :]
    tl.store(Z + ((n * C + co[:, None, None]) * T + rows[None, :, None]) * W + xw[None, None, :], z, mask=m3)


@triton.jit
def _decoder_conv2_fwd_kernel(
    Z, Rows, W2, B2, Content, KW, Sel, Out, ColSum,
    T, H,
    stride_cb, stride_ch, stride_ct, stride_ck,
    stride_sb, stride_st, stride_sk,
    C: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_CONTENT: tl.constexpr, HAS_SEL: tl.constexpr,
    SOFTMAX: tl.constexpr, COLSUM: tl.constexpr, BT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    b = n // H
    h = n % H
    rows = pid_t * BT + tl.arange(0, BT)  # (BT,)
    xw = tl.arange(0, WP)
    i = tl.arange(0, RP)
    sub = _conv3x3_taps(Z, Rows, n, rows, xw, T, C * T * W, T * W, W, 1, W2, B2,
                        CI=C, CO=R, COP=RP, W=W, CAUSAL=CAUSAL, HAS_ROWS=HAS_ROWS, BT=BT, WP=WP)  # (RP, BT, WP)
    col = xw[None, None, :] * R + i[:, None, None]  # (RP, 1, WP): pixel shuffle, column x * r + i <- channel i
    m3 = (i < R)[:, None, None] & (rows < T)[None, :, None] & (xw < W)[None, None, :]
    if HAS_CONTENT:
        kw = tl.load(KW + h).to(tl.float32)
        sub += kw * tl.load(Content + b * stride_cb + h * stride_ch + rows[None, :, None] * stride_ct
                            + col * stride_ck, mask=m3, other=0.0).to(tl.float32)
    if HAS_SEL:
        sel = tl.load(Sel + b * stride_sb + rows[None, :, None] * stride_st + col * stride_sk, mask=m3, other=0)
        sub = tl.where(sel != 0, sub, float("-inf"))
    if SOFTMAX:  # the program holds whole rows (all K columns): softmax over them here, not in another pass
        sub = tl.where(m3, sub, float("-inf"))
        mx = tl.max(tl.max(sub, axis=2), axis=0)  # (BT,)
        e = tl.exp(sub - mx[None, :, None])  # a row of only -inf: NaN, as torch.softmax gives
        sub = e / tl.sum(tl.sum(e, axis=2), axis=0)[None, :, None]
        if COLSUM:  # the rows' sum per column (NaN rows as 0), for the bidirectional average context
            part = tl.sum(tl.where(m3 & (sub == sub), sub, 0.0), axis=1)  # (RP, WP)
            c2 = xw[None, :] * R + i[:, None]
            tl.atomic_add(ColSum + n * (W * R) + c2, part, mask=(i < R)[:, None] & (xw < W)[None, :], sem="relaxed")
    tl.store(Out + (n * T + rows[None, :, None]) * (W * R) + col, sub, mask=m3)


def _tail_rows(prev: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The two image rows before the next call: the last two of [prev (zeros if None); x] (N, C, 2, W)."""
    N, C, T, W = x.shape
    if prev is None:
        prev = x.new_zeros(N, C, 2, W)
    return torch.cat([prev.to(x.dtype), x[:, :, max(0, T - 2):]], dim=2)[:, :, -2:]


def _check(img, w1, ln_w, w2, rows1, rows2, content, content_weight, selectable, heads):
    if img.dim() != 4:
        raise ValueError(f"img must be (N, C, T, W), got shape {tuple(img.shape)}")
    N, C, T, W = img.shape
    r = w2.shape[0]
    if tuple(w1.shape) != (C, C, 3, 3) or tuple(w2.shape) != (r, C, 3, 3):
        raise ValueError(f"decoder weights must be (C, C, 3, 3) and (r, C, 3, 3) for C = {C}, got "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    if ln_w.numel() != W:
        raise ValueError(f"LayerNorm width {ln_w.numel()} != image width W = {W}")
    if N % heads:
        raise ValueError(f"image count N = {N} is not a multiple of heads = {heads}")
    for name, rows in (("rows1", rows1), ("rows2", rows2)):
        if rows is not None and tuple(rows.shape) != (N, C, 2, W):
            raise ValueError(f"{name} must be (N, C, 2, W) = {(N, C, 2, W)}, got {tuple(rows.shape)}")
    K = W * r
    if content is not None and (tuple(content.shape) != (N // heads, heads, T, K) or content_weight is None):
        raise ValueError(f"content must be (B, H, T, K) = {(N // heads, heads, T, K)} with a weight per head, "
                             f"got {tuple(content.shape)}")
    if selectable is not None and tuple(selectable.shape) not in ((T, K), (N // heads, 1, T, K)):
        raise ValueError(f"selectable must be (T, K) or (B, 1, T, K) with T = {T}, K = {K}, "
                         f"got {tuple(selectable.shape)}")


def decoder_triton(img, w1, b1, ln_w, ln_b, w2, b2, causal: bool, rows1=None, rows2=None, eps: float = 1e-5,
                   content=None, content_weight=None, selectable=None, heads: int = 1, softmax: bool = False,
                   col_sums: torch.Tensor | None = None):
    """reference.decoder_ref in two Triton launches (inference: no autograd). Same arguments and returns; the
    logits are fp32 (B, heads, T, K).

    softmax: return torch.softmax(logits, -1) instead of the logits (the second launch holds whole rows, so the
    estimate's probabilities cost no pass of their own). col_sums (B * heads, K) fp32, with softmax only: the rows'
    probabilities are added into it per column (rows of NaN count as 0), in no fixed order (fp32 atomics)."""
    _check(img, w1, ln_w, w2, rows1, rows2, content, content_weight, selectable, heads)
    N, C, T, W = img.shape
    r = w2.shape[0]
    K = W * r
    if col_sums is not None and (not softmax or tuple(col_sums.shape) != (N, K) or col_sums.dtype != torch.float32
                                 or not col_sums.is_contiguous()):
        raise ValueError(f"col_sums must be a contiguous fp32 (B * heads, K) = {(N, K)} buffer and needs softmax, "
                         f"got {tuple(col_sums.shape)} {col_sums.dtype} with softmax={softmax}")
    dev = img.device
    f32 = (lambda t: t.detach().to(device=dev, dtype=torch.float32).contiguous())
    CP, RP, WP = triton.next_power_of_2(C), triton.next_power_of_2(r), triton.next_power_of_2(W)
    BT = max(1, min(64, triton.next_power_of_2(T), _CFG["decoder_block"] // (max(CP, RP) * WP)))
    grid = (triton.cdiv(T, BT), N)
    causal = bool(causal)
    z = torch.empty(N, C, T, W, device=dev, dtype=torch.float32)
    _decoder_conv1_fwd_kernel[grid](
        Img=img, Rows=f32(rows1) if (causal and rows1 is not None) else z, W1=f32(w1), B1=f32(b1),
        LnW=f32(ln_w), LnB=f32(ln_b), Z=z,
        T=T, eps=float(eps),
        stride_in=img.stride(0), stride_ic=img.stride(1), stride_it=img.stride(2), stride_iw=img.stride(3),
        C=C, CP=CP, W=W, WP=WP, CAUSAL=causal, HAS_ROWS=causal and rows1 is not None, BT=BT, num_warps=_CFG["decoder_warps"],
    )
    out = torch.empty(N, T, K, device=dev, dtype=torch.float32)
    sel = None
    if selectable is not None:
        sel = selectable.to(dev).view(torch.uint8)  # bool -> the same bytes, loaded as integers
        sel = sel.unsqueeze(0).unsqueeze(0) if sel.dim() == 2 else sel  # (B or 1, 1, T, K)
    has_c = content is not None
    _decoder_conv2_fwd_kernel[grid](
        Z=z, Rows=f32(rows2) if (causal and rows2 is not None) else z, W2=f32(w2), B2=f32(b2),
        Content=content if has_c else z, KW=f32(content_weight) if has_c else z,
        Sel=sel if sel is not None else z, Out=out, ColSum=col_sums if col_sums is not None else z,
        T=T, H=heads,
        stride_cb=content.stride(0) if has_c else 0, stride_ch=content.stride(1) if has_c else 0,
        stride_ct=content.stride(2) if has_c else 0, stride_ck=content.stride(3) if has_c else 0,
        stride_sb=(sel.stride(0) if sel.shape[0] > 1 else 0) if sel is not None else 0,
        stride_st=sel.stride(2) if sel is not None else 0, stride_sk=sel.stride(3) if sel is not None else 0,
        C=C, R=r, RP=RP, W=W, WP=WP, CAUSAL=causal, HAS_ROWS=causal and rows2 is not None,
        HAS_CONTENT=has_c, HAS_SEL=sel is not None, SOFTMAX=bool(softmax), COLSUM=col_sums is not None, BT=BT,
        num_warps=_CFG["decoder_warps"],
    )
    logits = out.view(N // heads, heads, T, K)
    if not causal:
        return logits, None, None
    return logits, _tail_rows(rows1, img), _tail_rows(rows2, z)
