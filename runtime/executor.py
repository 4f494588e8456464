"""Running a graph split at its SparseAttention and ColumnScores nodes (sea_edge.runtime.segments): onnxruntime runs
the segments, a backend computes the split nodes, and the backend's tensors carry every value from one step to the
next.

    graph = SegmentedGraph(plan, folder, backend, options)   # one onnxruntime session per segment
    logits, *state = graph.run(["logits", *present], feeds)   # feeds: numpy or the backend's own tensors

Backends (how the split nodes are computed, and what a value is between steps):
- NumpyBackend: numpy arrays, `InferenceSession.run`, the NumPy twins of the references (runtime/sparse_attention.py,
  runtime/column_scores.py).
  CPU only; no torch. What the CI tests compare with the whole graph in one session.
- TorchBackend(device, attention): torch tensors on `device`, handed to and from onnxruntime through IO binding with
  no copy: a segment's input is bound to the tensor's own memory (`bind_input(..., tensor.data_ptr())`), its outputs
  are allocated by onnxruntime on the device (`bind_output(name, "cuda")`) and wrapped as torch tensors over the same
  memory (DLPack, else `__cuda_array_interface__`; the wrapper keeps the OrtValue alive). attention "triton":
  sea_edge.kernels.sparse_attention_triton and column_scores_triton (CUDA); "torch": the references
  sparse_attention_ref and column_scores_ref (any device).
  torch and triton are imported here, on first use, never by `import sea_edge.runtime`.

On CUDA, onnxruntime and torch share one stream: every segment session gets the backend's torch stream as its
`user_compute_stream`, and the backend runs its torch work under that stream, so a Triton kernel is ordered after
the segment that wrote its inputs and before the one that reads its output, with no host round trip. As a second
guard (onnxruntime versions differ in how they honour that option) the backend synchronizes its stream before each
segment runs (SEA_EDGE_CUDA_SYNC=0 turns that off); onnxruntime itself synchronizes at the end of each run.
Segments share one onnxruntime CUDA arena (an allocator registered with the environment, `session.use_env_allocators`),
so the memory a segment freed is reused by the next one instead of being held by 31 separate arenas. Each session
still has its own cuBLAS handles, and cuBLAS gives every handle a default workspace pool (measured on an H200 with
onnxruntime-gpu 1.31.1: 81 MiB of GPU memory per session with a MatMul, 2.2 GiB over the 31 segments; 17 MiB with
CUBLAS_WORKSPACE_CONFIG=:0:0). The backend sets CUBLAS_WORKSPACE_CONFIG=:0:0 unless the caller set it: cuBLAS reads
it when its first handle of the process is made, so it holds when no cuBLAS work ran in the process before the
backend (importing torch, starting CUDA is fine; a torch matmul first is not). Prefill at T = 4096 on the H200: load
memory 3553 -> 1569 MiB, peak 6131 -> 4147 MiB, time +1% to +5% (runtime/results/gpu_h200/README.md).

Where a value lives: a segment output is allocated where its first reader wants it (`get_input_memory_infos` of the
next segment that reads it: shape arithmetic that onnxruntime places on the CPU reads host memory; a split node or
the caller: the device), and the caller's numpy feeds are uploaded only where the graph wants them on the device.
A tensor is bound where it is: where onnxruntime wants it elsewhere, onnxruntime copies it (torch.profiler sees it).
`backend.stats` counts what crossed: handoffs (onnxruntime -> torch, all zero-copy when "handoffs_copied" is 0),
inputs bound in place, values moved between host and device (with bytes), uploads of numpy feeds and downloads.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sea_edge.errors import SeaEdgeError

from .column_scores import column_scores_np
from .segments import SPLIT_OPS, SegmentPlan, Step
from .sparse_attention import sparse_attention_np

__all__ = ["ENV_ALLOCATORS", "EXTERNAL_DATA_FOLDER", "RECORD_PLACEMENT", "HeadSplitGraph", "NumpyBackend",
           "SegmentedGraph", "TorchBackend", "WholeGraph", "limit_cublas_workspace", "node_placement", "open_session",
           "register_cuda_arena", "run_op"]

EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
"""onnxruntime session option: where the external data of a model opened from bytes is (our segments)."""
ENV_ALLOCATORS = "session.use_env_allocators"
RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"
"""onnxruntime session option: keep which execution provider each node was assigned to (node_placement)."""
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}
_CAI_TYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "int16": "<i2",
              "int8": "|i1", "uint8": "|u1", "bool": "|b1"}


class NumpyBackend:
    """Values are numpy arrays; segments run with InferenceSession.run; the split nodes are the NumPy twins."""

    name, device = "numpy", "cpu"

    def __init__(self):
        self.stats: Counter = Counter()

    def asarray(self, x, where: str = "device"):
        return np.asarray(x)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def prepare(self, graph: SegmentedGraph) -> None:
        pass

    def run_segment(self, sess, feeds: dict, outputs: list[str], wants: dict[str, str]) -> dict:
        return dict(zip(outputs, sess.run(outputs, feeds)))

    def sparse_attention(self, q, k, v, idx, scale: float):
        self.stats["sparse_attention_calls"] += 1
        return sparse_attention_np(q, k, v, idx, scale)

    def column_scores(self, q, k, key_valid, K: int, causal: bool, scale: float):
        self.stats["column_scores_calls"] += 1
        return column_scores_np(q, k, key_valid, K, causal, scale)

    def window_nll_sum(self, logits, ids: np.ndarray) -> float:
        from .perplexity import window_nll_sum

        return window_nll_sum(np.asarray(logits), ids)

    def synchronize(self) -> None:
        pass


class _CudaArray:
    """An onnxruntime CUDA buffer seen through __cuda_array_interface__ (v2: no stream, the data is ready)."""

    def __init__(self, ortvalue, typestr: str):
        self.ortvalue = ortvalue  # torch.as_tensor keeps this object, hence the OrtValue, alive
        self.__cuda_array_interface__ = {"shape": tuple(ortvalue.shape()), "typestr": typestr,
                                         "data": (ortvalue.data_ptr(), False), "version": 2}


class TorchBackend:
    """Values are torch tensors on `device` ("cuda", "cuda:1" or "cpu"); see the module docstring."""

    name = "torch"

    def __init__(self, device: str = "cuda", attention: str = "triton"):
        if str(device).startswith("cuda"):
            limit_cublas_workspace()
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            if not torch.cuda.is_available():
                raise SeaEdgeError(f"device {device!r} needs a CUDA GPU visible to torch (torch {torch.__version__},"
                                   f" torch.cuda.is_available() is False)")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.ort_device = ("cuda", self.device.index) if self.cuda else ("cpu", 0)
        if attention == "triton":
            if not self.cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise SeaEdgeError("attention 'triton' needs a CUDA device (or TRITON_INTERPRET=1: the kernels "
                                   "interpreted on the CPU, for tests)")
            try:
                from sea_edge.kernels.triton_column_scores import column_scores_triton as scores_fn
                from sea_edge.kernels.triton_sparse_attention import sparse_attention_triton as fn
            except ImportError as exc:
                raise SeaEdgeError(f"attention 'triton' needs triton ({exc})") from None
        elif attention == "torch":
            from sea_edge.kernels.reference import column_scores_ref as scores_fn
            from sea_edge.kernels.reference import sparse_attention_ref as fn
        else:
            raise SeaEdgeError(f"unknown attention {attention!r} for the torch backend: use triton or torch")
        self.attention, self._attention_fn, self._scores_fn = attention, fn, scores_fn
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ort_cuda = self.cuda  # False: the segments run on onnxruntime's CPU provider (no onnxruntime-gpu)
        self.run_options = None  # onnxruntime RunOptions of every segment run (arena shrinkage without a shared arena)
        self.sync_before_segment = self.cuda and os.environ.get("SEA_EDGE_CUDA_SYNC", "1") != "0"
        self.stats: Counter = Counter()
        self._dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                        "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                        "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
        self._names = {v: k for k, v in self._dtypes.items()}

    # -- the stream ------------------------------------------------------------------------------------------------
    def stream_context(self):
        import contextlib

        return self.torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.cuda:
            self.stream.synchronize()

    def provider_options(self) -> dict:
        """CUDAExecutionProvider options of every segment session: this device, this stream, fp32 GEMMs in fp32
        (TF32 off, as on the CPU path; SEA_EDGE_CUDA_TF32=1 turns it on), arenas growing by what is asked."""
        if not self.cuda:
            return {}
        return {"device_id": str(self.device.index), "user_compute_stream": str(self.stream.cuda_stream),
                "use_tf32": os.environ.get("SEA_EDGE_CUDA_TF32", "0"), "arena_extend_strategy": "kSameAsRequested"}

    # -- host <-> device -------------------------------------------------------------------------------------------
    def asarray(self, x, where: str = "device"):
        """A caller's feed (numpy or torch) as a tensor where its first reader wants it ("cpu" or "device"; an
        upload for numpy on CUDA)."""
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return x
        a = np.ascontiguousarray(x)
        t = torch.from_numpy(a)
        if self.cuda and self.ort_cuda and where != "cpu":
            self.stats["uploads"] += 1
            self.stats["upload_bytes"] += a.nbytes
            with self.stream_context():
                t = t.to(self.device, non_blocking=False)
        return t

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        if x.device.type != "cpu":
            self.stats["downloads"] += 1
            self.stats["download_bytes"] += x.numel() * x.element_size()
            with self.stream_context():
                x = x.cpu()  # ordered after the stream's work
        return x.numpy()

    def _place(self, t, where: str):
        """t as a segment input. On onnxruntime's CUDA provider a tensor is bound where it is: where onnxruntime
        wants the other side (a device tensor read only by a Shape node on the CPU, say), it copies itself, and
        torch.profiler sees that copy; moving it here would copy it every time, even when onnxruntime would not.
        On the CPU provider (no onnxruntime-gpu) a device tensor must come to the host: counted."""
        if self.ort_cuda or t.device.type == "cpu":
            return t
        self.stats["moved_to_host"] += 1
        self.stats["moved_bytes"] += t.numel() * t.element_size()
        return t.cpu()

    # -- onnxruntime <-> torch -------------------------------------------------------------------------------------
    def _from_ort(self, ov):
        torch = self.torch
        dtype = self._dtypes[_ORT_TYPES[ov.data_type()]]
        shape = list(ov.shape())
        on_gpu = ov.device_name().lower() == "cuda"
        device = self.device if on_gpu else torch.device("cpu")
        if 0 in shape:
            return torch.empty(shape, dtype=dtype, device=device)
        t = None
        try:
            t = torch.from_dlpack(ov)
            self.stats["handoff_dlpack"] += 1
        except Exception:  # noqa: BLE001 (an onnxruntime or torch without the DLPack path: try the array interface)
            if on_gpu:
                t = torch.as_tensor(_CudaArray(ov, _CAI_TYPES[_ORT_TYPES[ov.data_type()]]), device=device)
                self.stats["handoff_cuda_array_interface"] += 1
            else:
                t = torch.from_numpy(ov.numpy())  # a CPU OrtValue's numpy view shares its memory
                self.stats["handoff_numpy"] += 1
        if t.dtype != dtype and t.element_size() == torch.empty((), dtype=dtype).element_size():
            t = t.view(dtype)  # onnxruntime 1.31 hands bool over DLPack as uint8: the same bytes, reinterpreted
        self.stats["handoffs"] += 1
        if t.data_ptr() != ov.data_ptr() or t.dtype != dtype or list(t.shape) != shape:
            self.stats["handoffs_copied"] += 1  # never expected: the evidence of a zero-copy handoff
        return t

    def prepare(self, graph: SegmentedGraph) -> None:
        pass

    def run_segment(self, sess, feeds: dict, outputs: list[str], wants: dict[str, str]) -> dict:
        """Run one segment through IO binding: inputs bound in place, outputs allocated by onnxruntime where `wants`
        says ("cpu" or "device")."""
        with self.stream_context():
            return self._run_segment(sess, feeds, outputs, wants)

    def _run_segment(self, sess, feeds: dict, outputs: list[str], wants: dict[str, str]) -> dict:
        from onnxruntime import OrtValue

        torch = self.torch
        io = sess.io_binding()
        keep = []
        dev_type, dev_id = self.ort_device if self.ort_cuda else ("cpu", 0)
        for name, t in feeds.items():
            t = self._place(t, wants.get(name, "device")).contiguous()
            keep.append(t)
            ort_dev = ("cuda", dev_id) if t.device.type == "cuda" else ("cpu", 0)
            np_type = np.dtype(self._names[t.dtype]) if t.dtype != torch.bfloat16 else 16  # onnx BFLOAT16
            if t.numel() == 0:  # no memory to point at: an empty OrtValue of the shape
                ov = OrtValue.ortvalue_from_shape_and_type(list(t.shape), np_type, *ort_dev)
                keep.append(ov)
                io.bind_ortvalue_input(name, ov)
            else:
                io.bind_input(name, ort_dev[0], ort_dev[1], np_type, list(t.shape), t.data_ptr())
                self.stats["bound_in_place"] += 1
        for name in outputs:
            where = wants.get(name, "device")
            io.bind_output(name, "cpu" if where == "cpu" else dev_type, 0 if where == "cpu" else dev_id)
        if self.sync_before_segment:
            self.stream.synchronize()
        sess.run_with_iobinding(io, self.run_options)
        out = {n: self._from_ort(ov) for n, ov in zip(outputs, io.get_outputs())}
        del keep
        return out

    def _on_device(self, tensors) -> list:
        ins = []
        for t in tensors:
            if t.device != self.device:
                self.stats["moved_to_device"] += 1
                self.stats["moved_bytes"] += t.numel() * t.element_size()
                t = t.to(self.device)
            ins.append(t)
        return ins

    def sparse_attention(self, q, k, v, idx, scale: float):
        self.stats["sparse_attention_calls"] += 1
        ins = self._on_device((q, k, v, idx))
        with self.stream_context():
            return self._attention_fn(*ins, float(scale))

    def column_scores(self, q, k, key_valid, K: int, causal: bool, scale: float):
        self.stats["column_scores_calls"] += 1
        q, k, key_valid = self._on_device((q, k, key_valid))
        with self.stream_context():
            return self._scores_fn(q, k, int(K), bool(causal), float(scale), key_valid)

    def window_nll_sum(self, logits, ids: np.ndarray) -> float:
        """Summed next-token NLL (float64) on the device: no (B, T, V) download."""
        torch = self.torch
        if isinstance(logits, np.ndarray):
            from .perplexity import window_nll_sum

            return window_nll_sum(logits, ids)
        B, T, _ = logits.shape
        with self.stream_context():
            tgt = torch.from_numpy(np.ascontiguousarray(ids)).to(logits.device)
            total = torch.zeros((), dtype=torch.float64, device=logits.device)
            for b in range(B):
                for s in range(0, T - 1, 256):
                    e = min(s + 256, T - 1)
                    x = logits[b, s:e].double()  # (rows, V)
                    pick = x.gather(1, tgt[b, s + 1:e + 1, None])[:, 0]
                    total += (torch.logsumexp(x, -1) - pick).sum()
            return float(total.item())


class WholeGraph:
    """One onnxruntime session for the whole graph, numpy in and out (the CPU path)."""

    def __init__(self, sess):
        self.sess, self.backend = sess, NumpyBackend()
        self.input_names = [i.name for i in sess.get_inputs()]
        self.input_types = {i.name: i.type for i in sess.get_inputs()}
        self.overridable = {i.name for i in sess.get_overridable_initializers()}
        self.sessions = [sess]

    def run(self, outputs: list[str], feeds: dict) -> list:
        return self.sess.run(outputs, feeds)


class HeadSplitGraph:
    """A graph cut before its lm_head (segments.py, mode "head") and run as two onnxruntime sessions on the CPU, so
    that a long prefill's (B, T, V) logits do not land on top of what the layers left in the arena.

    onnxruntime's CPU arena keeps every region it grew to the end of the session, and the logits, allocated last,
    cannot reuse the layers' freed chunks (too large, and interleaved with live state): in one session SEA's peak is
    the layers' working set plus the logits. Here the body runs first with its state outputs written into numpy
    arrays the runtime allocated (IO binding), so no arena region is pinned by an output, and with
    `memory.enable_memory_arena_shrinkage`, which returns the body's now empty regions to the system at the end of
    its run; the head (the lm_head alone) then allocates the logits. Default export at T = 4096 (2-core x86,
    onnxruntime 1.32): peak RSS 2452 MiB in one session, 1825 MiB split; the dense optimum export 3837 -> 3742 MiB
    (its peak is in attention). Shrinking costs the next run its page faults, so it is done only when the logits
    are at least SHRINK_LOGITS_BYTES (never for a decode step).

    `state_shapes`: the manifest's graphs.state_shapes ({kind: dims, "batch" and "past_sequence_length" symbolic});
    present.<i>.<kind> outputs get numpy buffers of those shapes, and so does the cut (B, rows, hidden_size) when
    `hidden_size` is given (others are onnxruntime's). `vocab`: V."""

    SHRINK_LOGITS_BYTES = 64 << 20

    def __init__(self, plan: SegmentPlan, open_session: Callable[[Step], object], state_shapes: dict, vocab: int,
                 hidden_size: int | None = None):
        if [s.kind for s in plan.steps] != ["ort", "ort"]:
            raise SeaEdgeError(f"{plan.graph_file}: a head split has two onnxruntime segments, this plan has "
                               f"{[s.kind for s in plan.steps]}")
        self.plan, self.backend = plan, NumpyBackend()
        self.body_step, self.head_step = plan.steps
        self.body, self.head = (open_session(s) for s in plan.steps)
        self.sessions = [self.body, self.head]
        self.input_names = list(plan.inputs)
        self.overridable = set(plan.overridable)
        self.input_types = {i.name: i.type for i in self.body.get_inputs()}
        self._out_types = {o.name: _ORT_TYPES.get(o.type) for o in self.body.get_outputs()}
        self.state_shapes, self.vocab, self.hidden_size = state_shapes, int(vocab), hidden_size
        self.last_shrunk = False

    def _out_shape(self, name: str, B: int, S: int, rows: int) -> list[int] | None:
        if name in self.head_step.inputs:  # the cut: the final hidden states of the rows whose logits are made
            return [B, rows, self.hidden_size] if self.hidden_size else None
        dims = self.state_shapes.get(name.rsplit(".", 1)[-1]) if name.startswith("present.") else None
        if dims is None:
            return None
        out = []
        for d in dims:
            if d == "batch":
                out.append(B)
            elif d == "past_sequence_length":
                out.append(S)
            elif isinstance(d, int):
                out.append(d)
            else:
                return None  # a symbol we cannot resolve: let onnxruntime allocate it
        return out

    def run(self, outputs: list[str], feeds: dict) -> list:
        import onnxruntime as ort

        _check_io(self.input_names, self.overridable, self.plan.outputs, outputs, feeds)
        body, head = self.body_step, self.head_step
        ids, mask = feeds["input_ids"], feeds.get("attention_mask")
        B, T = ids.shape
        S = mask.shape[1] if mask is not None else T
        keep = feeds.get("num_logits_to_keep")
        rows = T if keep is None else min(T, int(np.asarray(keep).reshape(-1)[0]) or T)
        wants_logits = any(o in head.outputs for o in outputs)
        ro = ort.RunOptions()
        self.last_shrunk = wants_logits and B * rows * self.vocab * 4 >= self.SHRINK_LOGITS_BYTES
        if self.last_shrunk:
            ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        need = [o for o in body.outputs if o in outputs or (wants_logits and o in head.inputs)]
        io = self.body.io_binding()
        for name, d in self.plan.defaults.items():  # an overridable input not given: its default
            if name in body.inputs and name not in feeds:
                io.bind_cpu_input(name, np.array(d["values"], np.int64).reshape(d["dims"]))
        for name, value in feeds.items():
            if name in body.inputs:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        values: dict = {}
        for name in need:
            shape, dtype = self._out_shape(name, B, S, rows), self._out_types.get(name)
            if shape is None or dtype is None:
                io.bind_output(name, "cpu")
                continue
            arr = np.empty(shape, dtype=dtype)
            values[name] = arr
            io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        try:
            self.body.run_with_iobinding(io, ro)
        except Exception as exc:  # e.g. a state buffer of another shape than the graph's (a manifest out of step)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SeaEdgeError(f"{self.plan.graph_file} (body): {first}") from exc
        for name, ov in zip(need, io.get_outputs()):
            if name not in values:
                values[name] = ov.numpy()
        del io
        if self.last_shrunk:
            _trim_heap()
        if wants_logits:
            values.update(zip(head.outputs, self.head.run(head.outputs, {x: values[x] for x in head.inputs})))
        return [values[n] for n in outputs]


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing): onnxruntime's
    kernels malloc scratch outside the arena (measured after a SEA body at T = 4096: 29 MiB)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SegmentedGraph:
    """A split graph: one onnxruntime session per segment, `backend` between them (see the module docstring).

    `open_session(step)` opens the onnxruntime session of an "ort" step (the caller's settings; a segment's external
    data resolves against the export folder)."""

    def __init__(self, plan: SegmentPlan, backend, open_session: Callable[[Step], object]):
        self.plan, self.backend = plan, backend
        self.sessions: dict[str, object] = {}
        for s in plan.steps:
            if s.kind == "ort":
                self.sessions[s.name] = open_session(s)
            elif s.op not in {op for _, op in SPLIT_OPS}:
                raise SeaEdgeError(f"no implementation for split node {s.op!r} ({s.name})")
        self.input_names = list(plan.inputs)
        self.overridable = set(plan.overridable)
        self.input_types: dict[str, str] = {}
        for sess in self.sessions.values():
            for i in sess.get_inputs():
                self.input_types.setdefault(i.name, i.type)
        # where each value should live for its first reader: an "op" step and the caller want the device
        wants_of_session: dict[str, dict[str, str]] = {}
        for name, sess in self.sessions.items():
            wants_of_session[name] = _input_placement(sess)
        self.wants: dict[str, str] = {}
        for s in plan.steps:
            for x in s.inputs:
                if x not in self.wants:
                    self.wants[x] = wants_of_session[s.name].get(x, "device") if s.kind == "ort" else "device"
        self._readers: list[set[str]] = []
        later: set[str] = set()
        for s in reversed(plan.steps):  # what any later step still reads, after each step
            self._readers.insert(0, set(later))
            later |= set(s.inputs)
        self.cpu_nodes = None  # filled by node_placement() where onnxruntime records it
        self.step_times: list | None = None  # set to [] to time each step of the next runs (kind, op or name, s)
        backend.prepare(self)

    @property
    def n_segments(self) -> int:
        return len(self.sessions)

    def run(self, outputs: list[str], feeds: dict) -> list:
        """The graph's `outputs` for `feeds` (numpy or backend tensors); returns backend tensors."""
        be = self.backend
        _check_io(self.input_names, self.overridable, self.plan.outputs, outputs, feeds)
        values = {n: be.asarray(v, self.wants.get(n, "device")) for n, v in feeds.items()}
        wanted = set(outputs)
        timer = self.step_times  # a list: each step's wall time, the device synchronized around it (profiling)
        for j, s in enumerate(self.plan.steps):
            if timer is not None:
                be.synchronize()
                t0 = time.perf_counter()
            after = self._readers[j]
            if s.kind == "ort":
                ins = {x: values[x] for x in s.inputs if x in values}
                outs = [o for o in s.outputs if o in after or o in wanted]
                if outs:
                    values.update(be.run_segment(self.sessions[s.name], ins, outs, self.wants))
            else:
                values[s.outputs[0]] = run_op(be, s, values)
            for x in [x for x in s.inputs if x not in after and x not in wanted]:
                values.pop(x, None)  # last reader done: free it now (a long prefill holds no dead layers)
            if timer is not None:
                be.synchronize()
                timer.append((s.kind, s.op or s.name, time.perf_counter() - t0))
        return [values[n] for n in outputs]


def _check_io(inputs: list[str], overridable: set[str], graph_outputs: list[str], outputs: list[str],
              feeds: dict) -> None:
    """One-line errors for a missing or unknown input and an unknown output of a split graph."""
    missing = [n for n in inputs if n not in feeds and n not in overridable]
    if missing:
        raise SeaEdgeError(f"missing graph input {missing[0]!r} (the graph takes {', '.join(inputs)})")
    unknown = [n for n in feeds if n not in inputs]
    if unknown:
        raise SeaEdgeError(f"unknown graph input {unknown[0]!r} (the graph takes {', '.join(inputs)})")
    bad = [n for n in outputs if n not in graph_outputs]
    if bad:
        raise SeaEdgeError(f"unknown graph output {bad[0]!r}")


def run_op(backend, step: Step, values: dict):
    """The output of a split node's step ("op") computed by `backend` from `values`."""
    a = step.attributes
    if step.op == "SparseAttention":
        q, k, v, idx = (values[x] for x in step.inputs)
        return backend.sparse_attention(q, k, v, idx, a["scale"])
    if step.op == "ColumnScores":
        q, k, key_valid = (values[x] for x in step.inputs)
        return backend.column_scores(q, k, key_valid, a["K"], a["causal"], a["scale"])
    raise SeaEdgeError(f"no implementation for split node {step.op!r} ({step.name})")


def _input_placement(sess) -> dict[str, str]:
    """{input name: "cpu" | "device"}: where onnxruntime wants each input of `sess` (all "device" when unknown)."""
    try:
        infos = sess.get_input_memory_infos()
    except Exception:  # noqa: BLE001 (older onnxruntime)
        return {}
    out = {}
    for i, mi in zip(sess.get_inputs(), infos):
        name = str(getattr(mi, "name", "")).lower()
        out[i.name] = "cpu" if (not name.startswith("cuda") or "pinned" in name or "cpu" in name) else "device"
    return out


def node_placement(sess) -> dict[str, int] | None:
    """{execution provider: nodes} of a session opened with session.record_ep_graph_assignment_info = 1, plus
    "Memcpy" for the copy nodes onnxruntime inserted and "cpu:<op type>" for every op type it left on the CPU of a
    CUDA session (shape arithmetic is expected there; anything large is a host round trip); None where this
    onnxruntime cannot tell."""
    try:
        info = sess.get_provider_graph_assignment_info()
    except Exception:  # noqa: BLE001
        return None
    out: Counter = Counter()
    cuda = any(sub.ep_name == "CUDAExecutionProvider" for sub in info)
    for sub in info:
        for n in sub.get_nodes():
            out[sub.ep_name] += 1
            if n.op_type.startswith("Memcpy"):
                out["Memcpy"] += 1
            elif cuda and sub.ep_name == "CPUExecutionProvider":
                out[f"cpu:{n.op_type}"] += 1
    return dict(out)


CUBLAS_WORKSPACE = ":0:0"
"""CUBLAS_WORKSPACE_CONFIG the CUDA backend sets unless the caller did: no default workspace pool per cuBLAS handle
(one handle set per onnxruntime session; see the module docstring)."""


def limit_cublas_workspace() -> str:
    """Set CUBLAS_WORKSPACE_CONFIG to CUBLAS_WORKSPACE unless it is set; returns the value in force."""
    return os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


_CUDA_ARENAS: dict[int, str] = {}


def register_cuda_arena(ort, device_id: int) -> str:
    """Register one CUDA arena for every onnxruntime session of this process on `device_id` (once), growing by
    what is asked (kSameAsRequested: no power-of-two slack, so the measured peak is what the graphs use).
    Returns "env" when sessions should set session.use_env_allocators, else "per-session: <why>"."""
    if device_id in _CUDA_ARENAS:
        return _CUDA_ARENAS[device_id]
    if os.environ.get("SEA_EDGE_CUDA_ARENA") == "session":  # for comparison: an arena per session, shrunk per run
        _CUDA_ARENAS[device_id] = "per-session: SEA_EDGE_CUDA_ARENA=session"
        return _CUDA_ARENAS[device_id]
    try:
        mem = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT)
        cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})  # 1 = kSameAsRequested
        ort.create_and_register_allocator_v2("CUDAExecutionProvider", mem, {"device_id": str(device_id)}, cfg)
        mode = "env"
    except Exception as exc:  # noqa: BLE001 (an onnxruntime without the v2 registration: one arena per session)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        mode = f"per-session: {first[:200]}"
    _CUDA_ARENAS[device_id] = mode
    return mode


def open_session(ort, model: Path | bytes, folder: Path, so, backend, cuda: bool) -> tuple[object, str]:
    """An onnxruntime InferenceSession of a graph file, or of a segment's bytes whose external data is in `folder`,
    with `so` (the caller's SessionOptions, completed here) on the CPU provider or, with `cuda`, on the
    CUDAExecutionProvider with the backend's provider options and the process's shared CUDA arena. Returns the
    session and how CUDA memory is pooled ("env", "per-session: ...", or "" on the CPU)."""
    providers: list = ["CPUExecutionProvider"]
    if isinstance(model, bytes):
        so.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(folder).resolve()))
        so.add_session_config_entry(RECORD_PLACEMENT, "1")
    arena = ""
    if cuda:
        device_id = getattr(getattr(backend, "device", None), "index", None) or 0
        arena = register_cuda_arena(ort, device_id)
        if arena == "env":
            so.add_session_config_entry(ENV_ALLOCATORS, "1")  # one CUDA arena for every session
        elif hasattr(backend, "run_options") and backend.run_options is None:
            # 31 segment sessions with an arena each would each keep their own peak: give back after each run
            ro = ort.RunOptions()
            ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{device_id}")
            backend.run_options = ro
        options = backend.provider_options() if hasattr(backend, "provider_options") else {}
        providers = [("CUDAExecutionProvider", options or {"device_id": str(device_id)}), "CPUExecutionProvider"]
    from .ort_workarounds import disabled_optimizers

    data = model if isinstance(model, bytes) else str(model)
    off = disabled_optimizers(ort)
    sess = ort.InferenceSession(data, so, providers=providers, **({"disabled_optimizers": off} if off else {}))
    if cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime falls back to the CPU quietly when its CUDA provider library cannot load (CUDA/cuDNN libraries
        # of another major version than it was built for): every step would then cross the host
        try:
            from onnxruntime.capi import build_and_package_info as info

            built = f"built for CUDA {getattr(info, 'cuda_version', '?')}, cuDNN {getattr(info, 'cudnn_version', '?')}"
        except ImportError:
            built = "build info unknown"
        raise SeaEdgeError(f"onnxruntime {ort.__version__} could not start its CUDAExecutionProvider ({built}; "
                           f"session providers {sess.get_providers()}): check its CUDA and cuDNN libraries")
    return sess, arena
