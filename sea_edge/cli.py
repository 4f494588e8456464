"""The `sea-edge` command line. Each command parses its options, builds a config, calls one library function and
prints the result; torch and transformers are imported inside the commands so `sea-edge --help` stays fast.

User mistakes (SeaEdgeError) become one red line on stderr and exit code 1; typer's own option errors exit 2.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import Annotated

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


class Split(str, Enum):
    train = "train"
    validation = "validation"


@app.command("eval")
@user_errors
def eval_(
    model: Annotated[
        str, typer.Option(help="Teacher name (smollm2-135m, minilm-l6) or a local Hugging Face model directory.")
    ] = "smollm2-135m",
    seq_len: Annotated[int, typer.Option(help="Tokens per window; each window is scored on its own.")] = 2048,
    max_windows: Annotated[
        int | None, typer.Option(help="Score only the first N windows of the split (default: all).")
    ] = None,
    split: Annotated[Split, typer.Option(help="Corpus split (Shakespeare's plays, split by play).")] = Split.validation,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Perplexity of a model on the corpus, with tokens/s and peak memory."""
    from sea_edge.evaluation import EvalConfig, evaluate

    config = EvalConfig(model=model, split=split.value, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
    report = evaluate(config, progress=progress)
    _stdout.print(_eval_table(report))


def _eval_table(report):
    from rich.table import Table

    r, t = report.result, report.teacher
    kind = "causal" if t.causal else "bidirectional"
    table = Table(title=f"{t.name} on {report.config.split}", show_header=False, title_justify="left")
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
