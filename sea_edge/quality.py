"""How good a distilled estimator is: per-layer attention KL and mass recall, and perplexity of SEA vs the teacher
over a grid of context lengths T and budgets k (issue: distill). Prints a table, returns a dict, draws a PNG.

Mass recall of a query row is the share of the teacher's attention probability that falls on the keys SEA kept:
1.0 means the sparse step saw every key that mattered. Both measures use the teacher's attention on the SEA model's
own q, k, v (sea_edge.targets), on the first validation window of length `probe_len`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sea_edge.kernels import select_columns_op

from .config import budget
from .estimator_io import apply_estimator
from .patch import recording, to_dense
from .targets import attention_targets, compressed_kl

__all__ = ["QualityConfig", "estimator_quality", "plot_quality"]


@dataclass(frozen=True)
class QualityConfig:
    seq_lens: tuple[int, ...] = (1024, 2048, 4096)
    ks: tuple[int, ...] = (32, 64, 128, 256)
    max_windows: int | None = 8
    """Validation windows per perplexity (None: all)."""
    probe_len: int = 2048
    probe_k: int = 64
    device: str = "cpu"
    batch_size: int = 1
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def layer_quality(model, ids: torch.Tensor) -> list[dict]:
    """Per SEA layer: attention KL(A_c || P_hat), mean mass recall, and the oracle's mean mass recall: the layer's
    own column selection (grouped top-k, head cap, key budget) fed the teacher's compressed attention A_c instead
    of the estimate. A row keeps every key of a kept column, so its recall is the sum of A_c over those columns and
    the capped top-k of A_c is the most any estimate can recall with this geometry and budget: the ceiling the
    estimator is measured against."""
    rows = []
    with recording(model) as layers:
        model(ids)
        for i, m in enumerate(layers):
            st = m.sea_state
            tg = attention_targets(st.q, st.k, st.v, st.scale, m.sea.causal, m.sea.K, st.key_valid, idx=st.idx)
            kl = compressed_kl(tg.compressed, torch.log_softmax(st.estimate.logits.float(), -1)).item()
            H, S = st.q.shape[1], st.k.shape[2]
            n_cols, head_cap, _ = budget(m.sea.cfg, H, S)
            best = select_columns_op(tg.compressed, n_cols, head_cap, S, m.sea.causal, H * m.sea.cfg.k).long()
            oracle = (tg.compressed.gather(-1, best.clamp(min=0)) * (best >= 0)).sum(-1)  # (B, H, T)
            rows.append({"layer": i, "kl": kl, "mass_recall": tg.recall.mean().item(),
                         "oracle_recall": oracle.mean().item(),
                         "keys_per_query": (st.idx >= 0).sum(-1).float().mean().item()})
    return rows


def estimator_quality(model, tokenizer, estimator: Path, cfg: QualityConfig, progress: bool = True) -> dict:
    """Teacher vs SEA perplexity over cfg.seq_lens x cfg.ks, and per-layer KL / mass recall at probe_len, probe_k."""
    from .data import load_corpus, token_windows
    from .evaluation import perplexity

    text = load_corpus("validation")
    model.to(cfg.device)
    to_dense(model)
    report = {"teacher": {}, "sea": {}, "layers": [], "config": {**cfg.__dict__, "seq_lens": list(cfg.seq_lens),
                                                                "ks": list(cfg.ks)}, "estimator": str(estimator)}
    for T in cfg.seq_lens:
        r = perplexity(model, tokenizer, text, T, max_windows=cfg.max_windows, batch_size=cfg.batch_size,
                       progress=progress)
        report["teacher"][str(T)] = r.ppl
    for k in cfg.ks:
        apply_estimator(model, estimator, {"k": k})
        model.to(cfg.device)
        for T in cfg.seq_lens:
            r = perplexity(model, tokenizer, text, T, max_windows=cfg.max_windows, batch_size=cfg.batch_size,
                           progress=progress)
            report["sea"].setdefault(str(k), {})[str(T)] = r.ppl
    apply_estimator(model, estimator, {"k": cfg.probe_k})
    model.to(cfg.device)
    ids = token_windows(tokenizer, text, cfg.probe_len, max_windows=1).to(cfg.device)
    report["layers"] = layer_quality(model, ids)
    report["mean_mass_recall"] = sum(r["mass_recall"] for r in report["layers"]) / len(report["layers"])
    report["mean_oracle_recall"] = sum(r["oracle_recall"] for r in report["layers"]) / len(report["layers"])
    report["mean_kl"] = sum(r["kl"] for r in report["layers"]) / len(report["layers"])
    to_dense(model)
    return report


def quality_table(report: dict) -> str:
    """Plain-text tables: perplexity (and ratio to the teacher) per T and k, then per-layer KL / recall."""
    Ts = list(report["teacher"])
    lines = ["perplexity (ratio to teacher)", f"{'':>10}" + "".join(f"{'T=' + T:>18}" for T in Ts),
             f"{'teacher':>10}" + "".join(f"{report['teacher'][T]:>18.3f}" for T in Ts)]
    for k, row in report["sea"].items():
        lines.append(f"{'SEA k=' + k:>10}" + "".join(
            f"{row[T]:>10.3f} ({row[T] / report['teacher'][T]:.3f})" for T in Ts))
    lines.append("")
    lines.append(f"per layer at T={report['config']['probe_len']}, k={report['config']['probe_k']}: "
                 f"mean KL {report['mean_kl']:.3f}, mean mass recall {report['mean_mass_recall']:.3f}"
                 f" (oracle {report['mean_oracle_recall']:.3f})")
    lines.append(f"{'layer':>5} {'KL':>8} {'recall':>8} {'oracle':>8} {'keys/q':>8}")
    for r in report["layers"]:
        lines.append(f"{r['layer']:>5} {r['kl']:>8.3f} {r['mass_recall']:>8.3f} {r['oracle_recall']:>8.3f} "
                     f"{r['keys_per_query']:>8.1f}")
    return "\n".join(lines)


def plot_quality(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    Ts = [int(t) for t in report["teacher"]]
    a.plot(Ts, [report["teacher"][str(t)] for t in Ts], "k-o", label="teacher (dense)")
    for k, row in report["sea"].items():
        a.plot(Ts, [row[str(t)] for t in Ts], "o--", label=f"SEA k={k}")
    a.set_xscale("log", base=2)
    a.set_xlabel("context T (tokens)")
    a.set_ylabel("validation perplexity")
    a.legend()
    a.grid(alpha=0.3)
    layers = [r["layer"] for r in report["layers"]]
    b.bar(layers, [r["mass_recall"] for r in report["layers"]], color="tab:blue", label="mass recall")
    b.bar(layers, [r["oracle_recall"] for r in report["layers"]], fill=False, edgecolor="k",
          label="oracle (teacher's A_c through the same mask)")
    b.legend(loc="lower left", fontsize=8)
    b.set_ylim(0, 1)
    b.set_xlabel("layer")
    b.set_ylabel(f"mass recall (k={report['config']['probe_k']})")
    b2 = b.twinx()
    b2.plot(layers, [r["kl"] for r in report["layers"]], "r.-", label="attention KL")
    b2.set_ylabel("KL(A_c || P_hat)")
    fig.suptitle("SEA estimator quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
