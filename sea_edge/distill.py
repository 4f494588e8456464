"""Distillation: train every layer's SEA estimator from the teacher's own attention (SEA.md, "Distillation").

Per step, on a batch of training windows:
- one dense forward of the same model (teacher weights, no grad) gives the teacher's logits for KD;
- one SEA forward records each layer's q, k, v and estimate; the teacher's attention on those very q, k, v is
  computed a block of queries at a time (sea_edge.targets), so memory stays bounded at long T;
- loss = w_kl KL(A_c || P_hat) + w_mse MSE(A_c, P_hat)          (attention loss, compressed: see targets.py)
         + w_out ||SEA out - dense out||^2 / ||dense out||^2    (attention-layer output, per layer)
         + w_lm next-token CE + w_kd KL(teacher logits || SEA logits)
  averaged over layers. Only the estimators train (Performer projection, encoder, decoder, mix scalars); the
  teacher's weights are frozen.

Checkpoints (every `checkpoint_every` steps) are written atomically as <out>/ckpt-<step>/ with the estimator
(safetensors), the AdamW state (safetensors + JSON), and a JSON with the configs, step, data position and seed;
<out>/latest.json names the newest. `resume=True` continues from it; the data order is a seeded permutation and
nothing else is random, so a resumed run reproduces an uninterrupted one bit for bit (on the same device).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .artifacts import atomic_dir, atomic_write_json
from .config import SEAConfig
from .errors import SeaEdgeError
from .estimator_io import apply_estimator, save_estimator
from .patch import dense_attention, recording, sea_layers, to_sea
from .targets import attention_targets, compressed_kl

__all__ = ["DistillConfig", "DistillResult", "distill", "distill_model", "layer_losses"]


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 600
    """Optimizer steps; ~600 x 4 x 1024 tokens covers the training split about twice (cheap, SEA.md)."""
    seq_len: int = 1024
    """Training window; the estimator is length-agnostic, and 1024 keeps a step fast."""
    batch: int = 4
    lr: float = 2e-3
    """AdamW learning rate for the small estimator networks (warm-up then cosine decay)."""
    warmup: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    w_kl: float = 1.0
    w_mse: float = 10.0
    w_out: float = 1.0
    w_lm: float = 0.1
    w_kd: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    max_windows: int | None = None
    """Use only the first N training windows (tests, smoke runs)."""
    sea: dict = field(default_factory=dict)
    """SEAConfig fields for the student (k, compressed_width, ...)."""
    init: str | None = None
    """Start from this estimator (folder) instead of fresh weights: continue or fine-tune a distillation."""

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise SeaEdgeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SeaEdgeError(f"lr must be > 0, got {self.lr}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SeaEdgeError(f"unknown device {self.device!r}: use cpu or cuda")


@dataclass
class DistillResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    history: list[dict]


def layer_losses(model, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """Attention (KL, MSE) and output losses averaged over the SEA layers of the last recorded forward."""
    kl = mse = out = 0.0
    layers = sea_layers(model)
    for m in layers:
        st = m.sea_state
        tg = attention_targets(st.q, st.k, st.v, st.scale, m.sea.causal, m.sea.K, st.key_valid)
        logp = torch.log_softmax(st.estimate.logits.float(), dim=-1)  # (B, H, T, K), -inf on empty columns
        kl = kl + compressed_kl(tg.compressed, logp)
        mse = mse + (tg.compressed - logp.exp()).pow(2).sum(-1).mean()
        out = out + (st.output.float() - tg.out).pow(2).mean() / tg.out.pow(2).mean().clamp(min=1e-12)
    n = len(layers)
    return {"kl": kl / n, "mse": mse / n, "out": out / n}


def _lr(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_optimizer(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], folder: Path) -> None:
    from safetensors.torch import save_file

    tensors, scalars = {}, {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{i}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{key}"] = val
    save_file(tensors, str(folder / "optimizer.safetensors"))
    atomic_write_json(folder / "optimizer.json", {"scalars": scalars, "n_params": len(params)})


def _load_optimizer(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], folder: Path) -> None:
    from safetensors.torch import load_file

    meta = json.loads((folder / "optimizer.json").read_text())
    if meta["n_params"] != len(params):
        raise SeaEdgeError(f"checkpoint {folder} holds optimizer state for {meta['n_params']} tensors, "
                           f"this model has {len(params)}")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    for i, p in enumerate(params):
        st = {}
        for key, val in tensors.items():
            j, name = key.split(".", 1)
            if int(j) == i:
                st[name] = val.to(p.device)
        for key, val in meta["scalars"].items():
            j, name = key.split(".", 1)
            if int(j) == i:
                st[name] = val
        if st:
            opt.state[p] = st


def _checkpoint(model, opt, params, out: Path, step: int, position: int, cfg: DistillConfig, teacher: str):
    name = f"ckpt-{step:07d}"
    with atomic_dir(out / name) as tmp:
        save_estimator(model, tmp, dtype=torch.float32, extra={"step": step})
        _save_optimizer(opt, params, tmp)
        atomic_write_json(tmp / "state.json", {"step": step, "data_position": position, "seed": cfg.seed,
                                               "teacher": teacher, "distill_config": dataclasses.asdict(cfg)})
    atomic_write_json(out / "latest.json", {"checkpoint": name, "step": step})
    for old in out.glob("ckpt-*"):  # keep the newest two: the one just written and its predecessor
        if old.is_dir() and old.name < name and old.name != _previous(out, name):
            shutil.rmtree(old, ignore_errors=True)


def _previous(out: Path, name: str) -> str | None:
    older = sorted(p.name for p in out.glob("ckpt-*") if p.is_dir() and p.name < name)
    return older[-1] if older else None


def _latest(out: Path) -> Path | None:
    f = out / "latest.json"
    if not f.exists():
        return None
    try:
        name = json.loads(f.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise SeaEdgeError(f"corrupt {f}: {exc}") from None
    return out / name


def distill_model(model, tokenizer, out: Path, cfg: DistillConfig, teacher: str = "model", resume: bool = False,
                  progress: bool = True) -> DistillResult:
    """Distill the SEA estimators of `model` (a dense teacher; put in SEA mode here) into `out`."""
    from .data import load_corpus, token_windows

    out = Path(out)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SeaEdgeError("--device cuda asked for, but no CUDA GPU is available")
    ckpt = _latest(out) if resume else None
    if resume and ckpt is None:
        raise SeaEdgeError(f"--resume: no checkpoint in {out}")
    if not resume and out.exists() and any(out.iterdir()):
        raise SeaEdgeError(f"{out} exists and is not empty: pass --resume to continue it, or choose another --out")
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    state = {"step": 0, "data_position": 0}
    if ckpt is not None:
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SeaEdgeError(f"corrupt checkpoint {ckpt}: {exc}") from None
        if state.get("teacher") != teacher:
            raise SeaEdgeError(f"checkpoint {ckpt} was made for teacher {state.get('teacher')!r}, not {teacher!r}")
        apply_estimator(model, ckpt)
    elif cfg.init is not None:
        apply_estimator(model, cfg.init, cfg.sea or None)
    else:
        to_sea(model, SEAConfig(**cfg.sea))
    model.to(device)
    params = [p for m in sea_layers(model) for p in m.sea.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None:
        _load_optimizer(opt, params, ckpt)

    windows = token_windows(tokenizer, load_corpus("train"), cfg.seq_len, cfg.max_windows)  # (N, T)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed))
    out.mkdir(parents=True, exist_ok=True)
    history, t_start, tokens = [], time.perf_counter(), 0
    step, position = int(state["step"]), int(state["data_position"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)

    bar = _progress(progress)
    task = bar.add_task("distill", total=cfg.steps, completed=step, losses="")
    with bar:
        while step < cfg.steps:
            rows = [order[(position + i) % len(order)] for i in range(cfg.batch)]
            ids = windows[torch.stack(rows)].to(device)  # (batch, T)
            position += cfg.batch
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg)
            with torch.no_grad(), dense_attention(model), autocast:
                teacher_logits = model(ids).logits.float()
            with recording(model), autocast:
                logits = model(ids).logits.float()
                parts = layer_losses(model, cfg)
            lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            kd = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1), log_target=True,
                          reduction="batchmean") / ids.shape[1]
            loss = (cfg.w_kl * parts["kl"] + cfg.w_mse * parts["mse"] + cfg.w_out * parts["out"]
                    + cfg.w_lm * lm + cfg.w_kd * kd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            tokens += ids.numel()
            rec = {"step": step, "loss": loss.item(), "kl": parts["kl"].item(), "mse": parts["mse"].item(),
                   "out": parts["out"].item(), "lm": lm.item(), "kd": kd.item()}
            history.append(rec)
            tps = tokens / (time.perf_counter() - t_start)
            bar.update(task, completed=step, losses=f"loss {rec['loss']:.3f} kl {rec['kl']:.3f} "
                       f"out {rec['out']:.3f} lm {rec['lm']:.2f} kd {rec['kd']:.3f} | {tps:,.0f} tok/s")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(model, opt, params, out, step, position, cfg, teacher)
    seconds = time.perf_counter() - t_start
    save_estimator(model, out, dtype=torch.float16, extra={
        "provenance": {"teacher": teacher, "steps": step, "tokens_seen": position * cfg.seq_len,
                       "seq_len": cfg.seq_len, "batch": cfg.batch, "device": str(device),
                       "seconds_this_run": round(seconds, 1), "distill_config": dataclasses.asdict(cfg)}})
    atomic_write_json(out / "history.json", history)
    return DistillResult(out, step, tokens, seconds, history)


def distill(teacher: str, out: Path, cfg: DistillConfig, resume: bool = False, progress: bool = True):
    """Load `teacher` by name or path and distill its estimator into `out` (see distill_model)."""
    from .teacher import load_teacher, teacher_info

    model, tok = load_teacher(teacher)
    if not teacher_info(model).causal:
        raise SeaEdgeError("distill supports causal language models (next-token and KD losses); "
                           f"{teacher} is an encoder")
    if cfg.seq_len > teacher_info(model).max_positions:
        raise SeaEdgeError(f"seq_len {cfg.seq_len} exceeds {teacher}'s maximum of {teacher_info(model).max_positions}")
    return distill_model(model, tok, out, cfg, teacher=teacher, resume=resume, progress=progress)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                    disable=not enabled, transient=False)
