"""`sea_edge::sparse_attention`, the one attention op every SEA layer calls.

CPU implementation: the plain-torch reference. CUDA implementation: the Triton kernels of sparse_attention.py, for
the forward op and for the backward op (which recomputes the forward's logsumexp in Triton, since the op's schema
returns only the output). triton is imported inside the CUDA implementations only, so `import sea_edge.kernels`
works without it. A fake (meta) implementation
lets torch.compile / torch.export trace it, and autograd is registered so the estimator can train through it.
Layout: see reference.py.
"""

from __future__ import annotations

import torch

from .reference import sparse_attention_ref

__all__ = ["sparse_attention"]


@torch.library.custom_op("sea_edge::sparse_attention", mutates_args=())
def _sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    return sparse_attention_ref(q, k, v, idx, scale)


@_sparse_attention_op.register_kernel("cuda")
def _(q, k, v, idx, scale):
    from .sparse_attention import sparse_attention_triton  # lazy: triton only where CUDA runs

    return sparse_attention_triton(q, k, v, idx, scale)


@_sparse_attention_op.register_fake
def _(q, k, v, idx, scale):
    return torch.empty_like(q)


def _backward_ref(grad, q, k, v, idx, scale, chunk: int = 256):
    """Backward of sparse_attention_ref written out (fp32 inside, rows `chunk` at a time): the CPU path.

    Not autograd through the reference: inside a custom op's implementation the dispatcher is already below the
    autograd key, so `torch.enable_grad()` there records no graph. Softmax backward: ds = p * (dp - sum(p * dp)).
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    w = idx.shape[-1]
    group = Hq // Hkv
    heads = torch.arange(Hq, device=q.device) // group
    kh, vh = k[:, heads].float(), v[:, heads].float()  # (B, Hq, S, D)
    dq = torch.empty(B, Hq, T, D, device=q.device, dtype=torch.float32)
    dkh = torch.zeros(B, Hq, S, D, device=q.device, dtype=torch.float32)
    dvh = torch.zeros(B, Hq, S, D, device=q.device, dtype=torch.float32)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        ii = idx[:, :, t0:t1].long()  # (B, Hq, t, w)
        valid = ii >= 0
        flat = ii.clamp(min=0).reshape(B, Hq, -1, 1).expand(-1, -1, -1, D)
        kg = kh.gather(2, flat).view(B, Hq, t1 - t0, w, D)
        vg = vh.gather(2, flat).view(B, Hq, t1 - t0, w, D)
        qc, gc = q[:, :, t0:t1].float(), grad[:, :, t0:t1].float()
        s = torch.einsum("bhtd,bhtwd->bhtw", qc, kg) * scale
        p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)  # (B, Hq, t, w)
        dp = torch.einsum("bhtd,bhtwd->bhtw", gc, vg)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale  # (B, Hq, t, w); zero at holes since p = 0
        dq[:, :, t0:t1] = torch.einsum("bhtw,bhtwd->bhtd", ds, kg)
        dkh.scatter_add_(2, flat, torch.einsum("bhtw,bhtd->bhtwd", ds, qc).reshape(B, Hq, -1, D))
        dvh.scatter_add_(2, flat, torch.einsum("bhtw,bhtd->bhtwd", p, gc).reshape(B, Hq, -1, D))
    dk = dkh.view(B, Hkv, group, S, D).sum(2)
    dv = dvh.view(B, Hkv, group, S, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("sea_edge::sparse_attention_bwd", mutates_args=())
def _sparse_attention_bwd_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward_ref(grad, q, k, v, idx, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_sparse_attention_bwd_op.register_kernel("cuda")
def _(grad, q, k, v, idx, scale):
    from .sparse_attention import sparse_attention_triton_bwd

    return sparse_attention_triton_bwd(grad, q, k, v, idx, scale)


@_sparse_attention_bwd_op.register_fake
def _(grad, q, k, v, idx, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, scale = inputs
    ctx.save_for_backward(q, k, v, idx)
    ctx.scale = scale


def _backward(ctx, grad):
    q, k, v, idx = ctx.saved_tensors
    dq, dk, dv = _sparse_attention_bwd_op(grad.contiguous(), q, k, v, idx, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("sea_edge::sparse_attention", _backward, setup_context=_setup_context)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each query row over the keys listed in `idx` (-1 = empty slot); see reference.py for the layout.

    q (B, Hq, T, D), k/v (B, Hkv, S, D), idx (B, Hq, T, w) int32. Returns (B, Hq, T, D) in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or idx.dim() != 4:
        raise ValueError(f"expected 4-d q, k, v, idx; got {q.dim()}, {k.dim()}, {v.dim()}, {idx.dim()}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if tuple(idx.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"idx {tuple(idx.shape)} must start with q's (B, Hq, T) = {tuple(q.shape[:3])}")
    return _sparse_attention_op(q, k, v, idx.to(torch.int32), float(scale))
