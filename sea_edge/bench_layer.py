"""Benchmark of one whole SEA attention layer (Performer estimate + decoder CNN + mask + sparse attention) against
dense SDPA with the flash backend, on the GPU. A program that prints a table and writes JSON and a PNG; never a test.

    python -m sea_edge.bench_layer --out bench-out [--T 4096 16384 65536] [--k 64 512]

The estimator has its initial weights: its cost does not depend on what it learned. Shapes follow the kernels
benchmark: B = 1, fp16, D = 64, H = 12 (and SmolLM2's 9 query / 3 key-value heads).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from sea_edge.kernels.bench import peak_mib

from .attention import sea_attention
from .config import SEAConfig
from .estimator import SEAEstimator

__all__ = ["bench_layer", "main"]


def _time_ms(fn, cuda: bool, warmup=3, rep=10) -> float:
    """Median time after warm-up: CUDA events on the GPU (synchronised), the host clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _graphed(fn):
    """fn captured once in a CUDA graph, its replay returned (None where it cannot be captured: a host sync inside).
    A layer of ~60 kernels spends ~40 us of host time per launch in eager mode, more than its GPU time up to
    T ~ 16k (kernels/NOTES.md); a graph launches all of them at once, as a serving runtime does per shape."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (Triton compiles, the allocator fills)
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return graph.replay


def bench_layer(T: int, k: int, H: int, Hkv: int, causal: bool, D: int = 64, dtype=torch.float16,
                dev: str = "cuda", autocast: bool = False) -> dict:
    """One row: SEA layer vs dense SDPA (flash backend on the GPU; the CPU smoke run takes what the CPU has)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = dev == "cuda"
    cfg = SEAConfig(k=k).resolve(causal=causal, head_dim=D)
    est = SEAEstimator(cfg, D, H, max_positions=max(T, 8192)).to(dev)
    g = torch.Generator(device=dev).manual_seed(T + k)
    q = torch.randn(1, H, T, D, device=dev, dtype=dtype, generator=g)
    kk = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype, generator=g)
    scale = D**-0.5

    @torch.no_grad()
    def sea():
        # autocast: the estimator's matmuls and convolutions in bf16 (how the default estimator was distilled on
        # the GPU); otherwise they run in fp32 (TF32 tensor cores)
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            return sea_attention(est, q, kk, v, scale)[0]

    @torch.no_grad()
    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if cuda else contextlib.nullcontext():
            return torch.nn.functional.scaled_dot_product_attention(q, kk, v, is_causal=causal, scale=scale,
                                                                    enable_gqa=H != Hkv)

    row = {"T": T, "k": k, "H": H, "Hkv": Hkv, "causal": causal, "dtype": str(dtype).replace("torch.", ""),
           "autocast": autocast}
    row["sea_ms"] = _time_ms(sea, cuda)
    row["sea_peak_mib"] = peak_mib(sea, cuda)
    row["flash_ms"] = _time_ms(flash, cuda)
    row["flash_peak_mib"] = peak_mib(flash, cuda)
    row["speedup"] = row["flash_ms"] / row["sea_ms"]
    replay = _graphed(sea) if cuda and not autocast else None
    row["sea_graph_ms"] = _time_ms(replay, cuda) if replay is not None else math.nan
    row["speedup_graph"] = row["flash_ms"] / row["sea_graph_ms"]
    del replay
    return row


def bench_performer(T: int, H: int, Hkv: int, causal: bool, D: int = 64, dtype=torch.float16,
                    dev: str = "cuda", smoke: bool = False) -> dict:
    """One row: the estimator's Performer step alone (SEA.md steps 1-2: features, linear attention, [ctx, q/|q|],
    in_norm; the encoder MLP's input), its Triton route (kernels/triton_performer.py) against its torch route, on
    the default geometry (m features, E = K eye columns). Each route is timed whatever `causal_fused` says.
    smoke: a CPU check of the program (interpreted kernels), 16 features and eye columns, one timed call."""
    from sea_edge.kernels import performer_kv_triton, performer_query_triton

    small = {"n_features": 16, "compressed_width": 16} if smoke else {}
    cfg = SEAConfig(k=64, **small).resolve(causal=causal, head_dim=D)
    est = SEAEstimator(cfg, D, H, max_positions=max(T, 8192)).to(dev)
    g = torch.Generator(device=dev).manual_seed(T)
    q = torch.randn(1, H, T, D, device=dev, dtype=dtype, generator=g)
    kk = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype, generator=g)
    n = est.in_norm

    @torch.no_grad()
    def torch_route():
        ctx, _ = est.performer(q, kk, v, None, None)
        return n(torch.cat([ctx, torch.nn.functional.normalize(q.float(), dim=-1)], dim=-1))

    @torch.no_grad()
    def triton_route():
        if causal:
            return est._performer_causal_triton(q, kk, v, None, None)[0]
        kv = performer_kv_triton(kk, v, est.proj, est.E, T, 0, None)
        return performer_query_triton(q, est.proj, kv, n.weight, n.bias, n.eps)

    cuda = dev == "cuda"
    reps = {"warmup": 0, "rep": 1} if smoke else {}
    row = {"what": "performer", "T": T, "H": H, "Hkv": Hkv, "causal": causal, "m": est.m, "E": est.E,
           "torch_ms": _time_ms(torch_route, cuda, **reps), "triton_ms": _time_ms(triton_route, cuda, **reps),
           "torch_peak_mib": peak_mib(torch_route, cuda), "triton_peak_mib": peak_mib(triton_route, cuda)}
    row["max_abs_diff"] = (triton_route() - torch_route()).abs().max().item()
    row["speedup"] = row["torch_ms"] / row["triton_ms"]
    return row


def profile_layer(T: int, k: int, H: int, Hkv: int, causal: bool, D: int = 64, dtype=torch.float16,
                  top: int = 25) -> str:
    """Where one SEA layer's GPU time goes: torch.profiler over a few calls, ops sorted by self CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    cfg = SEAConfig(k=k).resolve(causal=causal, head_dim=D)
    est = SEAEstimator(cfg, D, H, max_positions=max(T, 8192)).cuda()
    g = torch.Generator(device="cuda").manual_seed(T + k)
    q = torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=g)
    kk = torch.randn(1, Hkv, T, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, T, D, device="cuda", dtype=dtype, generator=g)
    with torch.no_grad():
        for _ in range(2):
            sea_attention(est, q, kk, v, D**-0.5)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                sea_attention(est, q, kk, v, D**-0.5)
            torch.cuda.synchronize()
    head = f"H{H}/{Hkv} {'causal' if causal else 'bidir'} k={k} T={T} (3 calls)"
    return head + "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)


def sweep_settings(out: Path) -> list[dict]:
    """GPU: the layer (T = 64k, 12/12 heads, k = 64) under launch settings of its Triton kernels (each module's _CFG:
    mask, plan, decoder, column scores, Performer) and cuDNN's TF32, plus the plan from columns alone at k = 2048;
    prints JSON lines, writes sweep.json."""
    import importlib

    from sea_edge.kernels.bench import bench_masks

    mods = [importlib.import_module(f"sea_edge.kernels.{m}") for m in
            ("mask", "triton_sparse_attention", "triton_decoder", "triton_column_scores", "triton_performer")]
    sa = mods[1]
    saved = [dict(m._CFG) for m in mods], torch.backends.cudnn.allow_tf32

    def apply(st: dict):
        for m, cfg in zip(mods, saved[0]):
            m._CFG.update(cfg)
            m._CFG.update({k: v for k, v in st.items() if k in m._CFG})
        torch.backends.cudnn.allow_tf32 = st.get("tf32_conv", saved[1])

    settings = [{}, {"select_warps": 2}, {"decoder_block": 2048}, {"decoder_warps": 8}, {"scores_block_m": 32},
                {"scores_warps": 2},
                {"scores_warps": 8}, {"scores_stages": 2}, {"scores_block_m": 128}, {"performer_block_t": 64},
                {"performer_block_f": 64}, {"performer_warps": 8}, {"kv_block_w": 64}, {"kv_block_w": 128},
                {"kv_keys": 1024}, {"kv_keys": 4096}, {"cols_sort_bidir": False, "cols_sort_causal": False},
                {"cols_fused_block_m": 32}]
    # the causal Performer in Triton (`causal_fused`, the default) under its own launch settings, and the torch path
    causal_only = [{"causal_fused": False}] + [{"causal_fused": True, **st} for st in (
        {"causal_warps": 4}, {"causal_chunk": 128, "causal_block_t": 32, "causal_warps": 4},
        {"causal_chunk": 128, "causal_block_t": 64}, {"causal_chunk": 128, "causal_block_t": 32},
        {"causal_chunk": 32, "causal_block_t": 32}, {"performer_block_f": 16},
        {"state_block_w": 32}, {"state_block_w": 128}, {"state_block_s": 64}, {"state_warps": 8})]
    rows = []
    for causal in (False, True):
        for st in settings + (causal_only if causal else []):
            apply(st)
            r = {"what": "layer", "T": 65536, "causal": causal, **st}
            try:
                r["sea_ms"] = bench_layer(65536, 64, 12, 12, causal)["sea_ms"]
            except Exception as e:  # a setting the GPU cannot launch (shared memory, registers): a row, not a crash
                r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(r)
            print(json.dumps(r), flush=True)
    apply({})
    for causal in (False, True):
        _, K, cols = bench_masks(1, 12, 65536, 65536, 2048, causal, "cuda")
        for w in (1, 2, 4):
            sa._CFG["cols_plan_warps"] = w
            r = {"what": "cols_plan", "T": 65536, "k": 2048, "causal": causal, "cols_plan_warps": w,
                 "ms": _time_ms(lambda: sa.sparse_attention_cols_plan(cols, K, 65536, causal), True)}  # noqa: B023
            rows.append(r)
            print(json.dumps(r), flush=True)
    apply({})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--k", type=int, nargs="+", default=[64])
    ap.add_argument("--heads", default="12/12,9/3", help="query/kv head pairs, comma separated")
    ap.add_argument("--out", type=Path, default=Path("bench-layer"))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run at tiny shapes (fp32): checks the program, "
                                                         "times nothing worth reporting")
    ap.add_argument("--profile", action="store_true", help="GPU: print where the layer's time goes (torch.profiler, "
                                                           "top ops by CUDA time) for each configuration, write "
                                                           "profile.txt, and time nothing else")
    ap.add_argument("--sweep", action="store_true", help="GPU: time launch settings (sweep_settings) and exit")
    ap.add_argument("--autocast", action="store_true", help="GPU: the estimator under bf16 autocast")
    ap.add_argument("--performer", action="store_true", help="time the estimator's Performer step alone, Triton "
                                                             "route vs torch route (bench_performer), and exit")
    args = ap.parse_args(argv)
    dev, dtype = ("cpu", torch.float32) if args.quick else ("cuda", torch.float16)
    if args.quick:
        args.T, args.k, args.heads = ([64] if args.performer else [128, 256]), [16], "4/2"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_layer needs a CUDA GPU (or --quick for a CPU smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    heads = [tuple(int(x) for x in p.split("/")) for p in args.heads.split(",")]
    if args.sweep:
        sweep_settings(args.out)
        return 0
    if args.performer:
        return _performer_table(heads, args.T, dev, dtype, args.out)
    if args.profile:
        if dev != "cuda":
            raise SystemExit("--profile needs a CUDA GPU")
        texts = [profile_layer(T, k, H, Hkv, causal) for H, Hkv in heads for causal in (False, True)
                 for k in args.k for T in args.T]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text("\n\n".join(texts) + "\n")
        print("\n\n".join(texts))
        return 0
    rows = []
    for H, Hkv in heads:
        for causal in (False, True):
            for k in args.k:
                for T in args.T:
                    rows.append(bench_layer(T, k, H, Hkv, causal, dtype=dtype, dev=dev,
                                            autocast=args.autocast and dev == "cuda"))
                    r = rows[-1]
                    print(f"H{H}/{Hkv} {'causal' if causal else 'bidir '} k={k:<5} T={T:<6} SEA {r['sea_ms']:8.2f} ms "
                          f"(graph {r['sea_graph_ms']:7.2f}) {r['sea_peak_mib']:8.0f} MiB | flash "
                          f"{r['flash_ms']:8.2f} ms {r['flash_peak_mib']:8.0f} MiB | speedup {r['speedup']:5.2f}x "
                          f"(graph {r['speedup_graph']:5.2f}x)", flush=True)
                    if dev == "cuda":
                        torch.cuda.empty_cache()
    meta = _write_rows(args.out / "bench_layer.json", rows, dev, dtype)
    _plot(rows, args.out / "bench_layer.png", meta)
    print(f"\n{meta}")
    print(f"{'heads':>6} {'mode':>6} {'k':>5} {'T':>6} {'SEA ms':>8} {'graph ms':>9} {'flash ms':>9} {'speedup':>8} "
          f"{'graph':>7} {'SEA MiB':>8} {'flash MiB':>9}")
    for r in rows:
        print(f"{r['H']}/{r['Hkv']:<3} {'causal' if r['causal'] else 'bidir':>6} {r['k']:>5} {r['T']:>6} "
              f"{r['sea_ms']:8.2f} {r['sea_graph_ms']:9.2f} {r['flash_ms']:9.2f} {r['speedup']:7.2f}x "
              f"{r['speedup_graph']:6.2f}x {r['sea_peak_mib']:8.0f} {r['flash_peak_mib']:9.0f}")
    return 0


def _write_rows(path: Path, rows: list[dict], dev: str, dtype) -> dict:
    """A table's rows as JSON at path, with the machine and versions it was measured with (returned)."""
    meta = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
            "torch": torch.__version__, "python": platform.python_version(), "dtype": str(dtype)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return meta


def _performer_table(heads, Ts, dev: str, dtype, out: Path) -> int:
    rows = []
    print(f"{'heads':>6} {'mode':>6} {'T':>6} {'m':>4} {'E':>4} {'torch ms':>9} {'triton ms':>10} {'speedup':>8} "
          f"{'torch MiB':>9} {'triton MiB':>10} {'max |diff|':>10}")
    for H, Hkv in heads:
        for causal in (False, True):
            for T in Ts:
                r = bench_performer(T, H, Hkv, causal, dtype=dtype, dev=dev, smoke=dev != "cuda")
                rows.append(r)
                print(f"{H}/{Hkv:<3} {'causal' if causal else 'bidir':>6} {T:>6} {r['m']:>4} {r['E']:>4} "
                      f"{r['torch_ms']:9.2f} {r['triton_ms']:10.2f} {r['speedup']:7.2f}x {r['torch_peak_mib']:9.0f} "
                      f"{r['triton_peak_mib']:10.0f} {r['max_abs_diff']:10.2e}", flush=True)
                if dev == "cuda":
                    torch.cuda.empty_cache()
    print(_write_rows(out / "performer.json", rows, dev, dtype))
    return 0


def _plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, label in (("ms", axes[0], "time (ms)"), ("peak_mib", axes[1], "peak memory (MiB)")):
        if not any(math.isfinite(r[f"sea_{key}"]) and r[f"sea_{key}"] > 0 for r in rows):
            ax.text(0.5, 0.5, f"no {label} measured on this device", ha="center", transform=ax.transAxes)
            continue
        groups = sorted({(r["H"], r["Hkv"], r["causal"], r["k"]) for r in rows})
        for gi, (H, Hkv, causal, k) in enumerate(groups):  # one colour per configuration
            sel = [r for r in rows if (r["H"], r["Hkv"], r["causal"], r["k"]) == (H, Hkv, causal, k)]
            name, c = f"H{H}/{Hkv} {'causal' if causal else 'bidir'}", f"C{gi}"
            ax.plot([r["T"] for r in sel], [r[f"sea_{key}"] for r in sel], "o-", color=c, label=f"SEA k={k} {name}")
            if key == "ms" and any(math.isfinite(r.get("sea_graph_ms", math.nan)) for r in sel):
                ax.plot([r["T"] for r in sel], [r["sea_graph_ms"] for r in sel], "s:", color=c,
                        label=f"SEA k={k} {name}, CUDA graph")
            ax.plot([r["T"] for r in sel], [r[f"flash_{key}"] for r in sel], "x--", color=c, alpha=0.6,
                    label=f"SDPA flash {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"SEA layer vs SDPA flash, B=1 D=64 {meta['dtype'].replace('torch.', '')}, {meta['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
