"""Triton kernel of a bidirectional SEA estimator's query side (reference.performer_query_ref; layout in reference.py):
Performer features of q, their product with the keys' state kv, the normalisation by its last column, the
concatenation with q / |q| and the encoder's input LayerNorm, in one pass over q.

Why: in eager torch these are ~10 passes over (B, H, T, m) and (B, H, T, 2D + E) fp32 tensors (m = 266 features for
D = 64: the features alone are 837 MB at T = 65536 and 12 heads), ~8 ms of the 28 ms bidirectional layer at that
length on an H100 (kernels/NOTES.md). Here one program per (BLOCK_T rows, head) holds its rows' q, walks the m
features in chunks of BLOCK_F (phi = exp(x_hat . w - sqrt(D) / 2) in registers, then phi @ kv[chunk] on tensor
cores into a (BLOCK_T, D + E + 1) accumulator), and writes only the normalised encoder input: q is read once and
(2D + E) fp32 values per row are written once. kv (m x (D + E + 1) per head, 205 KB fp32 at E = 128) is read from
L2 by every program. Products run in fp32 ("ieee") unless torch allows TF32 matmuls, as torch's own path would.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import PERFORMER_CLAMP

__all__ = ["performer_query_triton"]

_CFG = {"performer_block_t": 32, "performer_block_f": 32, "performer_warps": 4}  # sea_edge.bench_layer --sweep


@triton.jit
def _performer_query_fwd_kernel(
    Q, Proj, KV, LnW, LnB, Out,
    T, M, eps, q_scale, z_shift, clamp,
    stride_qb, stride_qh, stride_qt,
    stride_kvb, stride_kvh, stride_kvm,
    stride_ob, stride_oh, stride_ot,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G  # query head h reads the keys' state of head h // G
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_D)
    qn = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)[:, None]  # F.normalize
    xt = qn * q_scale  # norm D^(1/4)
    W: tl.constexpr = D + E + 1
    w = tl.arange(0, BLOCK_W)
    wmask = w < W
    acc = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)  # num = phi(q) @ kv
    kv_base = KV + b * stride_kvb + hk * stride_kvh
    for f0 in range(0, M, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < M
        pw = tl.load(Proj + f[:, None] * D + d[None, :], mask=fmask[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            z = tl.dot(xt, tl.trans(pw), input_precision="ieee")  # (BLOCK_T, BLOCK_F)
        else:
            z = tl.dot(xt, tl.trans(pw))
        phi = tl.where(fmask[None, :], tl.exp(tl.minimum(z - z_shift, clamp)), 0.0)
        kvc = tl.load(kv_base + f[:, None] * stride_kvm + w[None, :], mask=fmask[:, None] & wmask[None, :],
                      other=0.0)  # (BLOCK_F, BLOCK_W)
        if IEEE:
            acc = tl.dot(phi, kvc, acc, input_precision="ieee")
        else:
            acc = tl.dot(phi, kvc, acc)
    den = tl.sum(tl.where(w[None, :] == W - 1, acc, 0.0), axis=1)  # (BLOCK_T,) last column: phi(q) . sum phi(k)
    ctx = tl.where((w < W - 1)[None, :], acc / tl.maximum(den, 1e-30)[:, None], 0.0)  # (BLOCK_T, BLOCK_W)
    # LayerNorm over the 2D + E values [ctx, qn] of each row
    F: tl.constexpr = 2 * D + E
    mean = (tl.sum(ctx, axis=1) + tl.sum(qn, axis=1)) / F
    dc = tl.where((w < W - 1)[None, :], ctx - mean[:, None], 0.0)
    dq = tl.where(dmask[None, :], qn - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(dc * dc, axis=1) + tl.sum(dq * dq, axis=1)) / F + eps)
    o_base = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot
    cmask = (w < W - 1)[None, :]
    lw = tl.load(LnW + w, mask=w < W - 1, other=0.0)
    lb = tl.load(LnB + w, mask=w < W - 1, other=0.0)
    tl.store(o_base + w[None, :], dc * rstd[:, None] * lw[None, :] + lb[None, :], mask=rmask[:, None] & cmask)
    lw = tl.load(LnW + (W - 1) + d, mask=dmask, other=0.0)
    lb = tl.load(LnB + (W - 1) + d, mask=dmask, other=0.0)
    tl.store(o_base + (W - 1) + d[None, :], dq * rstd[:, None] * lw[None, :] + lb[None, :],
             mask=rmask[:, None] & dmask[None, :])


def performer_query_triton(q, proj, kv, ln_w, ln_b, eps: float = 1e-5):
    """reference.performer_query_ref in one Triton launch (inference: no autograd): (B, H, T, 2D + E) fp32."""
    B, H, T, D = q.shape
    if kv.dim() != 4 or kv.shape[0] != B or H % kv.shape[1]:
        raise ValueError(f"kv must be (B, Hkv, m, D + E + 1) with H = {H} a multiple of Hkv, got {tuple(kv.shape)}")
    Hkv, M, W = kv.shape[1:]
    E = W - D - 1
    if tuple(proj.shape) != (M, D) or E < 0:
        raise ValueError(f"proj must be (m, D) = {(M, D)} and kv's last dim D + E + 1 > D, got {tuple(proj.shape)}, "
                         f"{tuple(kv.shape)}")
    if ln_w.numel() != 2 * D + E:
        raise ValueError(f"LayerNorm width {ln_w.numel()} != 2D + E = {2 * D + E}")
    f32 = (lambda t: t.detach().to(device=q.device, dtype=torch.float32).contiguous())
    q, proj, kv = q.contiguous(), f32(proj), f32(kv)
    out = torch.empty(B, H, T, 2 * D + E, device=q.device, dtype=torch.float32)
    bt = _CFG["performer_block_t"]
    grid = (triton.cdiv(T, bt), B * H)
    ieee = not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32)  # as torch's own fp32 matmuls would
    _performer_query_fwd_kernel[grid](
        Q=q, Proj=proj, KV=kv, LnW=f32(ln_w), LnB=f32(ln_b), Out=out,
        T=T, M=M, eps=float(eps), q_scale=D**0.25, z_shift=0.5 * math.sqrt(D), clamp=PERFORMER_CLAMP,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kvb=kv.stride(0), stride_kvh=kv.stride(1), stride_kvm=kv.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        H=H, G=H // Hkv, D=D, E=E, BLOCK_T=bt, BLOCK_F=_CFG["performer_block_f"],
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_W=triton.next_power_of_2(W), IEEE=ieee,
        num_warps=_CFG["performer_warps"],
    )
    return out
