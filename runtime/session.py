"""SeaSession: run a folder written by `sea-edge export` (SEA) or by sea_edge.export.dense (the dense baseline)
with onnxruntime, as a device would: NumPy, onnxruntime and tokenizers only, no torch.

On a GPU, SeaSession(folder, device="cuda") splits each graph at its SparseAttention and ColumnScores nodes
(segments.py): onnxruntime runs the segments on its CUDA provider, our Triton kernels run the nodes, and the values
between them, the KV cache and SEA's state included, stay torch tensors on the GPU (executor.py); only what the
caller reads (the last logits row of a generation step) comes back to the host. torch and triton are imported for
that path only. On the CPU each graph runs whole (the custom ops' function bodies), as two sessions cut before its
lm_head (executor.HeadSplitGraph: a long prefill's logits do not land on top of the layers' arena).

    s = SeaSession("smollm2-sea")                   # manifest read, every file's sha256 checked, graphs opened
    s.generate("Once upon a time", max_new_tokens=32, stream=print).text
    s.generate(["Hi", "A longer prompt"])           # a batch: left padding
    s.perplexity(text, seq_len=256, max_windows=2)  # the protocol of sea_edge.evaluation.perplexity

Generation = one prefill of the prompt, then one decode step per new token. The state a step hands to the next is
whatever the graphs say it is: every `present.<name>` output feeds the next step's `past_key_values.<name>` input.
A SEA folder carries the KV cache plus SEA's own state (Performer prefix sums, the decoder CNN's last rows) through
two graphs (model.onnx, decode.onnx); a dense folder from optimum has one graph that takes an empty cache for the
prefill. Batches are left-padded; position ids are cumsum(attention_mask) - 1 clamped at 0, as at export.

SEA's mask budget depends on the context length S (k K / S columns per row, SEA.md step 4), so a decode step's row
equals the row a full recompute of the whole sequence gives, and earlier rows equal theirs as long as ceil(S / K)
has not changed since they were computed. SEA's estimator also files each key under compressed column
floor(slot K / max_positions) of its "eye" basis by its slot in the (left-padded) cache, not by its position id:
within the first max_positions / K slots (32 for SmolLM2) padding changes nothing and a batch gives exactly each
prompt's own logits; past that a padded prompt's keys sit one column off and its logits move slightly (greedy
tokens mostly still agree). See tests/test_runtime.py::test_batch_matches_each_prompt_alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sea_edge.errors import SeaEdgeError

from .manifest import LOGITS_TO_KEEP, read_folder
from .perplexity import PerplexityResult, peak_rss_mib, token_windows
from .sampling import SamplingConfig, next_tokens

__all__ = ["DEVICES", "OPTIMIZATION_LEVELS", "GenerationResult", "RuntimeConfig", "SeaSession"]

DEVICES = ("cpu", "cuda")
OPTIMIZATION_LEVELS = ("off", "basic", "extended", "all")
ATTENTION_IMPLS = ("auto", "triton", "torch", "numpy")
PAST, PRESENT = "past_key_values.", "present."


@dataclass(frozen=True)
class RuntimeConfig:
    """How a folder is opened. Defaults: CPU, every onnxruntime graph optimization (the results match torch: see
    tests/test_runtime.py), the runtime's own thread count, files verified (a few seconds per GB)."""

    device: str = "cpu"
    threads: int | None = None
    """onnxruntime intra-op threads; None = onnxruntime's default (one per physical core)."""
    verify: bool = True
    """Check every file's sha256 against the manifest before opening (sizes are always checked)."""
    optimization: str = "all"
    """onnxruntime graph optimization level: off, basic, extended, all."""
    memory_pattern: bool = False
    """onnxruntime's memory-pattern planning. Off: once a shape has run, it plans one block for the whole run on
    top of the arena (with the other settings of _session, a SEA prefill at T = 1024 run twice peaked at 1790 MiB
    with it, 1529 MiB without, at the same speed), and generation never repeats a shape anyway."""
    split: bool | None = None
    """Run each graph as onnxruntime segments cut at its SparseAttention and ColumnScores nodes (segments.py), the
    nodes computed by `attention`. None: split on CUDA (the nodes run the Triton kernel, the data stays on the GPU),
    whole on CPU (onnxruntime runs the op's function body, the fastest CPU path)."""
    attention: str = "auto"
    """SparseAttention and ColumnScores in a split graph: "triton" (CUDA), "torch" (sea_edge.kernels' plain-torch
    references, CPU or CUDA: isolates the kernels from the plumbing), "numpy" (runtime/sparse_attention.py and
    column_scores.py, CPU, no torch needed); "auto" = triton on CUDA, numpy on CPU."""
    cache_dir: str | None = None
    """Where the segments of split graphs are cached (None: sea_edge.runtime.segments.default_cache_dir())."""
    profile: bool = False
    """onnxruntime's profiler on in every session (JSON traces written on end_profiling)."""
    head_split: bool = True
    """A graph that is not split at its custom nodes (the CPU path) runs as two sessions cut before its lm_head,
    the layers' arena given back before a long prefill's logits are allocated (executor.HeadSplitGraph: peak RSS of
    a SEA prefill at T = 4096 2452 -> 1825 MiB); False: one session."""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise SeaEdgeError(f"unknown device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.threads is not None and self.threads < 1:
            raise SeaEdgeError(f"threads must be >= 1, got {self.threads}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise SeaEdgeError(f"unknown optimization {self.optimization!r}: use one of "
                               f"{', '.join(OPTIMIZATION_LEVELS)}")
        if self.attention not in ATTENTION_IMPLS:
            raise SeaEdgeError(f"unknown attention {self.attention!r}: use one of {', '.join(ATTENTION_IMPLS)}")
        if self.attention == "numpy" and self.device == "cuda":
            raise SeaEdgeError("attention 'numpy' runs on the CPU only: use triton or torch on cuda")
        if self.attention == "triton" and self.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SeaEdgeError("attention 'triton' needs device 'cuda' (or TRITON_INTERPRET=1, for tests)")
        if self.split is False and self.attention != "auto":
            raise SeaEdgeError(f"attention {self.attention!r} applies to split graphs only (split is False)")

    @property
    def split_graphs(self) -> bool:
        return self.device == "cuda" if self.split is None else self.split

    @property
    def attention_impl(self) -> str:
        if self.attention != "auto":
            return self.attention
        return "triton" if self.device == "cuda" else "numpy"


@dataclass
class GenerationResult:
    """What `generate` produced. For a single prompt `text`, `tokens`, `prompt_tokens` and `finish_reason` are one
    value each; for a list of prompts, lists in prompt order."""

    text: str | list[str]
    tokens: list[int] | list[list[int]]  # new tokens only, the EOS included when generation stopped on it
    prompt_tokens: int | list[int]
    finish_reason: str | list[str]  # "eos" or "length"
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    decode_tokens_per_s: float  # batch * decode_steps / decode_seconds (0 when there was no decode step)


class SeaSession:
    """An exported folder opened for inference; see the module docstring."""

    def __init__(self, folder: str | Path, device: str = "cpu", threads: int | None = None, verify: bool = True,
                 optimization: str = "all", memory_pattern: bool = False, split: bool | None = None,
                 attention: str = "auto", cache_dir: str | None = None, profile: bool = False,
                 head_split: bool = True):
        self.config = RuntimeConfig(device, threads, verify, optimization, memory_pattern, split, attention,
                                    cache_dir, profile, head_split)
        import onnxruntime as ort

        self._ort = ort
        cfg = self.config
        cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        if cfg.device == "cuda" and not cfg.split_graphs and not cuda_ep:
            raise SeaEdgeError("device 'cuda' needs onnxruntime-gpu (this onnxruntime has no CUDAExecutionProvider: "
                               f"{', '.join(ort.get_available_providers())})")
        self.folder = Path(folder)
        self.manifest = read_folder(self.folder, cfg.verify)
        self.attention: str = self.manifest.get("attention", "sea")
        self.max_positions = int(self.manifest["source_model"].get("max_positions") or 0)
        graphs = self.manifest["graphs"]
        self._files = {role: graphs[role]["file"] for role in ("prefill", "decode")}
        self.backend = self._make_backend(cuda_ep)
        self.cuda_arena = ""  # how onnxruntime's CUDA memory is pooled (set when a CUDA session opens)
        self._graphs: dict = {}
        self._prefill = self._graph(self._files["prefill"])
        self.tokenizer = self._load_tokenizer()
        self.eos_ids, self.pad_id = self._special_ids()
        # state names in the decode graph's order; prefill and decode both output present.<name> for each
        self.past_names = [n for n in graphs["decode"]["inputs"] if n.startswith(PAST)]
        self.present_names = [PRESENT + n[len(PAST):] for n in self.past_names]

    # -- opening -----------------------------------------------------------------------------------------------------
    def _make_backend(self, cuda_ep: bool):
        """What carries values between a split graph's steps and computes its SparseAttention nodes."""
        from .executor import NumpyBackend

        cfg = self.config
        self.ort_cuda = cfg.device == "cuda" and cuda_ep  # onnxruntime runs on the GPU
        if not cfg.split_graphs or cfg.attention_impl == "numpy":
            return NumpyBackend()
        try:
            from .executor import TorchBackend

            backend = TorchBackend(cfg.device, cfg.attention_impl)
        except ImportError as exc:
            raise SeaEdgeError(f"device {cfg.device!r} with attention {cfg.attention_impl!r} needs torch"
                               f"{' with CUDA and triton' if cfg.device == 'cuda' else ''} ({exc})") from None
        if cfg.device == "cuda" and not cuda_ep:
            import warnings

            warnings.warn("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): the segments run on "
                          "its CPU provider and every SparseAttention input and output crosses the host", stacklevel=3)
            backend.ort_cuda = False
        return backend

    def _graph(self, file: str):
        """The graph of `file`, opened once (graphs sharing a file share it): one onnxruntime session, or a split
        graph (one session per segment, the backend between them)."""
        if file in self._graphs:
            return self._graphs[file]
        if self.config.split_graphs:
            import dataclasses

            from .executor import SegmentedGraph
            from .segments import Step, load_plan

            try:
                plan = load_plan(self.folder, file, self.config.cache_dir)
            except OSError as exc:
                raise SeaEdgeError(f"cannot split {self.folder / file}: {exc}") from exc
            if any(s.kind == "op" for s in plan.steps):
                def open_step(step):
                    return self._session(plan.segment_bytes(step), f"{file}:{step.name}")
            else:  # nothing to split (the dense baseline): the file itself, run through the same backend
                plan = dataclasses.replace(plan, steps=[Step("ort", file, list(plan.inputs), list(plan.outputs))])

                def open_step(step):
                    return self._session(self.folder / file, file)
            graph = SegmentedGraph(plan, self.backend, open_step)
        else:
            graph = self._whole_graph(file)
        self._graphs[file] = graph
        return graph

    def _whole_graph(self, file: str):
        """The CPU path: the graph in one session, or cut before its lm_head (RuntimeConfig.head_split) when it has
        one that the split finds."""
        from .executor import HeadSplitGraph, WholeGraph

        if self.config.head_split:
            from .segments import load_plan

            try:
                plan = load_plan(self.folder, file, self.config.cache_dir, mode="head")
            except SeaEdgeError:
                plan = None  # no matrix product makes the logits: one session
            except OSError as exc:
                raise SeaEdgeError(f"cannot split {self.folder / file}: {exc}") from exc
            if plan is not None:
                return HeadSplitGraph(plan, lambda step: self._session(plan.segment_bytes(step), f"{file}:{step.name}"),
                                      self.manifest["graphs"].get("state_shapes") or {},
                                      int(self.manifest["source_model"]["vocab_size"]),
                                      self.manifest["source_model"].get("hidden_size"))
        return WholeGraph(self._session(self.folder / file, file))

    def _session_options(self):
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[self.config.optimization]
        so.log_severity_level = 3
        # Memory (measured by sea_edge.runtime.measure on the default export, what the budget report models):
        # onnxruntime's default order runs each layer's SEA-state outputs last, keeping every layer's Performer
        # blocks alive to the end, and buffer reuse parks freed buffers across layers: together about 2x the peak.
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.enable_mem_reuse = False
        so.enable_mem_pattern = self.config.memory_pattern
        for key, value in self.manifest.get("quantization", {}).get("session_config", {}).items():
            so.add_session_config_entry(key, value)  # e.g. fp32 activations in fused MatMulNBits (see export)
        if self.config.threads is not None:
            so.intra_op_num_threads = self.config.threads
        if self.config.split_graphs:
            # 31 sessions run one after the other, each with its own thread pool: pools that spin-wait after their
            # run burn the cores the next one needs (measured, split decode step on 2 busy cores: 2.33 s spinning,
            # 0.41 s not; the whole graph 0.53 s)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.config.profile:
            so.enable_profiling = True
        return so

    def _session(self, model: Path | bytes, what: str):
        """An onnxruntime session of a graph file, or of a segment's bytes (its external data in the folder)."""
        from .executor import open_session

        so = self._session_options()
        if self.config.profile:
            so.profile_file_prefix = "sea_edge_" + "".join(c if c.isalnum() else "_" for c in what)
        try:
            sess, self.cuda_arena = open_session(self._ort, model, self.folder, so, self.backend, self.ort_cuda)
            return sess
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types, with long messages
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SeaEdgeError(f"onnxruntime cannot open {self.folder / what}: {first}") from exc

    @property
    def _decode(self):
        """The decode graph, opened on first use: perplexity and prefill-only work never pay for its memory."""
        return self._graph(self._files["decode"])

    @property
    def sessions(self) -> list:
        """Every onnxruntime session opened so far (one per graph, or one per segment of a split graph)."""
        out = []
        for g in self._graphs.values():
            out += list(g.sessions.values()) if isinstance(g.sessions, dict) else list(g.sessions)
        return out

    def _load_tokenizer(self):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tok.no_truncation()  # a saved tokenizer may carry a max length; windows and prompts are checked here
        tok.no_padding()
        return tok

    def _special_ids(self) -> tuple[tuple[int, ...], int]:
        """(end-of-sequence ids, pad id). EOS: generation_config.json's eos_token_id (the model's own stop tokens,
        what transformers' generate stops on) and the tokenizer's eos_token; they differ for GGUF teachers
        (SmolLM2: <|im_end|> vs <|im_start|>), and stopping on either is what a chat needs."""

        def read(name: str) -> dict:
            p = self.folder / name
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

        gen, names = read("generation_config.json"), {}
        for cfg in (read("special_tokens_map.json"), read("tokenizer_config.json")):
            for key in ("eos_token", "pad_token"):
                v = cfg.get(key)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    names.setdefault(key, v)
        ids = gen.get("eos_token_id")
        eos = [ids] if isinstance(ids, int) else list(ids or [])
        if "eos_token" in names and self.tokenizer.token_to_id(names["eos_token"]) is not None:
            eos.append(self.tokenizer.token_to_id(names["eos_token"]))
        eos = tuple(dict.fromkeys(eos))
        pad = gen.get("pad_token_id")
        if pad is None and "pad_token" in names:
            pad = self.tokenizer.token_to_id(names["pad_token"])
        return eos, pad if pad is not None else (eos[0] if eos else 0)

    # -- running the graphs ------------------------------------------------------------------------------------------
    def _feeds(self, graph, ids, mask, pos, state: dict | None, keep_last: bool = False) -> dict:
        names = set(graph.input_names)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feeds = {k: v for k, v in feeds.items() if k in names}  # some optimum graphs take no position_ids
        if keep_last and LOGITS_TO_KEEP in graph.overridable:
            feeds[LOGITS_TO_KEEP] = np.ones(1, np.int64)  # the last position's logits only
        if state is None and any(n in names for n in self.past_names):
            state = self._empty_state(ids.shape[0])  # one graph for prefill and decode: an empty cache
        if state is not None:
            feeds.update(state)
        return feeds

    def _empty_state(self, B: int) -> dict:
        shapes = self.manifest["graphs"]["state_shapes"]
        dtypes = {n: np.float16 if t == "tensor(float16)" else np.float32 for n, t in self._prefill.input_types.items()}
        out = {}
        for n in self.past_names:
            kind = n.rsplit(".", 1)[1]
            shape = [B if d == "batch" else 0 if isinstance(d, str) else int(d) for d in shapes[kind]]
            out[n] = np.zeros(shape, dtypes.get(n, np.float32))
        return out

    def _run(self, graph, ids, mask, pos, state, logits_only: bool = False, keep_last: bool = False,
             host_logits: bool = True):
        """logits (B, T, V), or (B, 1, V) with keep_last where the graph has the LOGITS_TO_KEEP input (else all T),
        and the present state. Logits come back as numpy unless `host_logits` is False (then as the backend's
        tensor: on the GPU for a CUDA session); the state is always the backend's (it stays on the device)."""
        outs = ["logits"] if logits_only else ["logits", *self.present_names]
        res = graph.run(outs, self._feeds(graph, ids, mask, pos, state, keep_last))
        logits = graph.backend.to_numpy(res[0]) if host_logits else res[0]
        return logits, dict(zip(self.past_names, res[1:]))

    def prefill_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of unpadded token windows ids (B, T) in one prefill."""
        return self._prefill_logits(ids, host=True)

    def _prefill_logits(self, ids: np.ndarray, host: bool):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        B, T = ids.shape
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
        return self._run(self._prefill, ids, np.ones((B, T), np.int64), pos, None, logits_only=True,
                         host_logits=host)[0]

    def synchronize(self) -> None:
        """Wait for the device (a CUDA session's stream); a no-op on CPU."""
        self.backend.synchronize()

    # -- generation --------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Prompt token ids, special tokens as the tokenizer adds them by default (what HF's tokenizer(text) gives)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def generate(self, prompt: str | list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_at_eos: bool = True, stream: Callable | None = None) -> GenerationResult:
        """Continue `prompt` (or each prompt of a list, as one left-padded batch) by up to `max_new_tokens` tokens.
        temperature 0 is greedy; `stream` is called with each new piece of text as soon as it is whole: stream(piece)
        for one prompt, stream(i, piece) for a list."""
        run = _Run(self, prompt, max_new_tokens, SamplingConfig(temperature, top_k, top_p, seed), stop_at_eos)
        for i, piece in run:
            if stream is not None:
                stream(piece) if run.single else stream(i, piece)
        return run.result()

    def stream(self, prompt: str | list[str], max_new_tokens: int = 64, **kw) -> Iterator:
        """`generate` as an iterator of text pieces (one prompt) or of (i, piece) pairs (a list of prompts)."""
        sampling = SamplingConfig(kw.pop("temperature", 0.0), kw.pop("top_k", None), kw.pop("top_p", None),
                                  kw.pop("seed", None))
        run = _Run(self, prompt, max_new_tokens, sampling, kw.pop("stop_at_eos", True))
        if kw:
            raise TypeError(f"stream() got unexpected arguments {sorted(kw)}")
        for i, piece in run:
            yield piece if run.single else (i, piece)

    # -- perplexity --------------------------------------------------------------------------------------------------
    def perplexity(self, text: str, seq_len: int, max_windows: int | None = None,
                   batch_size: int = 1) -> PerplexityResult:
        """Perplexity of `text` over non-overlapping `seq_len`-token windows (sea_edge.runtime.perplexity)."""
        if seq_len < 2:
            raise SeaEdgeError(f"seq_len must be >= 2 (the first token of each window is context only), got {seq_len}")
        if self.max_positions and seq_len > self.max_positions:
            raise SeaEdgeError(f"seq_len {seq_len} exceeds the model's maximum of {self.max_positions} positions")
        if batch_size < 1:
            raise SeaEdgeError(f"batch_size must be >= 1, got {batch_size}")
        windows = token_windows(self.tokenizer, text, seq_len, max_windows)  # (N, T)
        nll_sum = 0.0
        start = time.perf_counter()
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            nll_sum += self.backend.window_nll_sum(self._prefill_logits(batch, host=False), batch)
        seconds = time.perf_counter() - start
        n = len(windows)
        tokens = n * (seq_len - 1)
        nll = nll_sum / tokens
        return PerplexityResult(ppl=float(np.exp(nll)), nll=nll, tokens=tokens, seconds=seconds,
                                tokens_per_s=n * seq_len / seconds, peak_rss_mib=peak_rss_mib(), windows=n,
                                seq_len=seq_len)


class _Detokenizer:
    """Incremental text of one row: a piece is released once it no longer ends in a partial UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


@dataclass
class _Run:
    """One generation: iterate it for (row, piece) pairs, then call result()."""

    session: SeaSession
    prompt: str | list[str]
    max_new_tokens: int
    sampling: SamplingConfig
    stop_at_eos: bool
    single: bool = field(init=False)
    timing: dict = field(init=False)

    def __post_init__(self):
        self.single = isinstance(self.prompt, str)
        prompts = [self.prompt] if self.single else list(self.prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise SeaEdgeError("prompt must be a string or a non-empty list of strings")
        if self.max_new_tokens < 1:
            raise SeaEdgeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.rows = [self.session.encode(p) for p in prompts]
        if any(not r for r in self.rows):
            raise SeaEdgeError("a prompt encodes to no tokens")
        longest, cap = max(map(len, self.rows)), self.session.max_positions
        if cap and longest + self.max_new_tokens > cap:
            raise SeaEdgeError(f"prompt ({longest} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds the "
                               f"model's {cap} positions")
        self.detok = [_Detokenizer(self.session.tokenizer) for _ in self.rows]
        self.finish = ["length"] * len(self.rows)
        self.timing = {"prefill": 0.0, "decode": 0.0, "steps": 0}

    def __iter__(self):
        s, B = self.session, len(self.rows)
        L = max(map(len, self.rows))
        ids = np.full((B, L), s.pad_id, np.int64)
        mask = np.zeros((B, L), np.int64)
        for i, r in enumerate(self.rows):  # left padding: every row's last token is at column L - 1
            ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        decode = s._decode if self.max_new_tokens > 1 else None  # opened (once) before the clock starts
        t = time.perf_counter()
        logits, state = s._run(s._prefill, ids, mask, pos, None, keep_last=True, host_logits=False)
        logits = s.backend.to_numpy(logits[:, -1])  # (B, V): only the last row leaves the device
        self.timing["prefill"] = time.perf_counter() - t
        pos = pos[:, -1:]  # (B, 1)
        rng = np.random.default_rng(self.sampling.seed)
        done = np.zeros(B, bool)
        eos = set(s.eos_ids) if self.stop_at_eos else set()
        for step in range(self.max_new_tokens):
            tok = next_tokens(logits, self.sampling, rng)  # (B,)
            tok = np.where(done, s.pad_id, tok)
            for i in np.flatnonzero(~done):
                piece = self.detok[i].add(tok[i])
                if piece:
                    yield int(i), piece
                if int(tok[i]) in eos:
                    done[i], self.finish[i] = True, "eos"
            if done.all() or step + 1 == self.max_new_tokens:
                return
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)  # (B, S + 1)
            pos = pos + 1
            t = time.perf_counter()
            logits, state = s._run(decode, tok[:, None], mask, pos, state, host_logits=False)
            logits = s.backend.to_numpy(logits[:, -1])  # the state stays where the backend keeps it
            self.timing["decode"] += time.perf_counter() - t
            self.timing["steps"] += 1

    def result(self) -> GenerationResult:
        s = self.session
        texts = [s.tokenizer.decode(d.ids, skip_special_tokens=True) for d in self.detok]
        tokens = [d.ids for d in self.detok]
        prompt_tokens = [len(r) for r in self.rows]
        dec, steps = self.timing["decode"], self.timing["steps"]
        one = (lambda x: x[0]) if self.single else (lambda x: x)
        return GenerationResult(text=one(texts), tokens=one(tokens), prompt_tokens=one(prompt_tokens),
                                finish_reason=one(self.finish), prefill_seconds=self.timing["prefill"],
                                decode_seconds=dec, decode_steps=steps,
                                decode_tokens_per_s=len(self.rows) * steps / dec if dec > 0 else 0.0)
