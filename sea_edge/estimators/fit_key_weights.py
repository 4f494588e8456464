"""How the embedded estimator's content-term weights were made (a record, not part of the package; 2026-12-05).

The shipped estimator (GPU-distilled 2026-11-25, NOTES.md) predates SEAConfig.key_scores. This script gives it the
content term and chooses the term's weight (one per layer, all heads alike; every other weight frozen) on the CPU:

    python sea_edge/estimators/fit_key_weights.py OUT [--windows 3] [--seq-len 2048] [--objective recall|kl]

The layer's estimate without the term, the term and the teacher's compressed attention A_c are recorded once from a
SEA forward on training windows (the teacher's attention on the SEA model's own q, k: sea_edge.targets), then per
layer:
- objective "recall" (what shipped): the weight from a grid that maximises mass recall at k = 64, the share of A_c
  on the columns the layer's own mask construction keeps (sea_edge.quality's measure);
- objective "kl": the per-head weights that minimise the distillation's attention loss, w_kl KL(A_c || P_hat) +
  w_mse ||A_c - P_hat||^2 (L-BFGS). In a causal model the term reaches the output only through the
  (non-differentiable) mask, so this is the only gradient distillation gives it. Measured at T = 2048 on a
  validation window: KL 1.60 -> 0.81 but mean recall 0.696 -> 0.656 (weights fall to ~0.15): a calibrated
  distribution is not the best ranking, and the mask needs the ranking.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sea_edge
from sea_edge.data import load_corpus, token_windows
from sea_edge.distill import DistillConfig
from sea_edge.estimator_io import apply_estimator, default_estimator, save_estimator
from sea_edge.config import budget
from sea_edge.kernels import column_scores, select_columns_op
from sea_edge.patch import recording, sea_layers
from sea_edge.targets import attention_targets, compressed_kl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--objective", choices=("recall", "kl"), default="recall")
    ap.add_argument("--grid", default="0,0.25,0.5,0.75,1,1.5,2,3")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = sea_edge.load_teacher("smollm2-135m")
    base_dir = default_estimator("smollm2-135m")
    apply_estimator(model, base_dir, {"key_scores": True})
    windows = token_windows(tok, load_corpus("train"), a.seq_len)
    pick = torch.linspace(0, len(windows) - 1, a.windows).long()  # spread over the training split
    layers = sea_layers(model)
    rec = [[] for _ in layers]  # per layer: (estimate without the term, the term, A_c) per window
    with torch.no_grad():
        for n, i in enumerate(pick.tolist()):
            with recording(model):
                model(windows[i: i + 1])
                for li, m in enumerate(layers):
                    st, est = m.sea_state, m.sea
                    content = column_scores(st.q, st.k, est.K, True, st.q.shape[-1] ** -0.5, st.key_valid)
                    base = st.estimate.logits.float() - est.key_weight.view(1, -1, 1, 1) * content
                    tg = attention_targets(st.q, st.k, st.v, st.scale, True, est.K, st.key_valid)
                    rec[li].append((base, content, tg.compressed))
            print(f"window {n + 1}/{a.windows} recorded ({time.time() - t0:.0f} s)", flush=True)
    cfg = DistillConfig()
    H, S = model.config.num_attention_heads, a.seq_len
    report = []
    for li, m in enumerate(layers):
        if a.objective == "recall":
            n_cols, head_cap, _ = budget(m.sea.cfg, H, S)

            def recall(wt: float) -> float:
                got = 0.0
                for base, content, target in rec[li]:
                    probs = torch.softmax(base + wt * content, -1)
                    cols = select_columns_op(probs, n_cols, head_cap, S, True, H * m.sea.cfg.k).long()
                    got += (target.gather(-1, cols.clamp(min=0)) * (cols >= 0)).sum(-1).mean().item()
                return got / len(rec[li])

            grid = [float(x) for x in a.grid.split(",")]
            scores = {wt: recall(wt) for wt in grid}
            best = max(grid, key=lambda wt: (round(scores[wt], 4), -abs(wt - 1.0)))
            with torch.no_grad():
                m.sea.key_weight.fill_(best)
            report.append({"layer": li, "recall": scores, "key_weight": best})
            print(f"layer {li:2d}: recall by weight {', '.join(f'{k:g}: {v:.3f}' for k, v in scores.items())}"
                  f" -> {best:g}", flush=True)
            continue
        w = m.sea.key_weight.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=a.iters, line_search_fn="strong_wolfe")

        def loss_fn():
            total = 0.0
            for base, content, target in rec[li]:
                logp = torch.log_softmax(base + w.view(1, -1, 1, 1) * content, -1)
                total = total + cfg.w_kl * compressed_kl(target, logp) + cfg.w_mse * (
                    (target - logp.exp()).pow(2).sum(-1).mean())
            return total / len(rec[li])

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        with torch.no_grad():
            before = loss_fn().item()
        opt.step(closure)
        with torch.no_grad():
            after = loss_fn().item()
            m.sea.key_weight.copy_(w.detach())
        report.append({"layer": li, "loss_w1": before, "loss_fitted": after, "key_weight": w.detach().tolist()})
        print(f"layer {li:2d}: attention loss {before:.4f} -> {after:.4f}, weights "
              f"{[round(x, 2) for x in w.detach().tolist()]}", flush=True)
    meta = json.loads((base_dir / "estimator.json").read_text())
    prov = {"base": {k: meta.get(k) for k in ("provenance",)},
            "key_weights": {"fitted": "sea_edge/estimators/fit_key_weights.py", "objective": a.objective, "device": "cpu",
                            "windows": a.windows, "seq_len": a.seq_len, "split": "train",
                            "seconds": round(time.time() - t0, 1), "layers": report}}
    save_estimator(model, a.out, dtype=torch.float16, extra={"provenance": prov})
    print(f"wrote {a.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
