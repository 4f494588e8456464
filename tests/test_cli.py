"""The `sea-edge` command line: CliRunner for the commands, plus real runs of the installed script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sea_edge import __version__
from sea_edge.cli import app

runner = CliRunner()


def test_help_lists_eval():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "eval" in result.output and "Perplexity" in result.output


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sea-edge {__version__}"


def test_bad_option_exits_2():
    result = runner.invoke(app, ["eval", "--no-such-option"])
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_bad_split_exits_2():
    assert runner.invoke(app, ["eval", "--split", "test"]).exit_code == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "nope"], "error: unknown teacher 'nope': not a known name (smollm2-135m, minilm-l6)"),
        (["--seq-len", "0"], "error: seq_len must be >= 2"),
        (["--max-windows", "0"], "error: max_windows must be >= 1"),
    ],
    ids=["unknown-model", "seq-len-0", "max-windows-0"],
)
def test_user_error_is_one_line_and_exit_1(args, message):
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.slow
def test_eval_prints_the_table(smollm2, monkeypatch):
    from sea_edge import evaluation
    from sea_edge.data import load_corpus

    # the session's teacher instead of a second 20 s load; everything else is the real command
    monkeypatch.setattr(evaluation, "load_teacher", lambda name: smollm2)
    result = runner.invoke(app, ["eval", "--seq-len", "32", "--max-windows", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    expected = evaluation.perplexity(*smollm2, load_corpus("validation"), 32, max_windows=2)
    for row in ("perplexity", "tokens/s", "peak RSS (MiB)", "tokens scored"):
        assert row in result.stdout
    assert f"{expected.ppl:.3f}" in result.stdout
    assert "62" in result.stdout  # 2 windows x 31 scored tokens


def _sea_edge(*args):
    script = Path(sys.executable).with_name("sea-edge")  # the console script pip installed beside this python
    return subprocess.run([str(script), *args], check=False, capture_output=True, text=True, timeout=120)


def test_installed_script_help():
    result = _sea_edge("--help")
    assert result.returncode == 0, result.stderr
    assert "eval" in result.stdout


def test_installed_script_user_error():
    result = _sea_edge("eval", "--model", "/no/such/model")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: unknown teacher '/no/such/model': not a known name (smollm2-135m, minilm-l6) and no such path"
    )
    assert result.stdout == ""
