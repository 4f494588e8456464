"""Benchmark of the sparse attention step: our Triton op against torch SDPA (flash backend, dense), FlexAttention
with a block mask of equal keys per row, and the plain-torch reference.

    python -m sea_edge.kernels.bench --out runs/bench            # GPU: the issue's grid (B=1, fp16, D=64)
    python -m sea_edge.kernels.bench --quick --out runs/bench    # CPU smoke (tiny shapes; TRITON_INTERPRET=1)

Two forms of our op: `cols` is what a SEA layer runs on the GPU (sea_edge::sparse_attention_cols: the block plan
built from the kept compressed columns, then the forward kernel); `idx` is the generic op over per-row key lists
(sea_edge::sparse_attention: plan from idx, then the same kernel). `kern64` is the forward kernel alone on a prebuilt
plan, whose block mask is also built outside its timing, like Flex's. `same` is that kernel over Flex's own key
blocks (the best of 64- and 128-row tiles): the same keys, the same work, so `same/flex` compares the kernels alone,
while `kern/flex` also carries the extra blocks a SEA mask's tile computes (`work/k`).

Masks are built with the real mask references (select_columns_ref, expand_columns_ref) from smooth, local random
compressed probabilities. The compressed width is K = 256 (SEA.md, the paper's OPT setting) unless a column's span S/K would
exceed a quarter of the budget k; then K grows so that each head keeps k/span >= 4 whole columns (k = 64 at T = 64k
cannot be made of 256-key columns). Each head keeps exactly k keys per row (head_cap = n_cols / H), except
early causal rows that have fewer keys. Prints a table; writes bench.json and bench.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from .reference import expand_columns_ref, select_columns_ref, sparse_attention_ref

__all__ = ["bench_masks", "flex_blocks", "flex_blocks_plan", "main"]

# Per-row noise on the compressed logits. 0.5 (first H100 run) made neighbouring rows pick mostly different columns
# (64-row tiles computed 5.5x the kept scores at T = 64k, k = 2048), unlike SEA's CNN-smoothed estimate where
# neighbouring rows share most runs (SEA.md step 3); 0.1 keeps some row-to-row variation. The table's work/k column
# shows the sharing actually obtained.
NOISE = 0.1


def bench_masks(B, H, T, S, k, causal, device, seed=0, chunk=4096):
    """(idx (B, H, T, k), K, cols (B, H, T, c)) from smooth/local random compressed probabilities through the mask
    references (select_columns_ref, expand_columns_ref), built `chunk` query rows at a time (a causal chunk is the
    last rows of its own prefix S' = S - T + t1). cols is the mask as SEA's GPU path hands it to the kernel."""
    span = min(max(1, math.ceil(S / 256)), max(1, k // 4))
    K = max(256, math.ceil(S / span))
    cap = max(1, k // span)
    g = torch.Generator(device).manual_seed(seed)
    Tc = max(2, T // 256)
    coarse = torch.randn(B, H, Tc, max(2, K // 16), generator=g, device=device)
    coarse = torch.nn.functional.interpolate(coarse, size=(Tc, K), mode="bilinear", align_corners=False)
    out, out_cols = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        # smooth field over (rows, columns), linear in the row between coarse rows; a local bump on the row's
        # own column; noise
        r = ((torch.arange(t0, t1, device=device) + 0.5) * Tc / T - 0.5).clamp(0, Tc - 1)
        r0 = r.floor().long()
        a = (r - r0).view(-1, 1)
        f = coarse[:, :, r0] * (1 - a) + coarse[:, :, (r0 + 1).clamp(max=Tc - 1)] * a  # (B, H, t, K)
        pos = torch.arange(S - T + t0, S - T + t1, device=device).view(-1, 1)
        L = (pos + 1) if causal else torch.full_like(pos, S)
        own = (pos * K // L).clamp(max=K - 1)
        bump = torch.exp(-((torch.arange(K, device=device) - own).abs().float() / 3.0))
        logits = 2.0 * f + 3.0 * bump + NOISE * torch.randn(f.shape, generator=g, device=device)
        probs = logits.softmax(-1)
        Sc = S - T + t1 if causal else S
        # the chunk's rows are the last rows of the prefix Sc: same column spans as in the whole (T, S) problem
        cols = select_columns_ref(probs, H * cap, cap, Sc, causal)
        idx = expand_columns_ref(cols, K, Sc, causal)
        out.append(idx[..., :k] if idx.shape[-1] >= k else torch.nn.functional.pad(idx, (0, k - idx.shape[-1]),
                                                                                      value=-1))
        out_cols.append(cols)
        del f, probs
    return torch.cat(out, 2).contiguous(), K, torch.cat(out_cols, 2).contiguous()


def flex_blocks(B, H, T, S, k, causal, device, seed=0):
    """The key blocks of the Flex comparison, equal keys per row: k / KB random distinct key blocks of KB = min(128, k)
    keys per 128-query block; causal: among the blocks at or before the query block, and k (p + 1) / S keys at
    position p, like SEA's causal columns. Returns (num (B, H, nq) int32, order (B, H, nq, nk) int32: the first num
    of each row are the kept blocks, QB, KB)."""
    QB, KB = 128, min(128, k)
    nq, nk = math.ceil(T / QB), math.ceil(S / KB)
    per = max(1, k // KB)
    g = torch.Generator(device).manual_seed(seed)
    score = torch.rand(B, H, nq, nk, generator=g, device=device)
    if causal:
        last = (torch.arange(nq, device=device) * QB + S - T + QB - 1) // KB  # the block holding the last query
        score = score.masked_fill(torch.arange(nk, device=device) > last.view(-1, 1), 2.0)
    order = torch.sort(score, dim=-1).indices.to(torch.int32)
    allowed = (score < 2.0).sum(-1)
    if causal:  # SEA's causal row at position p keeps k (p + 1) / S keys (its columns span [0, p]): match that
        qend = torch.arange(nq, device=device) * QB + min(QB, T) + S - T
        want = torch.round(k * qend.float() / S / KB).clamp(min=1).long()
        num = torch.minimum(allowed, want.view(1, 1, -1)).to(torch.int32)
    else:
        num = allowed.clamp(max=per).to(torch.int32)
    return num, order.contiguous(), QB, KB


def flex_block_mask(num, order, QB, KB):
    """FlexAttention's BlockMask of `flex_blocks`' blocks (whole blocks, no mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask.from_kv_blocks(num, order, BLOCK_SIZE=(QB, KB))


def flex_blocks_plan(num, order, QB, KB, T, S, block_m=64):
    """Our forward's plan (SparsePlan) over exactly the keys of `flex_blocks`: every row of a tile keeps all keys of
    its query block's key blocks, in 64-key blocks (`sparse_attention_plan` of the expanded keys gives the same).
    Our kernel on it against Flex is the comparison at the same mask, same work."""
    from .triton_sparse_attention import BLOCK_N, SparsePlan

    if QB % block_m or KB % BLOCK_N:
        raise ValueError(f"query blocks of {QB} need tiles dividing them ({block_m}); key blocks of {KB}, a multiple "
                         f"of {BLOCK_N}")
    B, H, _, nk = order.shape
    n_tiles, sub = math.ceil(T / block_m), KB // BLOCK_N
    qb = torch.arange(n_tiles, device=order.device) * block_m // QB  # each tile's query block
    kb = order[:, :, qb].reshape(B * H, n_tiles, nk).long()
    blk = (kb[..., :, None] * sub + torch.arange(sub, device=order.device)).flatten(-2)  # (BH, tiles, nk * sub)
    kept = torch.arange(nk * sub, device=order.device) < num[:, :, qb].reshape(B * H, n_tiles, 1) * sub
    kept &= blk * BLOCK_N < S  # a 64-key block past S (in a key block cut by S) holds no key
    n = kept.sum(-1)  # 64-key blocks per tile
    cap = max(1, int(n.max()))
    blk = torch.sort(torch.where(kept, blk, 1 << 40), dim=-1).values[..., :cap]  # ascending, the unused slots last
    live = torch.arange(cap, device=order.device) < n[..., None]
    blk = torch.where(live, blk, 0)
    keys = (S - blk * BLOCK_N).clamp(0, BLOCK_N)  # keys of the block below S
    bits = torch.where(keys >= BLOCK_N, -1, (1 << keys.clamp(max=BLOCK_N - 1)) - 1)  # (BH, tiles, cap) int64
    rows = torch.arange(n_tiles * block_m, device=order.device).view(n_tiles, block_m) < T
    bits = torch.where(live[..., None] & rows[:, None, :], bits[..., None], 0)  # (BH, tiles, cap, block_m)
    return SparsePlan(blk.to(torch.int32).contiguous(), bits.contiguous(), n.to(torch.int32).contiguous(), block_m,
                      cap)


def _time_ms(fn, cuda):
    if cuda:
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def peak_mib(fn, cuda=True):
    """Peak CUDA memory (MiB) that `fn` allocates beyond what was held before it (NaN off the GPU)."""
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_config(B, Hq, Hkv, T, k, causal, D, dtype, device, args, flex_fn, cache):
    from .triton_sparse_attention import (
        sparse_attention_cols_plan,
        sparse_attention_cols_triton,
        sparse_attention_plan,
        sparse_attention_triton,
    )

    cuda = device == "cuda"
    S = T
    g = torch.Generator(device).manual_seed(T + k)
    q = torch.randn(B, Hq, T, D, generator=g, device=device).to(dtype)
    kk = torch.randn(B, Hkv, S, D, generator=g, device=device).to(dtype)
    vv = torch.randn(B, Hkv, S, D, generator=g, device=device).to(dtype)
    idx, K, cols = bench_masks(B, Hq, T, S, k, causal, device)
    scale = 1.0 / math.sqrt(D)
    n_keys = int((idx >= 0).sum())
    flops = 4.0 * n_keys * D  # QK^T and PV, 2 flops per multiply-add
    nbytes = (2 * q.numel() + 2 * kk.numel()) * q.element_size() + idx.numel() * 4
    row = dict(B=B, Hq=Hq, Hkv=Hkv, T=T, S=S, k=k, K=K, causal=causal, D=D, dtype=str(dtype).split(".")[-1],
               keys_per_row=n_keys / (B * Hq * T))

    if cuda:
        from .op import sparse_attention as op
    else:
        def op(q_, k_, v_, i_, s_):
            return sparse_attention_triton(q_, k_, v_, i_, s_)

    ours = lambda: op(q, kk, vv, idx, scale)
    row["ours_ms"] = _time_ms(ours, cuda)
    row["ours_tflops"] = flops / row["ours_ms"] / 1e9
    row["ours_gbs"] = nbytes / row["ours_ms"] / 1e6
    row["ours_peak_mib"] = peak_mib(ours, cuda)
    # SEA's GPU path: the op planned from the kept columns (no idx)
    if cuda:
        from .op import sparse_attention_cols as cols_op
    else:
        def cols_op(q_, k_, v_, c_, kv_, K_, causal_, s_):
            return sparse_attention_cols_triton(q_, k_, v_, c_, K_, causal_, s_, kv_)
    row["cols_ms"] = _time_ms(lambda: cols_op(q, kk, vv, cols, None, K, causal, scale), cuda)
    row["cols_tflops"] = flops / row["cols_ms"] / 1e9
    row["cols_gbs"] = ((2 * q.numel() + 2 * kk.numel()) * q.element_size() + cols.numel() * 4) / row["cols_ms"] / 1e6
    row["cols_peak_mib"] = peak_mib(lambda: cols_op(q, kk, vv, cols, None, K, causal, scale), cuda)
    row["colsplan_ms"] = _time_ms(lambda: sparse_attention_cols_plan(cols, K, S, causal), cuda)
    for bm in (64, 128):
        plan = sparse_attention_plan(idx, S, block_m=bm)
        row[f"plan{bm}_ms"] = _time_ms(lambda: sparse_attention_plan(idx, S, block_m=bm), cuda)  # noqa: B023
        row[f"kernel{bm}_ms"] = _time_ms(lambda: sparse_attention_triton(q, kk, vv, idx, scale, plan=plan), cuda)  # noqa: B023
        row[f"work{bm}_over_k"] = plan.blocks * 64 * bm / (B * Hq * T) / k  # scores computed / scores kept

    # dense SDPA, flash backend (independent of k: measured once per shape)
    key = ("sdpa", B, Hq, Hkv, T, causal)
    if key not in cache:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ke, ve = (x.repeat_interleave(Hq // Hkv, 1) for x in (kk, vv))
            backend = SDPBackend.FLASH_ATTENTION if cuda else SDPBackend.MATH
            f = lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=causal)
            with sdpa_kernel(backend):
                cache[key] = _time_ms(f, cuda) if (cuda or T <= 1024) else float("nan")
            del ke, ve
        except Exception as e:  # noqa: BLE001
            cache[key] = float("nan")
            row["sdpa_error"] = repr(e)[:200]
    row["sdpa_flash_ms"] = cache[key]

    row["flex_ms"] = float("nan")
    blocks = None
    if flex_fn is not None:
        for kf in dict.fromkeys((k, max(k, 128))):  # k < 128: 64-key blocks if Flex takes them, else 128 keys
            try:
                blocks = flex_blocks(B, Hq, T, S, kf, causal, device)
                bm_ = flex_block_mask(*blocks)
                f = lambda: flex_fn(q, kk, vv, block_mask=bm_, scale=scale, enable_gqa=Hq != Hkv)  # noqa: B023
                row["flex_ms"] = _time_ms(f, cuda)
                row["flex_keys_per_row"] = kf
                break
            except Exception as e:  # noqa: BLE001
                row["flex_error"] = repr(e)[:300]
                blocks = None
    if blocks is not None:  # our forward kernel over Flex's own key blocks: same mask, same work
        for bm in (64, 128):
            fplan = flex_blocks_plan(*blocks, T, S, block_m=bm)
            row[f"same{bm}_ms"] = _time_ms(lambda: sparse_attention_triton(q, kk, vv, idx, scale, plan=fplan), cuda)  # noqa: B023
        row["same_ms"] = min(row["same64_ms"], row["same128_ms"])
        del fplan, blocks
    for name in ("ours", "cols", "kernel64", "same"):
        row[f"{name}_over_flex"] = row.get(f"{name}_ms", float("nan")) / row["flex_ms"]  # NaN without Flex

    # the torch reference: only where its gathered (chunk x w x D) fp32 blocks stay small and time stays sane
    if T * k <= args.ref_max:
        row["ref_ms"] = _time_ms(lambda: sparse_attention_ref(q, kk, vv, idx, scale), cuda)
    else:
        row["ref_ms"] = float("nan")
        row["ref_skipped"] = f"T*k = {T * k} > {args.ref_max}"
    return row


COLS = [("Hq", "H"), ("Hkv", "Hkv"), ("T", "T"), ("k", "k"), ("causal", "causal"), ("cols_ms", "cols ms"),
        ("cols_tflops", "TFLOP/s"), ("cols_gbs", "GB/s"), ("cols_peak_mib", "peak MiB"), ("colsplan_ms", "cplan"),
        ("ours_ms", "idx ms"), ("plan64_ms", "iplan"), ("kernel64_ms", "kern64"), ("kernel128_ms", "kern128"),
        ("work64_over_k", "work/k"), ("sdpa_flash_ms", "sdpa ms"), ("flex_ms", "flex ms"),
        ("cols_over_flex", "cols/flex"), ("kernel64_over_flex", "kern/flex"), ("same_ms", "same ms"),
        ("same_over_flex", "same/flex"), ("ref_ms", "ref ms")]


def format_table(rows):
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return "-" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
        return str(v)

    table = [[h for _, h in COLS]] + [[cell(r.get(c, float("nan"))) for c, _ in COLS] for r in rows]
    widths = [max(len(x[i]) for x in table) for i in range(len(COLS))]
    lines = [" | ".join(x[i].rjust(widths[i]) for i in range(len(COLS))) for x in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(2, len(ks), figsize=(5 * len(ks), 8), squeeze=False)
    for i, causal in enumerate((False, True)):
        for j, kk in enumerate(ks):
            ax = axes[i][j]
            for (hq, hkv), ls in (((12, 12), "-"), ((9, 3), "--"), ((2, 2), "-"), ((4, 2), "--")):
                sel = sorted([r for r in rows if r["k"] == kk and r["causal"] == causal and r["Hq"] == hq
                              and r["Hkv"] == hkv], key=lambda r: r["T"])
                if not sel:
                    continue
                Ts = [r["T"] for r in sel]
                for key, name in (("cols_ms", "ours (cols)"), ("ours_ms", "ours (idx)"), ("flex_ms", "flex"),
                                  ("sdpa_flash_ms", "sdpa flash")):
                    ax.plot(Ts, [r[key] for r in sel], ls, marker="o", label=f"{name} {hq}/{hkv}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"k={kk} {'causal' if causal else 'bidirectional'}")
            ax.set_xlabel("T")
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(device, out):
    """Launch settings of the plan and forward kernels at a few shapes (12/12 heads, D = 64, fp16): plan64 and
    kernel64 ms per setting; prints a table and writes sweep.json."""
    import importlib

    sa = importlib.import_module(__package__ + ".triton_sparse_attention")

    default = dict(sa._CFG)
    shapes = [(65536, 64, False), (65536, 2048, False)]
    settings = [{}, {"fwd_stages": 2}, {"fwd_stages": 4}, {"fwd_warps": 8}, {"plan_ch": 128}, {"plan_flags": True},
                {"plan_flags": True, "plan_ch": 128}]
    rows = []
    for T, k, causal in shapes:
        g = torch.Generator(device).manual_seed(T + k)
        q = torch.randn(1, 12, T, 64, generator=g, device=device).half()
        kk = torch.randn(1, 12, T, 64, generator=g, device=device).half()
        vv = torch.randn(1, 12, T, 64, generator=g, device=device).half()
        idx, _, _ = bench_masks(1, 12, T, T, k, causal, device)
        for st in settings:
            sa._CFG.update(default)
            sa._CFG.update(st)
            plan = sa.sparse_attention_plan(idx, T)
            r = dict(T=T, k=k, causal=causal, **st)
            r["plan_ms"] = _time_ms(lambda: sa.sparse_attention_plan(idx, T), True)  # noqa: B023
            r["kernel_ms"] = _time_ms(lambda: sa.sparse_attention_triton(q, kk, vv, idx, 0.125, plan=plan), True)  # noqa: B023
            rows.append(r)
            print(json.dumps(r), flush=True)
    sa._CFG.update(default)
    (Path(out) / "sweep.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.png")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke; runs under TRITON_INTERPRET=1)")
    ap.add_argument("--T", type=int, nargs="*", default=None)
    ap.add_argument("--k", type=int, nargs="*", default=None)
    ap.add_argument("--heads", default=None, help="comma list of Hq/Hkv, e.g. 12/12,9/3")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="GPU: time launch settings of plan and kernel, then exit")
    ap.add_argument("--ref-max", type=int, default=4096 * 2048, help="largest T*k at which the reference runs")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    device = "cuda" if cuda else "cpu"
    if args.quick:
        Ts, ks, heads, D = args.T or [64, 128], args.k or [16, 32], [(2, 2), (4, 2)], 32
    else:
        Ts, ks, heads, D = args.T or [4096, 16384, 65536], args.k or [64, 512, 2048], [(12, 12), (9, 3)], 64
    if args.heads:
        heads = [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")]
    dtype = torch.float16 if cuda else torch.float32
    machine = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}"
    info = dict(machine=machine, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                dtype=str(dtype), D=D, B=1, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"machine: {machine} | torch {torch.__version__} | triton {triton.__version__} | {dtype} D={D} B=1")

    flex_fn = None
    if cuda and not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex_fn = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"flex attention unavailable: {e!r}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        return sweep(device, out)
    rows, cache = [], {}
    for hq, hkv in heads:
        for T in Ts:
            for k in ks:
                for causal in (False, True):
                    try:
                        r = run_config(1, hq, hkv, T, k, causal, D, dtype, device, args, flex_fn, cache)
                    except torch.cuda.OutOfMemoryError as e:
                        r = dict(Hq=hq, Hkv=hkv, T=T, k=k, causal=causal, error=f"OOM {e!r}"[:200])
                        torch.cuda.empty_cache()
                    rows.append(r)
                    if cuda:
                        torch.cuda.empty_cache()  # the config's tensors died with run_config
                    print(json.dumps(r), flush=True)
                    tmp = out / "bench.json.tmp"
                    tmp.write_text(json.dumps(dict(info=info, rows=rows), indent=1))
                    tmp.replace(out / "bench.json")
    table = format_table(rows)
    print(table)
    (out / "bench.txt").write_text(table + "\n")
    try:
        plot(rows, out / "bench.png")
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e!r}")
    return rows


if __name__ == "__main__":
    main()
