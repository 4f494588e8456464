"""The teacher's own attention on a SEA layer's q, k, v: distillation targets and quality measures.

The dense attention A (B, H, T, S) is computed a block of queries at a time, so memory stays at (chunk x S) per head
even at long T; only per-query summaries leave each block:
    A_c (B, H, T, K)   A summed over each compressed column's key span: the target of the estimate. KL(A || P_hat
                       spread uniformly over each span) equals KL(A_c || P_hat) plus a term the estimator cannot
                       change, so the compressed KL has exactly the gradients of SEA.md's interpolated one.
    out (B, H, T, D)   the teacher's attention output A @ v: the target of the layer's output loss.
    recall (B, H, T)   the share of A that falls on the keys in idx ("mass recall"), when idx is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sea_edge.kernels import column_spans

__all__ = ["AttentionTargets", "attention_targets", "compressed_kl"]


@dataclass
class AttentionTargets:
    compressed: torch.Tensor  # (B, H, T, K)
    out: torch.Tensor  # (B, H, T, D)
    recall: torch.Tensor | None  # (B, H, T)


@torch.no_grad()
@torch.autocast("cuda", enabled=False)  # the target is the teacher's fp32 attention, also inside bf16 training
def attention_targets(q, k, v, scale: float, causal: bool, K: int, key_valid=None, idx=None,
                      chunk: int = 256) -> AttentionTargets:
    """Dense softmax attention of q over k, v (GQA, queries = the last T of S positions), summarised per query."""
    B, H, T, D = q.shape
    S = k.shape[2]
    heads = torch.arange(H, device=q.device) // (H // k.shape[1])
    kh, vh = k[:, heads].float(), v[:, heads].float()  # (B, H, S, D)
    comp = torch.empty(B, H, T, K, device=q.device)
    out = torch.empty(B, H, T, D, device=q.device)
    recall = None if idx is None else torch.empty(B, H, T, device=q.device)
    start_all, end_all = column_spans(torch.arange(K, device=q.device).expand(T, K), K, S, causal)  # (T, K)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = (q[:, :, t0:t1].float() @ kh.transpose(-1, -2)) * scale  # (B, H, c, S)
        if causal:
            pos = torch.arange(S - T + t0, S - T + t1, device=q.device).view(-1, 1)
            s = s.masked_fill(torch.arange(S, device=q.device).view(1, S) > pos, float("-inf"))
        if key_valid is not None:
            s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        a = torch.softmax(s, dim=-1).nan_to_num(0.0)  # (B, H, c, S); a row with no key is all zero
        out[:, :, t0:t1] = a @ vh
        # per-span sums through a prefix sum along the keys: A_c[i, j] = cum[end_j(i)] - cum[start_j(i)]
        cum = torch.nn.functional.pad(a.cumsum(-1), (1, 0))  # (B, H, c, S + 1)
        start, end = start_all[t0:t1], end_all[t0:t1]  # (c, K)
        comp[:, :, t0:t1] = cum.gather(-1, end.expand(B, H, -1, -1)) - cum.gather(-1, start.expand(B, H, -1, -1))
        if idx is not None:
            ii = idx[:, :, t0:t1].long()
            recall[:, :, t0:t1] = (a.gather(-1, ii.clamp(min=0)) * (ii >= 0)).sum(-1)
    return AttentionTargets(comp.clamp(min=0), out, recall)


def compressed_kl(compressed: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of KL(A_c || P_hat): compressed (B, H, T, K) target, logp the estimate's log-softmax
    (-inf on empty columns, where the target is 0 and the term is 0)."""
    a = compressed
    return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - logp), 0.0).sum(-1).mean()
