"""CPU benchmark of an exported SEA folder against the dense baseline (sea_edge.export.dense), fp32, B = 1:
prefill latency and peak memory over context lengths, and decode tokens/s at a long context.

    python -m sea_edge.runtime.bench --sea DIR --dense DIR2 [--out /tmp/bench_cpu] [--quick]

Every measurement runs in a fresh process, so nothing (allocator arenas, thread pools, the other model's pages)
carries from one into the next.
- Prefill: sea_edge.runtime.measure.measure_peak (the memory-budget engineer's measurement, with the onnxruntime
  settings SeaSession uses): the session is opened, RSS after load = VmRSS; "5" is written to
  /proc/self/clear_refs, which resets the kernel's high-water mark VmHWM to the current RSS; one prefill of T random
  token ids; peak RSS = VmHWM: the most the process held during the run, loaded model included (what a device
  must have free). `--repeats` fresh processes per point: latency = the fastest, peak = the largest. The prefill
  graphs return logits for every position, (T, V) fp32 (V = 49152: 1.5 GiB at T = 8192), in both models alike.
- Decode: a child of this module (--child decode) opens a SeaSession, prefills a `--decode-context` prompt, runs
  one warm-up step, then `--decode-steps` timed greedy steps (KV cache, and SEA's state, carried).
A watchdog kills any child whose RSS passes --max-rss-gib (default 85% of MemAvailable at start), so a point that
does not fit fails alone instead of waking the kernel's OOM killer; the row then says so.

Prints the machine, versions and a table; writes bench.json and bench.png (when matplotlib is installed) to --out.
Timings are of this machine under its load at the time; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["LENGTHS", "QUICK_LENGTHS", "main", "prefill_point", "run_child"]

LENGTHS = (1024, 2048, 4096, 8192)
QUICK_LENGTHS = (1024, 2048)
_POLL_S = 0.1


# -- child side ----------------------------------------------------------------------------------------------------
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where the kernel refuses (then peak covers the load)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(args) -> dict:
    """--child decode: tokens/s of greedy decode steps after a prefill of `args.length` random tokens."""
    from sea_edge.runtime.session import SeaSession

    t = time.perf_counter()
    s = SeaSession(args.dir, threads=args.threads, verify=False)
    decode = s._decode
    out = {"dir": str(args.dir), "attention": s.attention, "context": args.length,
           "load_s": time.perf_counter() - t, "rss_after_load_mib": _status_mib("VmRSS"), "peak_reset": _reset_peak()}
    V, T = int(s.manifest["source_model"]["vocab_size"]), args.length
    ids = np.random.default_rng(0).integers(0, V, (1, T), dtype=np.int64)
    mask = np.ones((1, T), np.int64)
    pos = np.arange(T, dtype=np.int64)[None]
    t = time.perf_counter()
    logits, state = s._run(s._prefill, ids, mask, pos, None)
    out["prefill_s"] = time.perf_counter() - t
    step_times = []
    for step in range(args.steps + 1):  # step 0 warms up the decode graph
        tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        t = time.perf_counter()
        logits, state = s._run(decode, tok, mask, pos, state)
        if step:
            step_times.append(time.perf_counter() - t)
    out.update(steps=args.steps, decode_tokens_per_s=len(step_times) / sum(step_times),
               step_ms_median=1000 * float(np.median(step_times)), peak_rss_mib=_status_mib("VmHWM"))
    return out


def prefill_point(folder: Path, T: int, repeats: int, threads: int | None, timeout_s: float) -> dict:
    """`repeats` measure_peak runs (each a fresh process): fastest latency, largest peak, in MiB and seconds."""
    from sea_edge.runtime.measure import measure_peak

    from sea_edge.errors import SeaEdgeError

    runs = []
    for _ in range(repeats):
        try:
            runs.append(measure_peak(folder, T, threads=threads, timeout=timeout_s))
        except SeaEdgeError as exc:
            return {"error": str(exc).replace("(out of memory?)", "(over the memory limit)")}
    return {"latency_s": min(r["seconds"] for r in runs), "runs_s": [r["seconds"] for r in runs],
            "peak_rss_mib": max(r["peak_rss_bytes"] for r in runs) / 2**20,
            "rss_after_load_mib": runs[0]["rss_after_load"] / 2**20,
            "load_peak_rss_mib": max(r["load_peak_rss_bytes"] for r in runs) / 2**20,
            "output_mib": runs[0].get("output_bytes", 0) / 2**20, "settings": runs[0]["settings"]}


class _Watchdog:
    """Kill any child of this process whose RSS passes `max_rss_mib` (polled), so that a point that does not fit
    fails alone instead of waking the kernel's OOM killer on a shared machine. An address-space limit would not do:
    onnxruntime's arena reserves far more virtual memory than it touches."""

    def __init__(self, max_rss_mib: float):
        import threading

        self.max_rss_mib, self.killed = max_rss_mib, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _loop(self):
        import signal

        me = str(os.getpid())
        while not self._stop.wait(_POLL_S):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = f.read().rsplit(")", 1)[1].split()[1]
                    if ppid != me:
                        continue
                    with open(f"/proc/{pid}/status") as f:
                        rss = next((int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:")), 0.0)
                    if rss > self.max_rss_mib:
                        os.kill(int(pid), signal.SIGKILL)
                        self.killed.append((int(pid), rss))
                except (OSError, IndexError, StopIteration):
                    continue


def run_child(args: list[str], timeout_s: float, max_rss_mib: float) -> dict:
    """Run `python -m sea_edge.runtime.bench --child ...` and return its JSON; {"error": ...} on failure, timeout or
    when its RSS passes max_rss_mib (the parent kills it)."""
    cmd = [sys.executable, "-m", "sea_edge.runtime.bench", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, killed = time.monotonic(), None
    while proc.poll() is None:
        time.sleep(_POLL_S)
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
        except OSError:
            rss = 0.0
        if rss > max_rss_mib:
            killed = f"stopped at {rss / 1024:.1f} GiB RSS (limit {max_rss_mib / 1024:.1f} GiB)"
        elif time.monotonic() - start > timeout_s:
            killed = f"timed out after {timeout_s:.0f} s"
        if killed:
            proc.kill()
            break
    stdout, stderr = proc.communicate()
    if killed:
        return {"error": killed}
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {last}"}
    return json.loads(stdout.strip().splitlines()[-1])


# -- parent side ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        info["affinity_cores"] = len(os.sched_getaffinity(0))
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
        info["mem_total_gib"] = round(mem["MemTotal"] / 2**20, 1)
        info["load_average"] = os.getloadavg()
    except (OSError, AttributeError, KeyError):
        pass
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("sea-edge", "onnxruntime", "numpy", "tokenizers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def table(results: dict) -> str:
    header = (f"{'T':>6} | {'SEA prefill s':>13} {'dense s':>9} {'SEA/dense':>9} | {'SEA peak MiB':>12} "
              f"{'dense MiB':>9} {'SEA/dense':>9} | {'SEA load MiB':>12} {'dense load':>10}")
    rows = [header]
    for T, r in results["prefill"].items():
        s, d = r.get("sea", {}), r.get("dense", {})
        sl, dl = s.get("latency_s"), d.get("latency_s")
        sp, dp = s.get("peak_rss_mib"), d.get("peak_rss_mib")
        rows.append(f"{T:>6} | {_fmt(sl, '13.2f')} {_fmt(dl, '9.2f')} {_fmt(_ratio(sl, dl), '9.2f')} | "
                    f"{_fmt(sp, '12.0f')} {_fmt(dp, '9.0f')} {_fmt(_ratio(sp, dp), '9.2f')} | "
                    f"{_fmt(s.get('rss_after_load_mib'), '12.0f')} {_fmt(d.get('rss_after_load_mib'), '10.0f')}")
        for name, x in (("sea", s), ("dense", d)):
            if "error" in x:
                rows.append(f"{'':>6}   {name}: {x['error']}")
    dec = results.get("decode")
    if dec:
        s, d = dec.get("sea", {}), dec.get("dense", {})
        st, dt = s.get("decode_tokens_per_s"), d.get("decode_tokens_per_s")
        rows.append("")
        rows.append(f"decode at {dec['context']} tokens of context, {dec['steps']} greedy steps (B = 1): "
                    f"SEA {_fmt(st, '.2f')} tok/s, dense {_fmt(dt, '.2f')} tok/s, "
                    f"SEA/dense {_fmt(_ratio(st, dt), '.2f')}; peak RSS SEA {_fmt(s.get('peak_rss_mib'), '.0f')} MiB, "
                    f"dense {_fmt(d.get('peak_rss_mib'), '.0f')} MiB")
        for name, x in (("sea", s), ("dense", d)):
            if "error" in x:
                rows.append(f"  {name}: {x['error']}")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "latency_s", "prefill latency (s)"), (axes[1], "peak_rss_mib", "peak RSS (MiB)")):
        for name in ("sea", "dense"):
            pts = [(int(T), r[name][key]) for T, r in results["prefill"].items() if key in r.get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    m = results["machine"]
    fig.suptitle(f"SEA vs dense, onnxruntime CPU fp32, {m['cpu']}, {m['logical_cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sea_edge.runtime.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sea", type=Path, help="folder written by `sea-edge export`")
    p.add_argument("--dense", type=Path, help="folder written by sea_edge.export.dense.export_dense")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prefill lengths, comma separated")
    p.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} only")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per prefill point (fastest reported)")
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    p.add_argument("--max-rss-gib", type=float, default=None, help="memory limit of each child (default: 85%% of "
                   "MemAvailable at start)")
    p.add_argument("--out", type=Path, default=Path("bench_cpu"))
    # child mode (internal)
    p.add_argument("--child", choices=("decode",), help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args)))
        return 0
    if args.sea is None or args.dense is None:
        p.error("--sea and --dense are required")
    from sea_edge.runtime.manifest import read_folder

    for d in (args.sea, args.dense):
        read_folder(d, verify=True)  # once here; the children skip the hashing
    lengths = QUICK_LENGTHS if args.quick else tuple(int(x) for x in args.lengths.split(","))
    if args.max_rss_gib is None:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
        max_rss = 0.85 * avail
    else:
        max_rss = args.max_rss_gib * 1024
    threads = ["--threads", str(args.threads)] if args.threads else []
    results = {"machine": machine(), "versions": versions(), "dirs": {"sea": str(args.sea), "dense": str(args.dense)},
               "settings": {"repeats": args.repeats, "threads": args.threads, "max_rss_mib": max_rss,
                            "dtype": "fp32", "batch": 1},
               "prefill": {}, "decode": {}}
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['logical_cores']} logical cores, {m.get('mem_total_gib', '?')} GiB, "
          f"load average {m.get('load_average', '?')}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), flush=True)
    with _Watchdog(max_rss):
        for T in lengths:
            results["prefill"][T] = {}
            for name, d in (("sea", args.sea), ("dense", args.dense)):
                t = time.time()
                r = prefill_point(d, T, args.repeats, args.threads, args.timeout)
                results["prefill"][T][name] = r
                print(f"  prefill T={T} {name}: {r.get('latency_s', r.get('error'))} ({time.time() - t:.0f} s wall)",
                      flush=True)
        if args.decode_context:
            results["decode"] = {"context": args.decode_context, "steps": args.decode_steps}
            for name, d in (("sea", args.sea), ("dense", args.dense)):
                r = run_child(["--child", "decode", "--dir", str(d), "--length", str(args.decode_context),
                               "--steps", str(args.decode_steps), *threads], args.timeout, max_rss)
                results["decode"][name] = r
                what = r.get("decode_tokens_per_s", r.get("error"))
                print(f"  decode ctx={args.decode_context} {name}: {what} tok/s", flush=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    print()
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    wrote = ["bench.json"] + (["bench.png"] if plot(results, args.out / "bench.png") else [])
    print(f"\nwrote {', '.join(wrote)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
