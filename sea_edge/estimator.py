"""SEA's attention estimator for one layer: Performer estimate -> encoder -> decoder CNN -> compressed logits,
plus the two output-mix scalars (SEA.md steps 1-3 and 7).

Shapes: B batch, H query heads, Hkv key/value heads, T queries (the last T of S positions), S keys, D head dim,
K compressed width, m Performer features, C decoder channels, r decoder ratio. The weights are shared by the heads
of a layer (heads are a batch dimension) with a learned per-head embedding, so one estimator costs a few hundred KB.

The decoder CNN runs on a (T x K/r) image of C channels and its last conv emits r channels that are shuffled into
the K columns (pixel shuffle): the same (T x K) logits at full resolution for r times less convolution work and
memory traffic than convolving the upsampled (T x K) image, which at long context is what the layer's time is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sea_edge.kernels import causal_linear_attention_ref, column_scores, decoder_ref, performer_features_ref

from .config import SEAConfig

__all__ = ["SEAEstimator", "EstimatorOutput"]


def _triton_inference(x: torch.Tensor) -> bool:
    """Whether this call runs the estimator's Triton kernels: CUDA tensors and no gradient wanted (inference,
    evaluation). Training, the CPU and the ONNX export run the plain-torch references."""
    return x.is_cuda and not torch.is_grad_enabled()


def _causal_fused() -> bool:
    """Whether a causal estimator runs its Performer by performer_causal_triton when _triton_inference (the
    launch setting `causal_fused` of kernels/triton_performer.py; on since it measured faster than the torch path in
    the layer, kernels/NOTES.md)."""
    from sea_edge.kernels import triton_performer

    return triton_performer._CFG["causal_fused"]


def _linear(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (N, K), bias (N,)) that a Linear multiplies by: an nn.Linear's own, or a quantize.QuantizedLinear's
    dequantized weight (the same product its forward computes)."""
    w = m.dequantize() if hasattr(m, "dequantize") else m.weight
    return w, m.bias if m.bias is not None else w.new_zeros(w.shape[0])


class EstimatorOutput:
    """What the estimator returns for one layer."""

    __slots__ = ("logits", "mix", "gain", "features", "state", "probs", "col_mean")

    def __init__(self, logits, mix, gain, features, state=None, probs=None, col_mean=None):
        self.logits = logits  # (B, H, T, K) compressed attention logits, -inf on empty columns; None when the
        # caller asked for probs on the GPU inference path (the decoder's launch writes those instead)
        self.mix = mix  # (B, H, T, 1) share of the sparse context in the output
        self.gain = gain  # (B, H, T, 1) scale of the sparse context (1 at init)
        self.features = features  # (B, H, T, 2D) encoder features; None on the GPU inference path
        self.state = state  # causal: (performer, rows1, rows2) after the last position, see SEAEstimator.forward
        self.probs = probs  # (B, H, T, K) softmax of the logits (P_hat, SEA.md step 3) when forward(probs=True)
        self.col_mean = col_mean  # bidirectional, with probs on the GPU: (B, H, K) probs' mean over T (NaN as 0)


def _orthogonal_gaussian(m: int, d: int) -> torch.Tensor:
    """FAVOR+ projection: blocks of orthogonal rows rescaled to chi-distributed norms (Performer, sec. 2.4)."""
    blocks, left = [], m
    while left > 0:
        g = torch.randn(d, d)
        q, _ = torch.linalg.qr(g)
        blocks.append(q.T[: min(d, left)])
        left -= d
    w = torch.cat(blocks)  # (m, d), orthonormal rows
    norms = torch.randn(m, d).norm(dim=1, keepdim=True)
    return w * norms


class SEAEstimator(nn.Module):
    def __init__(self, cfg: SEAConfig, head_dim: int, n_heads: int, max_positions: int):
        super().__init__()
        if cfg.compressed_width is None or cfg.n_features is None or cfg.causal is None:
            raise ValueError("SEAEstimator needs a resolved SEAConfig (call cfg.resolve(causal, head_dim))")
        D, K, m, C = head_dim, cfg.compressed_width, cfg.n_features, cfg.decoder_channels
        self.cfg, self.D, self.K, self.m, self.C = cfg, D, K, m, C
        self.E = cfg.eye_width or K  # eye basis columns
        self.causal = cfg.causal
        self.max_positions = max_positions
        self.proj = nn.Parameter(_orthogonal_gaussian(m, D))  # (m, D) Performer projection, trainable
        width = 2 * D  # encoder feature width (SEA.md step 2)
        self.in_norm = nn.LayerNorm(2 * D + self.E)
        self.encoder = nn.Sequential(nn.Linear(2 * D + self.E, width), nn.GELU(), nn.Linear(width, width))
        self.head_embed = nn.Parameter(torch.zeros(n_heads, width))
        self.to_rows = nn.Linear(width, C * (K // cfg.decoder_ratio))
        self.conv1 = nn.Conv2d(C, C, 3)
        self.norm = nn.LayerNorm(K // cfg.decoder_ratio)
        self.conv2 = nn.Conv2d(C, cfg.decoder_ratio, 3)  # r sub-columns per pixel, shuffled to width K
        if cfg.key_scores:  # weight of the content term column_scores per head (1: the plain mean-key score)
            self.key_weight = nn.Parameter(torch.ones(n_heads))
        self.mixer = nn.Linear(width, 2)
        with torch.no_grad():
            self.mixer.weight.zero_()
            self.mixer.bias.copy_(torch.tensor([2.0, 0.0]))  # start mostly on the sparse path, gain 1

    # -- step 1: Performer estimate -------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features of x (..., D) -> (..., m): kernels.performer_features_ref (norm D^(1/4), so the
        kernel approximated is exp(sqrt(D) cos(q, k)) and no data-dependent stabiliser is needed)."""
        return performer_features_ref(x, self.proj)

    def _eye(self, positions: torch.Tensor, S: int) -> torch.Tensor:
        """The "eye" basis (SEA.md step 1): one-hot of each key's compressed column. Bidirectional: K columns over
        the S keys. Causal: over the model's max positions, so a key's column never depends on later tokens."""
        L = self.max_positions if self.causal else S
        col = torch.clamp(torch.div(positions * self.E, L, rounding_mode="floor"), max=self.E - 1)
        return F.one_hot(col, self.E).float()  # (S, E)

    def _key_terms(self, k, v, key_valid, first: int = 0):
        """The keys' side of the Performer from key `first` on: phi(k) (B, Hkv, S - first, m), zero on padding, and
        the values it carries, [v, eye, 1] (B, Hkv, S - first, D + E + 1)."""
        B, Hkv, S, _ = k.shape
        kf = self._features(k[:, :, first:])  # (B, Hkv, S - first, m)
        if key_valid is not None:
            kf = kf * key_valid[:, None, first:, None].to(kf.dtype)
        pos = torch.arange(first, S, device=k.device)
        n = S - first
        ones = torch.ones(B, Hkv, n, 1, device=k.device)
        vals = torch.cat([v[:, :, first:].float(), self._eye(pos, S).expand(B, Hkv, n, self.E), ones], dim=-1)
        return kf, vals

    def performer(self, q, k, v, key_valid=None, state=None):
        """Linear-time attention of q over [v, eye] (SEA.md step 1), E eye columns. Returns ((B, H, T, D + E), new
        state).

        q (B, H, T, D); k, v (B, Hkv, S, D); key_valid (B, S) bool or None. Causal only: `state` (B, Hkv, m, W),
        W = D + E + 1, is the sum of phi(key) [v, eye, 1] over the first S - T keys (a decode step carries it
        instead of re-reading the whole cache); the new state covers all S keys. Bidirectional: state is None.
        """
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        g = H // Hkv
        first = S - T if (self.causal and state is not None) else 0  # keys not yet in the state
        qf = self._features(q).view(B, Hkv, g, T, self.m)  # (B, Hkv, g, T, m)
        kf, vals = self._key_terms(k, v, key_valid, first)
        if not self.causal:
            kv = kf.transpose(-1, -2) @ vals  # (B, Hkv, m, D+E+1)
            num, new_state = qf @ kv.unsqueeze(2), None  # (B, Hkv, g, T, D+E+1)
        else:
            off = S - T - first  # keys before query 0 that are not in a state yet (0 when one is given)
            if state is None:
                state = kf[:, :, :off].transpose(-1, -2) @ vals[:, :, :off]  # (B, Hkv, m, W)
            num, new_state = causal_linear_attention_ref(qf, kf[:, :, off:], vals[:, :, off:], state,
                                                         self.cfg.performer_chunk)
        num = num.reshape(B, H, T, -1)
        return num[..., :-1] / num[..., -1:].clamp(min=1e-30), new_state

    def _performer_causal_triton(self, q, k, v, key_valid, state):
        """The causal Performer and the encoder's input LayerNorm by performer_causal_triton: the keys before the
        first query enter as its state0 (the carried `state`, or their sum here). Returns (x, new state)."""
        from sea_edge.kernels import performer_causal_triton, performer_kv_triton

        B, _, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        if state is None and S > T:  # a prefill after keys of its own (not a decode step): sum them first
            state = performer_kv_triton(k[:, :, : S - T], v[:, :, : S - T], self.proj, self.E, self.max_positions,
                                        0, None if key_valid is None else key_valid[:, : S - T])
        elif state is None:
            state = torch.zeros(B, Hkv, self.m, D + self.E + 1, device=q.device)
        return performer_causal_triton(
            q, k[:, :, S - T :], v[:, :, S - T :], self.proj, state, self.in_norm.weight, self.in_norm.bias,
            self.in_norm.eps, self.E, self.max_positions, S - T,
            None if key_valid is None else key_valid[:, S - T :])

    # -- steps 2-3: encoder and decoder CNN ----------------------------------------------------------------------
    def _decoder(self, img: torch.Tensor):
        """The decoder's implementation for this call: the two Triton launches of kernels/triton_decoder.py when
        _triton_inference, else the plain-torch reference. Both compute reference.decoder_ref."""
        if _triton_inference(img):
            from sea_edge.kernels import decoder_triton

            return decoder_triton
        return decoder_ref

    def forward(self, q, k, v, selectable, key_valid=None, state=None, probs: bool = False) -> EstimatorOutput:
        """q (B, H, T, D), k/v (B, Hkv, S, D), selectable (T, K) or (B, 1, T, K) bool: columns that hold a real
        key. Causal models may pass `state` = (performer (B, Hkv, m, W), rows1, rows2 (B, H, C, 2, K/r)): what the
        first S - T positions left (EstimatorOutput.state is the same after all S). probs: the output carries
        softmax(logits) (and, on the GPU inference path, only that: logits is None there)."""
        B, H, T, D = q.shape
        perf, rows1, rows2 = state if state is not None else (None, None, None)
        if not self.causal and _triton_inference(q):
            # inference on the GPU (kernels/triton_performer.py): the keys' state kv in one Triton pass over the keys,
            # then the query side (features, phi(q) @ kv, [ctx, q / |q|], in_norm) in one pass over the queries
            from sea_edge.kernels import performer_kv_triton, performer_query_triton

            kv = performer_kv_triton(k, v, self.proj, self.E, k.shape[2], 0, key_valid)  # eye over the S keys
            x = performer_query_triton(q, self.proj, kv, self.in_norm.weight,
                                       self.in_norm.bias, self.in_norm.eps)  # (B, H, T, 2D+E), normalised
        elif _triton_inference(q) and _causal_fused():  # causal: three launches (kernels/triton_performer.py)
            x, perf = self._performer_causal_triton(q, k, v, key_valid, perf)
        else:
            ctx, perf = self.performer(q, k, v, key_valid, perf)  # (B, H, T, D+E)
            x = self.in_norm(torch.cat([ctx, F.normalize(q.float(), dim=-1)], dim=-1))
        if _triton_inference(x):  # one pass: encoder MLP, the decoder's rows and the mix (kernels/triton_encoder.py)
            from sea_edge.kernels import encoder_triton

            rows, mix, gain = encoder_triton(x, *_linear(self.encoder[0]), *_linear(self.encoder[2]), self.head_embed,
                                             *_linear(self.to_rows), *_linear(self.mixer))
            feat = None  # never written on this path: nothing in inference reads it
        else:
            feat = self.encoder(x) + self.head_embed[:, None, :]  # (B, H, T, 2D)
            rows = self.to_rows(feat)  # (B, H, T, C K / r)
            mix, gain = torch.sigmoid(self.mixer(feat)).unbind(-1)  # (B, H, T) each
        img = rows.view(B * H, T, self.C, -1).permute(0, 2, 1, 3)  # (B*H, C, T, K/r)
        flat = (lambda r: None if r is None else r.reshape(B * H, self.C, 2, -1))
        content = kw = None
        if self.cfg.key_scores:  # q against each column's mean key: where the row attends by content
            content = column_scores(q, k, self.K, self.causal, D**-0.5, key_valid)  # (B, H, T, K) fp32
            kw = self.key_weight
        decoder = self._decoder(img)
        fused = probs and decoder is not decoder_ref  # Triton: the decoder's second launch writes the softmax
        sums = q.new_zeros(B * H, self.K, dtype=torch.float32) if fused and not self.causal else None
        extra = {"softmax": True, "col_sums": sums} if fused else {}
        logits, rows1, rows2 = decoder(
            img, self.conv1.weight, self.conv1.bias, self.norm.weight, self.norm.bias, self.conv2.weight,
            self.conv2.bias, self.causal, flat(rows1), flat(rows2), self.norm.eps, content, kw, selectable, H, **extra,
        )  # (B, H, T, K), -inf on unselectable columns (the softmax of that when fused)
        if fused:  # what the decoder returned are the probabilities
            logits, p_hat = None, logits
        else:
            p_hat = torch.softmax(logits, dim=-1) if probs else None
        out = EstimatorOutput(logits, mix.unsqueeze(-1), 2.0 * gain.unsqueeze(-1), feat, probs=p_hat,
                              col_mean=None if sums is None else sums.view(B, H, self.K) / T)
        if self.causal:
            out.state = (perf, rows1.reshape(B, H, self.C, 2, -1), rows2.reshape(B, H, self.C, 2, -1))
        return out
