"""Memory budget of an exported model on a device: device profiles, an analytic model of the peak resident memory of
one prefill (SEA, and the dense baseline from the same dimensions), the largest context that fits, and the report
behind `sea-edge budget` (JSON, a rich table, a PNG).

    from sea_edge.runtime.budget import budget_report, render_table, plot_budget
    rep = budget_report("smollm2-sea", "rpi5-8gb", context=4096)
    rich.print(render_table(rep)); plot_budget(rep, "budget.png")

Shapes: B batch, T tokens of the prefill (S = T keys), L layers, H / Hkv query / key-value heads, D head dim, E hidden,
I MLP width, V vocabulary, K compressed width, m Performer features, W = D + eye columns (K by default) + 1, C decoder
channels, r decoder ratio, c = head_cap and w = head_cap * span (sea_edge.config.budget: the per-row key list width).

What the analytic model counts (bytes at the peak of one prefill; fp32 activations whatever the weight dtype):

    weights          the weight file(s) of the graph, plus the transposed copy onnxruntime folds for a tied lm_head
                     (the embedding Gather reads the original, the lm_head MatMul a constant-folded transpose)
    runtime          the process with numpy + onnxruntime imported, plus the session (graph, kernels): measured
    kv_cache         present.<i>.key/value, L x 2 x (B, Hkv, T, D)
    sea_state        Performer prefix sums L x (B, Hkv, m, W) and decoder rows L x 2 x (B, H, C, 2, K/r)
    sea_mask         per layer, the unread outputs of the mask's TopK nodes, the column sort's indices (B, H, T, c)
                     int64 and the head ranking's values (B, T, H c) fp32 (and, in graphs exported before the
                     compaction, the final sort's values (B, H, T, w) int64): onnxruntime frees an output nobody reads
                     only when the run ends, so all L of them are alive at the peak
    attention        the largest per-layer transient of attention (dense: DENSE_SCORE_COPIES (B, H, T, S) fp32
                     buffers, the measured working set of the score/mask/softmax chain, plus the (B, 1, T, S) mask;
                     SEA: the mask's interpolation and compaction, the Performer block sums, the content term's
                     prefix sums and gathered rows, or the fallback's gathered rows, whichever is largest)
    logits           (B, T, V) fp32: the prefill graph returns every position's logits (+ a (V, E) fp32 scratch when
                     the lm_head is an 8-bit MatMulNBits at accuracy level 1)
    activations      hidden states and the MLP at the peak, (B, T, E) and (B, T, I) fp32
    allocator_slack  what onnxruntime's arena holds beyond the live tensors (calibrated: a fraction of the above)

Where the peak is. onnxruntime's CPU arena never returns memory within a session, so what the layers touched stays
resident. SEA's per-layer buffers are small and interleaved with long-lived ones, so in one session the (B, T, V)
logits cannot reuse them and land in fresh arena memory: the last layer's working set plus the logits. The runtime
therefore cuts the graph before its lm_head (SETTINGS["head_split"], sea_edge.runtime.executor.HeadSplitGraph): the
body's arena is given back after its run and the head allocates the logits on top of the weights, the state and a
residue (head_residue, a fraction of the state) only, so with every position's logits SEA's peak is the larger of
the body's and the head's. With the last position's logits the body's peak is the peak, as in one session. Dense
attention frees one large (B, H, T, S) block per layer, which the logits reuse: dense's peak is the larger of the
two moments (its attention, from T ~ 2048 on).

The model is for the onnxruntime settings of sea_edge.runtime.measure.SETTINGS (CPU arena on, priority execution
order, memory reuse off), calibrated on the default export (SmolLM2-135M, onnxruntime 1.32, x86-64, 2 threads)
against measure_peak (CALIBRATION holds the figures). Analytic vs measured peak, MiB:

    T                         1024           2048           4096           8192
    SEA fp32, all logits   1060 / 1105    1245 / 1288    1764 / 1796    2802 / 2790   (-4.1%, -3.3%, -1.8%, +0.4%)
    SEA fp32, last logit   1061 / 1033                   1541 / 1564    2221 / 2222   (+2.7%, -1.5%, -0.0%)
    dense fp32 (optimum)    963 / 922     1583 / 1491    3871 / 3711   12660 / 13012  (+4.4%, +6.2%, +4.3%, -2.7%)
    (head split; before it, in one session: SEA all logits 1242 / 2336 / 3751 MiB at T = 1024 / 4096 / 8192, SEA
    int8 all logits 953 / 2043 / 3448 (not re-measured since), dense 1070 / 1611 / 3810 / 12670)

onnxruntime's own defaults (depth-first order, reuse on) hold about twice the activations: see measure.py.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from sea_edge.errors import SeaEdgeError

from .manifest import LOGITS_TO_KEEP
from .measure import SETTINGS

__all__ = [
    "CALIBRATION",
    "COMPONENTS",
    "PROFILES_FILE",
    "QUANT_PRESETS",
    "REPORT_SCHEMA",
    "DeviceProfile",
    "ModelDims",
    "budget_report",
    "estimate_peak",
    "get_device",
    "list_devices_table",
    "load_profiles",
    "max_context",
    "model_dims",
    "plot_budget",
    "render_table",
    "validate_report",
]

PROFILES_FILE = Path(__file__).with_name("profiles.json")
PROFILES_FORMAT = "sea-edge-devices/1"
GiB, MiB = 1 << 30, 1 << 20
ARCHES = ("arm64", "x86_64")
ISAS = ("neon", "dotprod", "i8mm", "sve", "avx2", "avx_vnni", "avx512", "avx512_vnni")
QUANT_PRESETS = ("arm64", "avx2", "avx512_vnni")
"""Dynamic-quantization presets (optimum's AutoQuantizationConfig names) a device's CPU calls for."""
COMPONENTS = ("weights", "runtime", "kv_cache", "sea_state", "sea_mask", "attention", "logits", "activations",
              "allocator_slack")
FIT_MARGIN = 0.10
"""Headroom below 10% of the device's limit is "tight": RSS varies by a few percent with the allocator and libc."""

CALIBRATION = {
    "runtime_base_bytes": 48 * MiB,
    "session_bytes_per_layer": {"sea": 0, "dense": 1 * MiB},
    "allocator_slack": 0.35,
    "head_residue": 0.45,
    "dense_score_copies": 3.5,
    "measured_peak_mib": {"sea": {"1024": 1105, "2048": 1288, "4096": 1796, "8192": 2790},
                          "sea_last_logit": {"1024": 1033, "4096": 1564, "8192": 2222},
                          "dense": {"1024": 922, "2048": 1491, "4096": 3711, "8192": 13012}},
    "source": "measure_peak on the default export (SmolLM2-135M, fp32, B=1, linear weights stored transposed, mask "
              "compaction without a final sort), onnxruntime 1.32.0, x86-64, 2 threads, SETTINGS. runtime_base = "
              "VmRSS with numpy + onnxruntime imported (46-48 MiB); session_bytes_per_layer (sea) = 0: VmRSS after "
              "the session opened is the baseline + the weight file + the tied lm_head's transposed copy (677 MiB, "
              "a graph without the lm_head 571 MiB); the per-layer retained bytes and the layer transients were read "
              "from onnxruntime's profiler (mem_bytes_in_use at each layer's first norm: 6.6 MiB/layer at T=1024, "
              "11 MiB/layer at T=4096, as counted); allocator_slack = the arena's resident bytes beyond the live "
              "tensors as a fraction of the non-weight peak (0.20, fitted on the measured peaks above); "
              "dense_score_copies: the dense optimum graph's attention holds ~4.5 (B, H, T, S) fp32 buffers at its "
              "peak (measured dense peaks above, runtime bench of the optimum export); head_residue: what the "
              "head split's body leaves resident beyond its state outputs, as a fraction of them (fitted: ~95 MiB "
              "at T=4096, 2026-12-06).",
}
DENSE_SCORE_COPIES = CALIBRATION["dense_score_copies"]


# -- device profiles ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceProfile:
    """One device: memory, bandwidth, CPU and GPU, each figure with where it comes from (`sources`)."""

    name: str
    description: str
    total_ram_bytes: int
    reserved_bytes: int
    """Held by the OS and its usual services (an estimate where the source says so)."""
    memory_bandwidth_gbs: float
    arch: str
    """arm64 or x86_64."""
    isa: tuple[str, ...]
    cores: int
    per_app_limit_bytes: int | None = None
    """The most one app may hold before the OS kills it (phones); None = no per-app limit."""
    gpu: dict | None = None
    sources: dict = field(default_factory=dict)
    """figure -> source (datasheet name / URL, or "estimate: ...")."""
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        where = f"device {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise SeaEdgeError("a device profile needs a name")
        if self.total_ram_bytes <= 0:
            raise SeaEdgeError(f"{where}: total_ram_gib must be > 0")
        if not 0 <= self.reserved_bytes < self.total_ram_bytes:
            raise SeaEdgeError(f"{where}: reserved_gib must be >= 0 and below total_ram_gib")
        if self.per_app_limit_bytes is not None and not 0 < self.per_app_limit_bytes <= self.total_ram_bytes:
            raise SeaEdgeError(f"{where}: per_app_limit_gib must be > 0 and at most total_ram_gib")
        if self.memory_bandwidth_gbs <= 0:
            raise SeaEdgeError(f"{where}: memory_bandwidth_gbs must be > 0")
        if self.arch not in ARCHES:
            raise SeaEdgeError(f"{where}: cpu.arch must be one of {', '.join(ARCHES)}, got {self.arch!r}")
        bad = [i for i in self.isa if i not in ISAS]
        if bad:
            raise SeaEdgeError(f"{where}: cpu.isa has unknown {bad} (known: {', '.join(ISAS)})")
        if self.arch == "arm64" and "neon" not in self.isa:
            raise SeaEdgeError(f"{where}: cpu.isa of an arm64 CPU must include neon")
        if self.arch == "x86_64" and "avx2" not in self.isa:
            raise SeaEdgeError(f"{where}: cpu.isa of an x86_64 CPU must include avx2 (older CPUs are not supported)")
        if self.cores < 1:
            raise SeaEdgeError(f"{where}: cpu.cores must be >= 1")

    @property
    def limit_bytes(self) -> int:
        """What one process may use: RAM less the reserve, and at most the per-app limit."""
        free = self.total_ram_bytes - self.reserved_bytes
        return min(free, self.per_app_limit_bytes) if self.per_app_limit_bytes else free

    @property
    def quant_preset(self) -> str:
        """Which dynamic-quantization preset suits the CPU: arm64 (NEON / dot product), avx512_vnni, or avx2."""
        if self.arch == "arm64":
            return "arm64"
        return "avx512_vnni" if "avx512_vnni" in self.isa else "avx2"

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "total_ram_bytes": self.total_ram_bytes,
                "reserved_bytes": self.reserved_bytes, "per_app_limit_bytes": self.per_app_limit_bytes,
                "limit_bytes": self.limit_bytes, "memory_bandwidth_gbs": self.memory_bandwidth_gbs,
                "arch": self.arch, "isa": list(self.isa), "cores": self.cores, "quant_preset": self.quant_preset,
                "gpu": self.gpu, "sources": dict(self.sources)}


def _figure(entry: dict, key: str, where: str, required: bool = True) -> tuple[float | None, str | None]:
    """(value, source) of a {value, source} figure; SeaEdgeError naming the field when malformed."""
    fig = entry.get(key)
    if fig is None:
        if required:
            raise SeaEdgeError(f"{where}: missing field {key!r} ({{\"value\": ..., \"source\": ...}})")
        return None, None
    if not isinstance(fig, dict):
        raise SeaEdgeError(f"{where}: field {key!r} must be {{\"value\": number, \"source\": text}}")
    v, src = fig.get("value"), fig.get("source")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SeaEdgeError(f"{where}: field {key}.value must be a number, got {v!r}")
    if not isinstance(src, str) or not src.strip():
        raise SeaEdgeError(f"{where}: field {key}.source must say where the figure comes from")
    return float(v), src


def _profile(name: str, entry, origin: str) -> DeviceProfile:
    where = f"{origin}: device {name!r}"
    if not isinstance(entry, dict):
        raise SeaEdgeError(f"{where}: must be an object")
    total, s_total = _figure(entry, "total_ram_gib", where)
    reserved, s_res = _figure(entry, "reserved_gib", where)
    per_app, s_app = _figure(entry, "per_app_limit_gib", where, required=False)
    bw, s_bw = _figure(entry, "memory_bandwidth_gbs", where)
    cpu = entry.get("cpu")
    if not isinstance(cpu, dict):
        raise SeaEdgeError(f"{where}: missing field 'cpu' ({{arch, isa, cores, source}})")
    isa = cpu.get("isa")
    if not isinstance(isa, list) or not all(isinstance(i, str) for i in isa):
        raise SeaEdgeError(f"{where}: field cpu.isa must be a list of names")
    cores = cpu.get("cores")
    if isinstance(cores, bool) or not isinstance(cores, int):
        raise SeaEdgeError(f"{where}: field cpu.cores must be an integer")
    if not isinstance(cpu.get("source"), str) or not cpu["source"].strip():
        raise SeaEdgeError(f"{where}: field cpu.source must say where the figures come from")
    gpu = entry.get("gpu")
    if gpu is not None and (not isinstance(gpu, dict) or not isinstance(gpu.get("name"), str)
                            or not isinstance(gpu.get("source"), str)):
        raise SeaEdgeError(f"{where}: field 'gpu' must be null or {{name, shared_memory, source}}")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise SeaEdgeError(f"{where}: field 'aliases' must be a list of names")
    sources = {"total_ram": s_total, "reserved": s_res, "memory_bandwidth": s_bw, "cpu": cpu["source"]}
    if s_app:
        sources["per_app_limit"] = s_app
    if gpu:
        sources["gpu"] = gpu["source"]
    return DeviceProfile(
        name=name, description=str(entry.get("description", name)), total_ram_bytes=int(total * GiB),
        reserved_bytes=int(reserved * GiB), memory_bandwidth_gbs=bw, arch=cpu.get("arch"), isa=tuple(isa),
        cores=cores, per_app_limit_bytes=int(per_app * GiB) if per_app is not None else None,
        gpu=dict(gpu) if gpu else None, sources=sources, aliases=tuple(aliases))


def _read_profiles_file(path: Path) -> dict[str, DeviceProfile]:
    path = Path(path)
    if not path.is_file():
        raise SeaEdgeError(f"device profile file {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise SeaEdgeError(f"device profile file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != PROFILES_FORMAT:
        raise SeaEdgeError(f"{path}: field 'format' must be {PROFILES_FORMAT!r}")
    devices = data.get("devices")
    if not isinstance(devices, dict) or not devices:
        raise SeaEdgeError(f"{path}: field 'devices' must be a non-empty object of name -> profile")
    return {name: _profile(name, entry, path.name) for name, entry in devices.items()}


def load_profiles(extra_file: str | Path | None = None) -> dict[str, DeviceProfile]:
    """The built-in device profiles (runtime/profiles.json), plus and overridden by those of `extra_file` (JSON or
    TOML, same format). Raises SeaEdgeError naming the file, device and field of a malformed profile."""
    profiles = _read_profiles_file(PROFILES_FILE)
    if extra_file is not None:
        profiles.update(_read_profiles_file(Path(extra_file)))
    return profiles


def get_device(name: str, profiles_file: str | Path | None = None) -> DeviceProfile:
    """The profile called `name` (or one of its aliases); SeaEdgeError listing the known ones otherwise."""
    profiles = load_profiles(profiles_file)
    if name in profiles:
        return profiles[name]
    for p in profiles.values():
        if name in p.aliases:
            return p
    raise SeaEdgeError(f"unknown device {name!r}: known devices are {', '.join(sorted(profiles))} "
                       f"(add your own with a profiles file)")


# -- model dimensions -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    """What the memory model needs from a manifest (source_model + sea_config + files)."""

    name: str
    attention: str  # "sea" or "dense": what the folder holds
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tied: bool
    weight_bytes: int
    """Bytes of the prefill graph's stored weights (external data file(s), else the graph file)."""
    quantization: str = "none"
    logits_to_keep: bool = False
    """The prefill graph takes the optional LOGITS_TO_KEEP input (manifest graphs.prefill.optional_inputs)."""
    embedding_quantized: bool = False
    """The tied embedding / lm_head is block-quantized (MatMulNBits reads its codes: no fp32 transposed copy)."""
    accuracy_level: int = 1
    """MatMulNBits' accuracy level (manifest quantization.accuracy_level): at 1 (fp32 activations) its 8-bit CPU
    kernel dequantizes the whole weight to fp32 per call, for the lm_head a (V, E) fp32 scratch (measured with
    onnxruntime's profiler: +122 MiB in use during the lm_head at T=256)."""
    packed_weight_bytes: int = 0
    """Bytes of the block-quantized weights (manifest quantization.bytes_after): onnxruntime's MatMulNBits packs
    them into a copy of its own at session start (measured, int8: VmRSS after load = baseline + file + this +
    the tied lm_head copy)."""
    # SEA (None for a dense folder)
    k: int | None = None
    compressed_width: int | None = None
    n_features: int | None = None
    decoder_channels: int | None = None
    decoder_ratio: int | None = None
    head_cap_factor: float | None = None
    performer_chunk: int | None = None
    budget_length: int | None = None
    eye_width: int | None = None
    """Performer eye columns (SEAConfig.eye_width; None = compressed_width)."""
    key_scores: bool = False
    """The estimate has the content term (SEAConfig.key_scores, a ColumnScores node per layer; exports made before
    it existed lack the manifest field and the node)."""
    mask_final_sort: bool = True
    """The prefill graph orders each row's keys with a final TopK whose unread values, (B, H, T, w) int64, onnxruntime
    holds to the end of the run (manifest graphs.prefill "unused_topk_retained", true for exports before the mask's
    compaction; sea-edge writes false since)."""

    @property
    def has_sea(self) -> bool:
        return self.compressed_width is not None

    @property
    def teacher_params(self) -> int:
        """Parameters of the Llama-family teacher: embedding, layers, final norm (and an untied lm_head)."""
        E, D, H, Hkv, I = self.hidden_size, self.head_dim, self.n_heads, self.n_kv_heads, self.intermediate_size
        layer = E * H * D * 2 + E * Hkv * D * 2 + 3 * E * I + 2 * E
        return self.vocab_size * E * (1 if self.tied else 2) + self.n_layers * layer + E


def _weight_bytes(man: dict) -> int:
    files, prefill = man["files"], man["graphs"]["prefill"]["file"]
    ext = [n for n in files if n in (prefill + ".data", prefill + "_data")]
    if ext:
        return int(sum(files[n]["bytes"] for n in ext))
    return int(files[prefill]["bytes"])


def model_dims(folder_or_manifest: str | Path | dict) -> ModelDims:
    """ModelDims of an exported folder (its manifest is read, files are not hashed) or of a manifest dict."""
    if isinstance(folder_or_manifest, dict):
        man = folder_or_manifest
    else:
        from .manifest import read_folder

        man = read_folder(Path(folder_or_manifest), verify=False)
    try:
        sm = man["source_model"]
        attention = man.get("attention", "sea")
        sea = man.get("sea_config") or {}
        dims = {
            "name": str(sm.get("name", "model")), "attention": attention, "n_layers": int(sm["n_layers"]),
            "n_heads": int(sm["n_heads"]), "n_kv_heads": int(sm.get("n_kv_heads") or sm["n_heads"]),
            "head_dim": int(sm["head_dim"]), "hidden_size": int(sm["hidden_size"]),
            "intermediate_size": int(sm["intermediate_size"]), "vocab_size": int(sm["vocab_size"]),
            "max_positions": int(sm.get("max_positions") or 0), "tied": bool(sm.get("tie_word_embeddings", False)),
            "weight_bytes": _weight_bytes(man),
            "quantization": str((man.get("quantization") or {}).get("scheme", "none")),
            "packed_weight_bytes": int((man.get("quantization") or {}).get("bytes_after") or 0),
            "embedding_quantized": bool((man.get("quantization") or {}).get("embedding")),
            "logits_to_keep": LOGITS_TO_KEEP in (man["graphs"].get("prefill", {}).get("optional_inputs") or {}),
            "accuracy_level": int((man.get("quantization") or {}).get("accuracy_level") or 1)}
        if attention == "sea":
            dims.update(k=int(sea["k"]), compressed_width=int(sm["compressed_width"]),
                        n_features=int(sm["n_features"]), decoder_channels=int(sm["decoder_channels"]),
                        decoder_ratio=int(sm["decoder_ratio"]), head_cap_factor=float(sea["head_cap_factor"]),
                        performer_chunk=int(sea["performer_chunk"]), budget_length=sea.get("budget_length"),
                        eye_width=sea.get("eye_width"), key_scores=bool(sea.get("key_scores", False)),
                        mask_final_sort=bool(man["graphs"]["prefill"].get("unused_topk_retained", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise SeaEdgeError(f"manifest lacks what the memory model needs: {exc!r}") from None
    return ModelDims(**dims)


def mask_budget(dims: ModelDims, S: int) -> tuple[int, int, int]:
    """(n_cols, head_cap, span) of sea_edge.config.budget in plain integers (the runtime may not import torch)."""
    K, H = dims.compressed_width, dims.n_heads
    if dims.budget_length is not None:
        S = int(dims.budget_length)
    span = (S + K - 1) // K
    n_cols = max(1, (H * dims.k) // span)
    fair = (n_cols + H - 1) // H
    f = Fraction(dims.head_cap_factor)
    capped = (f.numerator * n_cols + f.denominator * H - 1) // (f.denominator * H)
    return n_cols, min(K, n_cols, max(fair, capped)), span


# -- the analytic model ---------------------------------------------------------------------------------------------

def _weights_resident(dims: ModelDims, attention: str) -> int:
    """Stored weights, onnxruntime's packed copy of block-quantized weights, and the transposed lm_head copy it folds
    when the embedding is tied (the embedding stays fp32 in every scheme). The dense baseline of a SEA folder: the
    same at the teacher's share of the parameters (no estimator)."""
    tied_copy = dims.vocab_size * dims.hidden_size * 4 if dims.tied and not dims.embedding_quantized else 0
    resident = dims.weight_bytes + dims.packed_weight_bytes
    if attention != dims.attention:  # the SEA estimator is ~2% of the parameters
        resident = int(resident * min(1.0, 4.0 * dims.teacher_params / max(dims.weight_bytes, 1)))
    return resident + tied_copy


LOGITS = ("all", "last")
"""What a prefill returns: every position's logits (scoring text) or the last position's (a generation's prefill,
through the LOGITS_TO_KEEP input)."""
MODES = {"generate": "last", "score": "all"}
"""budget_report's modes and the logits each one asks of the prefill."""


def estimate_peak(dims: ModelDims, T: int, B: int = 1, attention: str | None = None, logits: str = "all") -> dict:
    """Analytic peak resident bytes of one prefill of T tokens, batch B, under SETTINGS (module docstring), returning
    `logits` "all" (B, T, V) or "last" (B, 1, V).

    attention: "sea" or "dense" (default: what the folder holds; "sea" needs a SEA manifest). Returns
    {"components": {name: bytes for name in COMPONENTS}, "total_bytes", "peak_phase": "lm_head" | "attention"}.
    SEA: the peak is at the lm_head, on top of what the last layer's working set left in the arena. Dense: the larger
    of the lm_head (the logits reuse freed score memory) and the last layer's attention (module docstring).
    """
    attention = attention or dims.attention
    if logits not in LOGITS:
        raise SeaEdgeError(f"logits must be one of {', '.join(LOGITS)}, got {logits!r}")
    if attention == "sea" and not dims.has_sea:
        raise SeaEdgeError("this folder has no SEA configuration (a dense export): only attention='dense'")
    L, H, Hkv, D = dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.head_dim
    E, I, V, f32, i64 = dims.hidden_size, dims.intermediate_size, dims.vocab_size, 4, 8
    S = T
    comp = dict.fromkeys(COMPONENTS, 0)
    head = None  # the head's moment when the graph is cut before its lm_head (SEA, every position's logits)
    comp["weights"] = _weights_resident(dims, attention)
    comp["runtime"] = CALIBRATION["runtime_base_bytes"] + L * CALIBRATION["session_bytes_per_layer"][attention]
    comp["kv_cache"] = L * 2 * B * Hkv * S * D * f32
    hidden = 2 * B * T * E * f32  # the residual stream and the normed input of the next matmul
    mlp = 3 * B * T * I * f32  # gate, up, and their product
    kept = logits
    logits = B * (T if kept == "all" else 1) * V * f32
    if dims.embedding_quantized and dims.accuracy_level == 1:
        logits += V * E * f32  # MatMulNBits' fp32 copy of the 8-bit lm_head table, during the lm_head (ModelDims)
    if attention == "sea":
        K, m, C, r = dims.compressed_width, dims.n_features, dims.decoder_channels, dims.decoder_ratio
        W = D + (dims.eye_width or K) + 1
        _, c, span = mask_budget(dims, S)
        w = c * span
        comp["sea_state"] = L * B * (Hkv * m * W + 2 * H * C * 2 * (K // r)) * f32
        # unread TopK outputs: the column sort's indices (B, H, T, c) int64 and the head ranking's values (B, T, H c)
        # fp32 (+ the final sort's values (B, H, T, w) int64 in older graphs); alive until the run ends
        retained_layer = B * H * T * c * i64 + B * T * H * c * f32 + dims.mask_final_sort * B * H * T * w * i64
        # a layer's transient peak, from the graph: the mask's interpolation (B, H, T, c, span) int64 and its
        # compaction (four copies), the estimate (B, H, T, K) twice, or the sparse attention's gathered rows of a
        # 64-row block (B, H, 64, w, D) x 3 beside the expanded keys and values (B, H, S, D) x 2
        N = -(-T // dims.performer_chunk)
        # the content term (ColumnScores): the keys' prefix sums (B, Hkv, S + 1, D) and their masked input, a 64-row
        # block's gathered prefix sums and product, Z and the scores (B, H, T, K + 1) beside the estimate
        scores = dims.key_scores * (2 * B * Hkv * S * D * f32 + 2 * B * Hkv * 64 * (K + 1) * D * f32
                                    + 2 * B * H * T * (K + 1) * f32 + 2 * B * H * T * K * f32)
        transient = max(4 * B * H * T * w * i64 + 2 * B * H * T * K * f32,
                        2 * B * Hkv * N * m * W * f32 + 2 * B * H * T * W * f32,
                        3 * B * H * 64 * w * D * f32 + 2 * B * H * S * D * f32 + 2 * B * H * T * w * i64,
                        scores)
        comp.update(sea_mask=L * retained_layer, attention=transient, activations=hidden + mlp + hidden)
        if kept == "last" or not SETTINGS["head_split"]:
            # the arena keeps what the last layer touched; the logits come on top (module docstring)
            comp["logits"] = logits
            phase = "lm_head"
        else:
            # cut before the lm_head: the body's peak (its last layers, comp), then, its arena given back, the
            # head's: the state and the cut on top of the weights, the logits, and what the body could not give back
            head = dict.fromkeys(COMPONENTS, 0)
            head.update(weights=comp["weights"], runtime=comp["runtime"], kv_cache=comp["kv_cache"],
                        sea_state=comp["sea_state"], logits=logits, activations=B * T * E * f32)
            head["allocator_slack"] = int(CALIBRATION["head_residue"] * (head["kv_cache"] + head["sea_state"]))
            phase = "attention"
    else:
        causal_mask = B * T * S * f32  # (B, 1, T, S), built once and read by every layer
        scores = DENSE_SCORE_COPIES * B * H * T * S * f32  # scores, masked scores, softmax, and what the arena keeps
        at_head = logits + hidden + causal_mask
        at_layer = scores + causal_mask + mlp + hidden
        if at_head >= at_layer:
            comp.update(logits=logits, activations=hidden, attention=causal_mask)  # the scores' memory reused
            phase = "lm_head"
        else:
            comp.update(attention=scores + causal_mask, activations=hidden + mlp)
            phase = "attention"
    # the arena's fragmentation: a fraction of what the layers allocate; the logits, one late block, take a fresh
    # region of their own (measured: the same fraction fits full-logit and last-logit prefills)
    live = sum(v for k, v in comp.items() if k not in ("weights", "runtime", "logits"))
    comp["allocator_slack"] = int(CALIBRATION["allocator_slack"] * live)
    if head is not None and sum(head.values()) >= sum(comp.values()):
        comp, phase = head, "lm_head"
    comp = {k: int(v) for k, v in comp.items()}
    return {"components": comp, "total_bytes": sum(comp.values()), "peak_phase": phase, "attention": attention,
            "logits": kept}


MEMORY_CONTEXT_CAP = 1 << 20
"""The largest context max_context(capped=False) looks at."""


def max_context(dims: ModelDims, limit_bytes: int, B: int = 1, attention: str | None = None, logits: str = "all",
                capped: bool = True) -> int:
    """The largest T whose estimated peak fits `limit_bytes` (0 if none): at most the model's max positions, or, with
    capped=False, as far as memory alone allows (up to MEMORY_CONTEXT_CAP; what the architecture would hold on this
    device, beyond the positions the model was trained for)."""
    hi = (dims.max_positions if capped else 0) or MEMORY_CONTEXT_CAP
    peak = lambda t: estimate_peak(dims, t, B, attention, logits)["total_bytes"]  # noqa: E731
    if peak(1) > limit_bytes:
        return 0
    if peak(hi) <= limit_bytes:
        return hi
    lo = 1  # fits; hi does not (the peak grows with T)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(mid) <= limit_bytes:
            lo = mid
        else:
            hi = mid
    return lo


# -- the report -----------------------------------------------------------------------------------------------------

_INT = {"type": "integer", "minimum": 0}
_COMPS = {"type": "object", "properties": {c: _INT for c in COMPONENTS}, "required": list(COMPONENTS),
          "additionalProperties": False}
_ESTIMATE = {"type": "object", "required": ["components", "total_bytes", "peak_phase", "fits"],
             "properties": {"components": _COMPS, "total_bytes": _INT, "peak_phase": {"enum": ["lm_head", "attention"]},
                            "fits": {"type": "boolean"}, "attention": {"enum": ["sea", "dense"]},
                            "logits": {"enum": ["all", "last"]}}}
REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sea-edge budget report",
    "type": "object",
    "required": ["schema", "folder", "model", "attention", "quantization", "device", "context", "batch", "settings",
                 "sea", "dense", "limit_bytes", "headroom_bytes", "verdict", "mode", "logits", "max_context", "curve",
                 "measured", "calibration"],
    "properties": {
        "schema": {"const": "sea-edge-budget/2"},
        "folder": {"type": "string"},
        "model": {"type": "string"},
        "attention": {"enum": ["sea", "dense"]},
        "quantization": {"type": "string"},
        "device": {"type": "object", "required": ["name", "total_ram_bytes", "reserved_bytes", "limit_bytes",
                                                   "memory_bandwidth_gbs", "arch", "isa", "quant_preset", "sources"],
                   "properties": {"name": {"type": "string"}, "total_ram_bytes": _INT, "reserved_bytes": _INT,
                                  "per_app_limit_bytes": {"type": ["integer", "null"]}, "limit_bytes": _INT,
                                  "memory_bandwidth_gbs": {"type": "number"}, "arch": {"enum": list(ARCHES)},
                                  "isa": {"type": "array", "items": {"type": "string"}},
                                  "quant_preset": {"enum": list(QUANT_PRESETS)},
                                  "sources": {"type": "object"}}},
        "context": {"type": "integer", "minimum": 1},
        "batch": {"type": "integer", "minimum": 1},
        "settings": {"type": "object"},
        "sea": {"oneOf": [_ESTIMATE, {"type": "null"}]},
        "dense": _ESTIMATE,
        "limit_bytes": _INT,
        "headroom_bytes": {"type": "integer"},
        "verdict": {"enum": ["fits", "tight", "does not fit"]},
        "mode": {"enum": list(MODES)},
        "logits": {"enum": list(LOGITS)},
        "max_context": {"type": "object", "required": ["sea", "dense", "ratio", "max_positions", "sea_memory",
                                                       "dense_memory", "ratio_memory"],
                        "properties": {"sea": {"type": ["integer", "null"], "minimum": 0},
                                       "dense": {"type": "integer", "minimum": 0},
                                       "ratio": {"type": ["number", "null"]}, "max_positions": _INT,
                                       "sea_memory": {"type": ["integer", "null"], "minimum": 0},
                                       "dense_memory": {"type": "integer", "minimum": 0},
                                       "ratio_memory": {"type": ["number", "null"]}}},
        "curve": {"type": "object", "required": ["context", "sea_bytes", "dense_bytes"],
                  "properties": {"context": {"type": "array", "items": {"type": "integer"}},
                                 "sea_bytes": {"type": "array", "items": {"type": ["integer", "null"]}},
                                 "dense_bytes": {"type": "array", "items": {"type": "integer"}}}},
        "measured": {"oneOf": [{"type": "null"},
                               {"type": "object", "required": ["peak_rss_bytes", "rss_after_load", "seconds",
                                                               "settings", "error_pct"],
                                "properties": {"peak_rss_bytes": _INT, "rss_after_load": _INT,
                                               "seconds": {"type": "number"}, "settings": {"type": "object"},
                                               "error_pct": {"type": "number"}}}]},
        "calibration": {"type": "object"},
    },
}
"""JSON Schema (draft 2020-12 subset: type, enum, const, required, properties, additionalProperties, items,
minimum, oneOf) of budget_report's result. validate_report checks a report against it without jsonschema."""


def _type_ok(value, t: str) -> bool:
    return {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
            "boolean": isinstance(value, bool), "null": value is None,
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[t]


def _validate(value, schema: dict, path: str) -> list[str]:
    errs = []
    if "oneOf" in schema:
        alts = [_validate(value, s, path) for s in schema["oneOf"]]
        ok = sum(not e for e in alts)
        if ok == 0:
            # the errors of the closest alternative: one whose type matched, then the fewest errors
            return min(alts, key=lambda e: (e[0].endswith(f"got {type(value).__name__}"), len(e)))
        return [f"{path}: matches several alternatives"] if ok > 1 else []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, t) for t in types):
            return [f"{path}: expected {'/'.join(types)}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errs.append(f"{path}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errs.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                errs += _validate(sub, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}: unexpected {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errs += _validate(item, schema["items"], f"{path}[{i}]")
    return errs


def validate_report(report: dict, schema: dict = REPORT_SCHEMA) -> None:
    """Raise SeaEdgeError listing where `report` breaks REPORT_SCHEMA (uses jsonschema when installed)."""
    try:
        import jsonschema
    except ImportError:
        errs = _validate(report, schema, "report")
    else:
        errs = [f"report.{'.'.join(map(str, e.path))}: {e.message}"
                for e in jsonschema.Draft202012Validator(schema).iter_errors(report)]
    if errs:
        raise SeaEdgeError(f"budget report does not match its schema: {'; '.join(errs[:5])}")


def _curve_points(max_pos: int, context: int) -> list[int]:
    pts = {context}
    t = 64
    while t < max_pos:
        pts.add(t)
        pts.add(int(t * 1.5))
        t *= 2
    pts.add(max_pos)
    return sorted(p for p in pts if 1 <= p <= max_pos)


def budget_report(folder: str | Path, device: str, context: int | None = None, batch: int = 1,
                  measure: bool = False, profiles_file: str | Path | None = None, mode: str = "generate") -> dict:
    """Everything `sea-edge budget` shows, as a JSON-able dict (schema REPORT_SCHEMA).

    folder: an exported folder. device: a profile name (load_profiles; `profiles_file` adds or overrides profiles).
    context: T tokens of the prefill (default: the model's max positions). batch: B. measure: also run one prefill
    of T tokens in a fresh process (measure_peak, Linux only) and report the analytic model's error against it.
    mode: "generate" (the prefill of a generation: the last position's logits, where the graph has LOGITS_TO_KEEP;
    the dense estimate gets the same) or "score" (every position's logits, as perplexity needs).

    Keys: schema, folder, model, attention, quantization, device (the profile, limit_bytes = what one process may
    hold), context, batch, settings (the onnxruntime settings modelled), sea / dense (estimate_peak of each at T plus
    "fits"; sea is null for a dense folder), limit_bytes, headroom_bytes (limit - total of the folder's own
    attention; negative = over), verdict ("fits", "tight" = under 10% headroom, "does not fit"), mode, logits
    ("all" / "last": what the estimates assume), max_context ({sea, dense, ratio = sea / dense, max_positions}
    within the model's positions; sea_memory, dense_memory, ratio_memory: as far as memory alone allows), curve
    ({context, sea_bytes, dense_bytes} for the plot),
    measured (null or {peak_rss_bytes, rss_after_load, seconds, settings, error_pct}), calibration.
    Raises SeaEdgeError for an unknown device, a malformed profile file, a bad folder, or T beyond max positions.
    """
    profile = get_device(device, profiles_file)
    dims = model_dims(folder)
    max_pos = dims.max_positions
    T = max_pos if context is None else int(context)
    if T < 1:
        raise SeaEdgeError(f"context must be >= 1, got {T}")
    if max_pos and T > max_pos:
        raise SeaEdgeError(f"context {T} is beyond the model's {max_pos} positions")
    if batch < 1:
        raise SeaEdgeError(f"batch must be >= 1, got {batch}")
    if mode not in MODES:
        raise SeaEdgeError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    logits = MODES[mode] if dims.logits_to_keep else "all"
    limit = profile.limit_bytes
    kinds = ["sea", "dense"] if dims.has_sea else ["dense"]
    est = {}
    for kind in kinds:
        e = estimate_peak(dims, T, batch, kind, logits)
        est[kind] = {**e, "fits": e["total_bytes"] <= limit}
    own = est[dims.attention]
    headroom = limit - own["total_bytes"]
    verdict = "does not fit" if headroom < 0 else ("tight" if headroom < FIT_MARGIN * limit else "fits")
    mc = {kind: max_context(dims, limit, batch, kind, logits) for kind in kinds}
    mem = {kind: max_context(dims, limit, batch, kind, logits, capped=False) for kind in kinds}
    ratio = (mc["sea"] / mc["dense"]) if dims.has_sea and mc["dense"] else None
    ratio_mem = (mem["sea"] / mem["dense"]) if dims.has_sea and mem["dense"] else None
    pts = _curve_points(max(max_pos or T, *mem.values()), T)
    curve = {"context": pts,
             "sea_bytes": [estimate_peak(dims, t, batch, "sea", logits)["total_bytes"] if dims.has_sea else None
                           for t in pts],
             "dense_bytes": [estimate_peak(dims, t, batch, "dense", logits)["total_bytes"] for t in pts]}
    measured = None
    if measure:
        from .measure import measure_peak

        m = measure_peak(folder, T, batch, keep_last=logits == "last")
        measured = {k: m[k] for k in ("peak_rss_bytes", "rss_after_load", "load_peak_rss_bytes", "seconds",
                                      "settings")}
        measured["error_pct"] = round(100.0 * (own["total_bytes"] - m["peak_rss_bytes"]) / m["peak_rss_bytes"], 2)
    report = {
        "schema": "sea-edge-budget/2", "folder": str(folder), "model": dims.name, "attention": dims.attention,
        "quantization": dims.quantization, "device": profile.to_dict(), "context": T, "batch": batch,
        "settings": dict(SETTINGS), "sea": est.get("sea"), "dense": est["dense"], "limit_bytes": limit,
        "headroom_bytes": headroom, "verdict": verdict, "mode": mode, "logits": logits,
        "max_context": {"sea": mc.get("sea"), "dense": mc["dense"], "ratio": ratio, "max_positions": max_pos,
                        "sea_memory": mem.get("sea"), "dense_memory": mem["dense"], "ratio_memory": ratio_mem},
        "curve": curve, "measured": measured,
        "calibration": {k: v for k, v in CALIBRATION.items()},
    }
    return report


# -- presentation ---------------------------------------------------------------------------------------------------

def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    return f"{sign}{n / GiB:.2f} GiB" if n >= GiB else f"{sign}{n / MiB:.0f} MiB"


def render_table(report: dict):
    """A rich Table of the report: each component for SEA and dense, total, device limit, headroom, verdict, max
    context."""
    from rich.table import Table

    dev, T, B = report["device"], report["context"], report["batch"]
    title = (f"{report['model']} ({report['attention']}, {report['quantization']}) on {dev['name']}: "
             f"prefill of {T} tokens, batch {B}, {report['mode']} ({report['logits']} logits)")
    table = Table(title=title, min_width=len(title))
    table.add_column("component")
    has_sea = report["sea"] is not None
    if has_sea:
        table.add_column("SEA", justify="right")
    table.add_column("dense", justify="right")
    cols = (["sea"] if has_sea else []) + ["dense"]
    for c in COMPONENTS:
        vals = [report[k]["components"][c] for k in cols]
        if any(vals):
            table.add_row(c, *[_fmt(v) for v in vals])
    table.add_section()
    table.add_row("total (peak)", *[_fmt(report[k]["total_bytes"]) for k in cols], style="bold")
    limit = report["limit_bytes"]
    table.add_row("device limit", *[_fmt(limit)] * len(cols))
    table.add_row("headroom", *[_fmt(limit - report[k]["total_bytes"]) for k in cols])
    verdicts = []
    for k in cols:
        head = limit - report[k]["total_bytes"]
        verdicts.append("does not fit" if head < 0 else ("tight" if head < FIT_MARGIN * limit else "fits"))
    table.add_row("verdict", *[f"[{'green' if v == 'fits' else 'yellow' if v == 'tight' else 'red'}]{v}[/]"
                               for v in verdicts])
    mc = report["max_context"]
    table.add_row("max context", *[str(mc[k]) for k in cols])
    table.add_row("max context (memory only)", *[str(mc[f"{k}_memory"]) for k in cols])
    if mc["ratio"] is not None:
        table.caption = (f"max context SEA / dense = {mc['ratio']:.2f}x within the model's {mc['max_positions']} "
                         f"positions; {mc['ratio_memory']:.2f}x as far as memory allows")
    if report["measured"]:
        m = report["measured"]
        table.add_row("measured peak", _fmt(m["peak_rss_bytes"]) + f" ({m['error_pct']:+.1f}%)",
                      *([""] if has_sea else []))
    return table


def list_devices_table(profiles_file: str | Path | None = None):
    """A rich Table of the known device profiles."""
    from rich.table import Table

    table = Table(title="device profiles")
    for col in ("name", "RAM", "reserved", "per-app limit", "usable", "bandwidth", "CPU", "quant preset", "GPU"):
        table.add_column(col, no_wrap=col in ("name", "RAM", "usable", "bandwidth"))
    for name, p in sorted(load_profiles(profiles_file).items()):
        table.add_row(name + (f" ({', '.join(p.aliases)})" if p.aliases else ""), _fmt(p.total_ram_bytes),
                      _fmt(p.reserved_bytes), _fmt(p.per_app_limit_bytes), _fmt(p.limit_bytes),
                      f"{p.memory_bandwidth_gbs:g} GB/s", f"{p.arch} {'+'.join(p.isa)} x{p.cores}", p.quant_preset,
                      (p.gpu or {}).get("name", "-"))
    return table


def plot_budget(report: dict, path: str | Path) -> Path:
    """PNG of peak memory vs context for SEA and dense, the device limit, and each one's max context. Written
    atomically (temporary file in the same folder, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    curve, limit, mc = report["curve"], report["limit_bytes"], report["max_context"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ctx = curve["context"]
    if report["sea"] is not None:
        ax.plot(ctx, [b / GiB for b in curve["sea_bytes"]], "o-", ms=3, label="SEA (analytic)")
    ax.plot(ctx, [b / GiB for b in curve["dense_bytes"]], "s-", ms=3, label="dense (analytic)")
    ax.axhline(limit / GiB, color="red", ls="--", lw=1, label=f"{report['device']['name']} limit")
    for kind, color in (("sea", "C0"), ("dense", "C1")):
        if mc.get(f"{kind}_memory"):
            ax.axvline(mc[f"{kind}_memory"], color=color, ls=":", lw=1.2,
                       label=f"{kind} max context {mc[f'{kind}_memory']} (memory)")
    if mc.get("max_positions"):
        ax.axvline(mc["max_positions"], color="gray", ls="-.", lw=1, label=f"model max {mc['max_positions']}")
    if report["measured"]:
        ax.plot([report["context"]], [report["measured"]["peak_rss_bytes"] / GiB], "k*", ms=10, label="measured")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 2 * limit / GiB)  # the region around the limit; dense's quadratic tail leaves the chart
    ax.set_xlabel("context T (tokens)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(f"{report['model']}: prefill peak, batch {report['batch']}, {report['mode']} "
                 f"({report['logits']} logits)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
