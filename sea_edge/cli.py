"""The `sea-edge` command line. Each command parses its options, builds a config, calls one library function and
prints the result; torch and transformers are imported inside the commands so `sea-edge --help` stays fast.

User mistakes (SeaEdgeError) become one red line on stderr and exit code 1; typer's own option errors exit 2.
"""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from sea_edge import __version__
from sea_edge.errors import SeaEdgeError

__all__ = ["app"]

app = typer.Typer(
    name="sea-edge",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a bug should show a plain traceback, a user mistake never reaches here
    help="SEA attention (sparse linear attention with an estimated mask) for small devices.",
)

_stdout = Console()
_stderr = Console(stderr=True)


def user_errors(command):
    """Turn a SeaEdgeError raised by `command` into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SeaEdgeError as exc:
            # soft_wrap: a long message stays one line instead of being wrapped to the terminal width
            _stderr.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        _stdout.print(f"sea-edge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """SEA attention (sparse linear attention with an estimated mask) for small devices."""


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Split(str, Enum):
    train = "train"
    validation = "validation"


@app.command("eval")
@user_errors
def eval_(
    folder: Annotated[Optional[Path], typer.Argument(help="An exported folder (sea-edge export): evaluate it with "
                                                          "the onnxruntime runtime instead of a torch model.")] = None,
    text: Annotated[Optional[Path], typer.Option(help="With a folder: a UTF-8 text file to score (default: the "
                                                      "validation split).")] = None,
    model: Annotated[
        str, typer.Option(help="Teacher name (smollm2-135m, minilm-l6) or a local Hugging Face model directory.")
    ] = "smollm2-135m",
    seq_len: Annotated[int, typer.Option(help="Tokens per window; each window is scored on its own.")] = 2048,
    max_windows: Annotated[
        int | None, typer.Option(help="Score only the first N windows of the split (default: all).")
    ] = None,
    split: Annotated[Split, typer.Option(help="Corpus split (Shakespeare's plays, split by play).")] = Split.validation,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    estimator: Annotated[
        Optional[str], typer.Option(help="SEA estimator folder (from `sea-edge distill`), or 'default' for the "
                                         "embedded one: evaluate SEA, not dense.")
    ] = None,
    k: Annotated[Optional[int], typer.Option(help="SEA budget: keys per query (default: the estimator's).")] = None,
    quality: Annotated[
        bool, typer.Option(help="With --estimator: the full report (per-layer KL and mass recall, perplexity of "
                                "SEA vs teacher over T in --seq-lens and k in --ks), table + JSON + PNG.")
    ] = False,
    seq_lens: Annotated[str, typer.Option(help="--quality: context lengths, comma separated.")] = "1024,2048,4096",
    ks: Annotated[str, typer.Option(help="--quality: budgets, comma separated.")] = "32,64,128,256",
    report_dir: Annotated[Optional[Path], typer.Option(help="--quality: where to write quality.json/.png.")] = None,
    device: Annotated[Device, typer.Option(help="Where the model runs.")] = Device.cpu,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Perplexity of a model (dense teacher, or SEA with --estimator; or an exported folder through the runtime) on
    the corpus or a text file, with tokens/s and peak memory."""
    if folder is not None:
        _eval_folder(folder, text, seq_len, max_windows, batch_size, device.value)
        return
    if text is not None:
        raise SeaEdgeError("--text needs an exported folder (sea-edge eval DIR --text FILE)")
    from sea_edge.evaluation import EvalConfig, evaluate

    if quality:
        _quality(model, estimator, seq_lens, ks, max_windows, device.value, report_dir, progress)
        return
    config = EvalConfig(model=model, split=split.value, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                        estimator=estimator, k=k, device=device.value)
    report = evaluate(config, progress=progress)
    _stdout.print(_eval_table(report))


def _eval_folder(folder: Path, text_file: Path | None, seq_len: int, max_windows, batch_size: int, device: str):
    from rich.table import Table

    from sea_edge.runtime import SeaSession

    if text_file is not None:
        if not text_file.is_file():
            raise SeaEdgeError(f"--text {text_file}: no such file")
        try:
            body, what = text_file.read_text(encoding="utf-8"), str(text_file)
        except UnicodeDecodeError:
            raise SeaEdgeError(f"--text {text_file} is not UTF-8 text") from None
    else:
        from sea_edge.data import load_corpus

        body, what = load_corpus("validation"), "validation split"
    sess = SeaSession(folder, device=device)
    r = sess.perplexity(body, seq_len, max_windows=max_windows, batch_size=batch_size)
    table = Table(title=f"{folder} ({sess.attention}) on {what}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in (("perplexity", f"{r.ppl:.3f}"), ("NLL (nats/token)", f"{r.nll:.4f}"),
                        ("seq len", str(r.seq_len)), ("windows", str(r.windows)), ("tokens scored", f"{r.tokens:,}"),
                        ("tokens/s", f"{r.tokens_per_s:,.1f}"), ("eval time (s)", f"{r.seconds:.1f}"),
                        ("peak RSS (MiB)", f"{r.peak_rss_mib:,.0f}")):
        table.add_row(name, value)
    _stdout.print(table, highlight=False)


@app.command("run")
@user_errors
def run_(
    folder: Annotated[Path, typer.Argument(help="An exported folder (sea-edge export).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    device: Annotated[Device, typer.Option(help="cpu, or cuda (onnxruntime-gpu segments, Triton attention).")] = (
        Device.cpu),
) -> None:
    """Generate text from an exported model with the onnxruntime runtime, streaming tokens as they come."""
    from sea_edge.runtime import SeaSession

    if max_new_tokens < 1:
        raise SeaEdgeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sess = SeaSession(folder, device=device.value)
    _stdout.print(prompt, end="", highlight=False, markup=False)
    r = sess.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, stream=lambda piece: _stdout.print(piece, end="", highlight=False, markup=False))
    _stdout.print()
    _stderr.print(f"[dim]{r.prompt_tokens} prompt tokens, {len(r.tokens)} new ({r.finish_reason}); prefill "
                  f"{r.prefill_seconds:.2f} s, decode {r.decode_tokens_per_s:.1f} tokens/s[/]", highlight=False)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SeaEdgeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SeaEdgeError(f"{what} must be positive integers, got {text!r}")
    return values


def _quality(model, estimator, seq_lens, ks, max_windows, device, report_dir, progress):
    from sea_edge.artifacts import atomic_write_json
    from sea_edge.evaluation import _device
    from sea_edge.quality import QualityConfig, estimator_quality, plot_quality, quality_table
    from sea_edge.teacher import load_teacher

    if estimator is None:
        raise SeaEdgeError("--quality needs --estimator")
    cfg = QualityConfig(seq_lens=_ints(seq_lens, "--seq-lens"), ks=_ints(ks, "--ks"), max_windows=max_windows,
                        device=str(_device(device)))
    from sea_edge.estimator_io import resolve_estimator

    estimator = resolve_estimator(model, estimator)
    teacher, tok = load_teacher(model)
    report = estimator_quality(teacher, tok, estimator, cfg, progress=progress)
    _stdout.print(quality_table(report), highlight=False)
    out = report_dir or Path(estimator)
    atomic_write_json(out / "quality.json", report)
    plot_quality(report, out / "quality.png")
    _stdout.print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}", highlight=False)


@app.command("distill")
@user_errors
def distill_(
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, then the estimator (estimator.safetensors).")],
    model: Annotated[str, typer.Option(help="Teacher name or local Hugging Face model directory.")] = "smollm2-135m",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 600,
    seq_len: Annotated[int, typer.Option(help="Training window (tokens).")] = 1024,
    k: Annotated[int, typer.Option(help="SEA budget: keys per query.")] = 64,
    batch: Annotated[int, typer.Option(help="Windows per step.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (warm-up then cosine).")] = 2e-3,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 50,
    device: Annotated[Device, typer.Option(help="Where to train (cuda uses bf16 autocast).")] = Device.cpu,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
    max_windows: Annotated[Optional[int], typer.Option(help="Use only the first N training windows.")] = None,
    init: Annotated[
        Optional[Path], typer.Option(help="Start from this estimator folder (fine-tune / continue) instead of fresh.")
    ] = None,
    key_scores: Annotated[
        Optional[bool], typer.Option(help="Add the content term (q against each column's mean key) to the estimate; "
                                          "default: on for fresh weights, as stored for --init.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Distill SEA's attention estimator from the teacher's own attention (resumable)."""
    from sea_edge.distill import DistillConfig, distill

    cfg = DistillConfig(steps=steps, seq_len=seq_len, batch=batch, lr=lr, checkpoint_every=checkpoint_every,
                        device=device.value, max_windows=max_windows,
                        sea={"k": k, **({} if key_scores is None else {"key_scores": key_scores})},
                        init=None if init is None else str(init))
    r = distill(model, out, cfg, resume=resume, progress=progress)
    last = r.history[-1] if r.history else {}
    _stdout.print(f"distilled {r.steps} steps ({r.tokens:,} tokens this run, {r.seconds:.0f} s); "
                  f"final loss {last.get('loss', float('nan')):.4f}; estimator in {r.out}", highlight=False)


class Quant(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"
    nf4 = "nf4"


@app.command("export")
@user_errors
def export_(
    out: Annotated[Path, typer.Option(help="Output folder: model.onnx (+ decode.onnx), weights, sea_edge.json, "
                                           "tokenizer.")],
    model: Annotated[str, typer.Option(help="Teacher name or local Hugging Face model directory.")] = "smollm2-135m",
    estimator: Annotated[str, typer.Option(help="Estimator folder, or 'default' (embedded in the package).")]
    = "default",
    quant: Annotated[Quant, typer.Option(help="Weight quantization of the exported model.")] = Quant.none,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 runs on onnxruntime >= 1.16).")] = 18,
    force: Annotated[bool, typer.Option(help="Replace an existing non-empty --out.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Print the memory-budget verdict for this device profile "
                                                       "at the end (sea-edge budget --list-devices).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """The main job: teacher + SEA estimator -> one ONNX model (attention = sea_edge::SparseAttention), validated
    against torch, with its manifest and tokenizer."""
    from sea_edge.export.exporter import ExportConfig, export

    if device is not None:
        from sea_edge.runtime.budget import get_device

        get_device(device)  # an unknown device fails before the export, not after
    r = export(ExportConfig(out=out, model=model, estimator=estimator, quant=quant.value, opset=opset, force=force),
               progress=progress)
    _stdout.print(_export_table(r), highlight=False)
    if device is not None:
        from sea_edge.runtime.budget import budget_report, render_table

        _stdout.print(render_table(budget_report(out, device)), highlight=False)


def _export_table(r):
    from rich.table import Table

    m, v = r.manifest, r.validation
    table = Table(title=f"exported {m['source_model']['name']} with SEA (k={m['sea_config']['k']}) to {r.out}",
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    size = sum(f["bytes"] for f in m["files"].values())
    rows = [
        ("files", f"{len(m['files'])}, {size / 2**20:,.1f} MiB"),
        ("export time (s)", f"{r.seconds:.0f}"),
        ("validation text", v["text"]),
    ]
    if "encoder" in m["graphs"]:
        rows += [("hidden states: tokens with cosine >= 0.99", f"{v['agreement']:.2%}"),
                 ("relative error / max |diff|", f"{v['rel_err']:.2e} / {v['max_abs_diff']:.2e}")]
        for name, value in rows:
            table.add_row(name, value)
        return table
    pre, dec, opt = v["prefill"], v["decode"], v["prefill_ort_optimized"]
    rows = [
        ("files", f"{len(m['files'])}, {size / 2**20:,.1f} MiB"),
        ("quantization", m["quantization"]["scheme"]),
        ("opset", str(m["opset"])),
        ("export time (s)", f"{r.seconds:.0f}"),
        ("validation text", v["text"]),
        ("prefill: top-1 agreement ORT vs torch", f"{pre['top1_agreement']:.2%}"),
        ("prefill: max |logit diff|", f"{pre['max_abs_logit_diff']:.2e}"),
        (f"decode ({dec['steps']} steps after {dec['prefix']}): top-1 agreement", f"{dec['top1_agreement']:.2%}"),
        ("decode: max |logit diff|", f"{dec['max_abs_logit_diff']:.2e}"),
        ("ORT optimized prefill: agreement / max diff",
         f"{opt['top1_agreement']:.2%} / {opt['max_abs_logit_diff']:.2e}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


class Scheme(str, Enum):
    int8 = "int8"
    int4 = "int4"
    nf4 = "nf4"
    dynamic_int8 = "dynamic-int8"


@app.command("quantize")
@user_errors
def quantize_cmd(
    src: Annotated[Path, typer.Argument(help="An fp32 folder written by `sea-edge export`.")],
    out: Annotated[Path, typer.Option(help="Output folder (same layout, quantized weights, quantize_report.json).")],
    scheme: Annotated[Scheme, typer.Option(help="int8 / int4 / nf4: weight-only blockwise (bitsandbytes codes); "
                                                "dynamic-int8: optimum ORTQuantizer with the target CPU's preset.")]
    = Scheme.int8,
    target: Annotated[Optional[str], typer.Option(help="Device profile (sea-edge budget --list-devices): picks the "
                                                       "dynamic-int8 preset (arm64 / avx2 / avx512_vnni).")] = None,
    report_tokens: Annotated[int, typer.Option(
        min=16, max=8192, help="Tokens per validation window of the report (2 windows; perplexity, agreement, "
                               "latency).")]
    = 256,
    accuracy_level: Annotated[int, typer.Option(help="onnxruntime MatMulNBits accuracy level of int8 / int4: 1 = fp32 "
                                                     "activations (best perplexity), 4 = int8 activations (fastest "
                                                     "CPU decode).")] = 1,
    force: Annotated[bool, typer.Option(help="Replace an existing non-empty --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Quantize an exported SEA model (estimator, decoder and the teacher's Linear layers), with a report: size,
    per-module SQNR, mask agreement, perplexity delta, CPU prefill latency."""
    from sea_edge.export.requantize import quantize_folder

    if not src.is_dir():
        raise SeaEdgeError(f"{src} is not a folder")
    report = quantize_folder(src, out, scheme.value, target=target, force=force, progress=progress,
                             report_tokens=report_tokens, accuracy_level=accuracy_level)
    _stdout.print(_quant_table([report]), highlight=False)
    _stdout.print(f"wrote {out} (report: {out / 'quantize_report.json'})", highlight=False)


def _quant_table(reports):
    from rich.table import Table

    table = Table(title="quantization vs the fp32 export (validation text, CPU)", title_justify="left")
    for col in ("scheme", "size", "x fp32", "ppl fp32", "ppl quant", "delta", "top-1 agree", "mask agree",
                "prefill s fp32/quant", "min SQNR dB (module)"):
        table.add_column(col, justify="right")
    for r in reports:
        p, t = r["perplexity"], r["prefill_seconds"]
        sq = r.get("sqnr_db")
        finite = {k: v for k, v in (sq or {}).items() if v["min"] is not None}  # None: exact (infinite SQNR)
        worst = min(finite.items(), key=lambda kv: kv[1]["min"]) if finite else None
        table.add_row(r["scheme"], f"{r['size_bytes']['quantized'] / 2**20:,.0f} MiB", f"{r['size_ratio']:.2f}",
                      f"{p['fp32']:.2f}", f"{p['quantized']:.2f}", f"{p['delta']:+.1%}", f"{r['top1_agreement']:.1%}",
                      f"{r['mask_agreement']:.3f}", f"{t['fp32']:.2f} / {t['quantized']:.2f}",
                      f"{worst[1]['min']:.1f} ({worst[0]})" if worst else "exact" if sq else "-")
    return table


@app.command("budget")
@user_errors
def budget_cmd(
    folder: Annotated[Optional[Path], typer.Argument(help="A folder written by `sea-edge export`.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Device profile (see --list-devices).")] = None,
    context: Annotated[Optional[int], typer.Option(help="Context length T to check (default: the model's "
                                                        "maximum).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    measure: Annotated[bool, typer.Option(help="Also run the model at T in a fresh process and report its measured "
                                               "peak RSS beside the analytic figure.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of memory vs context (SEA and dense, the "
                                                      "device's limit).")] = None,
    profiles: Annotated[Optional[Path], typer.Option(help="Extra device profiles (JSON, same schema).")] = None,
    mode: Annotated[str, typer.Option(help="generate: the prefill of a generation (last position's logits only); "
                                           "score: every position's logits (perplexity).")] = "generate",
    list_devices: Annotated[bool, typer.Option("--list-devices", help="List the device profiles and exit.")] = False,
) -> None:
    """Does the exported model fit a device at this context length, and what is the longest context that fits
    (SEA vs dense)? Analytic per-component peak memory, optionally measured."""
    from sea_edge.runtime.budget import budget_report, list_devices_table, plot_budget, render_table

    if list_devices:
        _stdout.print(list_devices_table(profiles), highlight=False)
        return
    if folder is None or device is None:
        raise SeaEdgeError("budget needs an export folder and --device (or --list-devices)")
    report = budget_report(folder, device, context=context, batch=batch, measure=measure, profiles_file=profiles,
                           mode=mode)
    _stdout.print(render_table(report), highlight=False)
    if json_out is not None:
        from sea_edge.artifacts import atomic_write_json

        atomic_write_json(json_out, report)
        _stdout.print(f"wrote {json_out}", highlight=False)
    if plot is not None:
        _stdout.print(f"wrote {plot_budget(report, plot)}", highlight=False)


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def bench_(
    ctx: typer.Context,
    layer: Annotated[bool, typer.Option(help="Benchmark the whole SEA layer instead of the sparse-attention op.")]
    = False,
) -> None:
    """GPU benchmarks (tables + JSON + PNG): the sparse-attention op vs SDPA flash / FlexAttention, or with
    --layer the whole SEA layer vs SDPA flash. Other options pass through (--out, --T, --k, ...; --help there)."""
    if layer:
        from sea_edge.bench_layer import main
    else:
        from sea_edge.kernels.bench import main
    main(list(ctx.args))


def _eval_table(report):
    from rich.table import Table

    r, t = report.result, report.teacher
    kind = "causal" if t.causal else "bidirectional"
    attn = "dense" if report.config.estimator is None else f"SEA ({report.config.estimator}"
    if report.config.estimator is not None:
        attn += ")" if report.config.k is None else f", k={report.config.k})"
    table = Table(title=f"{t.name} on {report.config.split}, {attn} attention", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("perplexity", f"{r.ppl:.3f}"),
        ("NLL (nats/token)", f"{r.nll:.4f}"),
        ("seq len", str(r.seq_len)),
        ("windows", str(r.windows)),
        ("tokens scored", f"{r.tokens:,}"),
        ("tokens/s", f"{r.tokens_per_s:,.1f}"),
        ("eval time (s)", f"{r.seconds:.1f}"),
        ("load time (s)", f"{report.load_seconds:.1f}"),
        ("peak RSS (MiB)", f"{r.peak_rss_mib:,.0f}"),
        ("model", f"{kind}, {t.n_layers} layers, {t.n_heads}/{t.n_kv_heads} heads x {t.head_dim}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


if __name__ == "__main__":
    app()
