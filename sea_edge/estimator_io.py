"""Estimator files: every SEA layer's estimator weights as one safetensors file plus a JSON beside it with the
SEAConfig, the teacher's attention geometry and provenance.

    <dir>/estimator.safetensors   tensors "layers.<i>.<param>" (fp16 or fp32)
    <dir>/estimator.json          {"format": "sea-edge-estimator/1", "sea_config": {...}, "teacher": {...}, ...}

Loading checks the teacher geometry (layers, heads, head dim) so an estimator for another model is refused with a
clear error; weights are read with safetensors only (never unpickled).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .artifacts import atomic_write_json
from .config import SEAConfig
from .errors import SeaEdgeError
from .patch import sea_layers, to_sea

__all__ = ["FORMAT", "estimator_state", "save_estimator", "load_estimator_file", "apply_estimator",
           "DEFAULT_ESTIMATORS", "default_estimator", "resolve_estimator"]

FORMAT = "sea-edge-estimator/1"
WEIGHTS, META = "estimator.safetensors", "estimator.json"
_PACKAGED = Path(__file__).parent / "estimators"
DEFAULT_ESTIMATORS = {"smollm2-135m": _PACKAGED / "smollm2-135m"}


def default_estimator(teacher: str) -> Path | None:
    """The estimator embedded in the package for a known teacher, if one ships."""
    d = DEFAULT_ESTIMATORS.get(teacher)
    return d if d is not None and (d / WEIGHTS).exists() else None


def resolve_estimator(teacher: str, estimator: str | Path) -> Path:
    """An estimator folder, or "default": the one embedded for `teacher`."""
    if str(estimator) == "default":
        d = default_estimator(teacher)
        if d is None:
            raise SeaEdgeError(f"no embedded estimator for {teacher!r} (embedded: {', '.join(DEFAULT_ESTIMATORS)})")
        return d
    return Path(estimator)


def _geometry(model) -> dict:
    from .teacher import teacher_info

    info = teacher_info(model)
    return {"name": info.name, "n_layers": info.n_layers, "n_heads": info.n_heads, "n_kv_heads": info.n_kv_heads,
            "head_dim": info.head_dim}


def estimator_state(model) -> dict[str, torch.Tensor]:
    """Flat state dict of all SEA estimators: "layers.<i>.<param>"."""
    layers = sea_layers(model)
    if not layers:
        raise SeaEdgeError("model is not in SEA mode: nothing to save")
    return {f"layers.{i}.{n}": t.detach() for i, m in enumerate(layers) for n, t in m.sea.state_dict().items()}


def save_estimator(model, folder: Path, dtype=torch.float16, extra: dict | None = None) -> Path:
    """Write the estimator of a SEA model into `folder` (atomically, file by file). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous().cpu() for k, v in estimator_state(model).items()}
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS)
    meta = {"format": FORMAT, "sea_config": model.sea_config.to_dict(), "teacher": _geometry(model),
            "dtype": str(dtype).replace("torch.", ""), **(extra or {})}
    atomic_write_json(folder / META, meta)
    return folder


def load_estimator_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (meta, tensors) from an estimator folder or its .safetensors file; SeaEdgeError if missing/corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / WEIGHTS).exists() or not (folder / META).exists():
        raise SeaEdgeError(f"no estimator at {path}: expected {WEIGHTS} and {META} in {folder}")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SeaEdgeError(f"corrupt estimator metadata {folder / META}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise SeaEdgeError(f"{folder / META} is not a sea-edge estimator (format {meta.get('format')!r})")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SeaEdgeError(f"corrupt estimator weights {folder / WEIGHTS}: {exc}") from None
    return meta, tensors


def apply_estimator(model, path: Path, config_override: dict | None = None):
    """Put `model` (dense teacher or SEA) in SEA mode with the estimator stored at `path`. Refuses an estimator
    made for another model. `config_override` changes inference-time fields (e.g. {"k": 128}); {"key_scores":
    True} on an estimator stored without the content term adds it with its initial weights."""
    meta, tensors = load_estimator_file(path)
    geo, want = _geometry(model), meta.get("teacher", {})
    for key in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
        if want.get(key) != geo[key]:
            raise SeaEdgeError(f"estimator {path} was made for {want.get('name', '?')} ({key}={want.get(key)}), "
                               f"not for {geo['name']} ({key}={geo[key]})")
    stored = {"key_scores": False, **meta["sea_config"]}  # files written before key_scores existed lack the term
    cfg = SEAConfig.from_dict({**stored, **(config_override or {})})
    if sea_layers(model):
        from .patch import to_dense

        to_dense(model)
    to_sea(model, cfg)
    layers = sea_layers(model)
    for i, m in enumerate(layers):
        prefix = f"layers.{i}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if cfg.key_scores and "key_weight" not in sd:  # an estimator without the content term gains it at its
            sd["key_weight"] = m.sea.key_weight.detach()  # initial weight (1 per head): a start for fine-tuning
        try:
            m.sea.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        except RuntimeError as exc:
            raise SeaEdgeError(f"estimator {path} does not fit layer {i}: {str(exc).splitlines()[0]}") from None
    return model
