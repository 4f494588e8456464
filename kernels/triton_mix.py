"""Triton kernel of a SEA layer's output mix (SEA.md step 7; reference.mix_output_ref):

    out = mix * gain * sparse + (1 - mix) * num[:, h // group] / max(cnt, 1),  in the queries' dtype

Layout: sparse (B, H, T, D) in the queries' dtype; mix, gain (B, H, T, 1) fp32; num (B, H / group, T or 1, D) fp32,
the average context's numerator (T-stride 0: one average per head, bidirectional); cnt (B, T) or None, its count
(causal: the keys each row sees).

Why: in eager torch the mix is ~6 passes over (B, H, T, D) fp32 tensors (the cast of sparse, two products, a sum, the
causal division and head gather, the cast back): ~2 GB of traffic at T = 65536 and 12 heads. Here each element is
read once in its own dtype and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["mix_output_triton"]

_CFG = {"mix_block_t": 64, "mix_warps": 4}


@triton.jit
def _mix_output_fwd_kernel(
    Sparse, Mix, Gain, Num, Cnt, Out,
    T, stride_nb, stride_nh, stride_nt, stride_nd,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HAS_CNT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hk = (bh % H) // G
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < T
    m2 = rmask[:, None] & (d < D)[None, :]
    grow = bh * T + rows  # (BLOCK_T,) the rows' index in (B * H * T)
    sp = tl.load(Sparse + grow[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    mix = tl.load(Mix + grow, mask=rmask, other=0.0)
    gain = tl.load(Gain + grow, mask=rmask, other=0.0)
    avg = tl.load(Num + b * stride_nb + hk * stride_nh + rows[:, None] * stride_nt + d[None, :] * stride_nd, mask=m2,
                  other=0.0)
    if HAS_CNT:
        avg = avg / tl.maximum(tl.load(Cnt + b * T + rows, mask=rmask, other=1.0), 1.0)[:, None]
    out = (mix * gain)[:, None] * sp + (1.0 - mix)[:, None] * avg
    tl.store(Out + grow[:, None] * D + d[None, :], out.to(Out.dtype.element_ty), mask=m2)


def mix_output_triton(sparse, mix, gain, num, cnt, group: int, dtype):
    """reference.mix_output_ref on the GPU (inference: no autograd): (B, H, T, D) in `dtype`."""
    if sparse.dim() != 4:
        raise ValueError(f"sparse must be (B, H, T, D), got shape {tuple(sparse.shape)}")
    B, H, T, D = sparse.shape
    for name, t in (("mix", mix), ("gain", gain)):
        if tuple(t.shape) != (B, H, T, 1):
            raise ValueError(f"{name} must be (B, H, T, 1) = {(B, H, T, 1)}, got {tuple(t.shape)}")
    if group < 1 or H % group or num.dim() != 4 or tuple(num.shape[:2]) != (B, H // group) or num.shape[3] != D \
            or num.shape[2] not in (1, T):
        raise ValueError(f"num must be (B, H / group, T or 1, D) = ({B}, {H} / {group}, {T} or 1, {D}), "
                         f"got {tuple(num.shape)}")
    if cnt is not None and tuple(cnt.shape) != (B, T):
        raise ValueError(f"cnt must be (B, T) = {(B, T)}, got {tuple(cnt.shape)}")
    sparse = sparse.contiguous()
    f32 = (lambda t: t.to(torch.float32).contiguous())
    mix, gain, num = f32(mix), f32(gain), num.to(torch.float32)  # num: any strides (a transposed scan's view)
    out = torch.empty(B, H, T, D, device=sparse.device, dtype=dtype)
    if out.numel() == 0:
        return out
    bt = _CFG["mix_block_t"]
    _mix_output_fwd_kernel[(triton.cdiv(T, bt), B * H)](
        Sparse=sparse, Mix=mix, Gain=gain, Num=num, Cnt=f32(cnt) if cnt is not None else mix, Out=out,
        T=T, stride_nb=num.stride(0), stride_nh=num.stride(1), stride_nt=num.stride(2) if num.shape[2] > 1 else 0,
        stride_nd=num.stride(3),
        H=H, G=group, D=D, HAS_CNT=cnt is not None, BLOCK_T=bt, BLOCK_D=max(16, triton.next_power_of_2(D)),
        num_warps=_CFG["mix_warps"],
    )
    return out
