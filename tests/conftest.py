"""Shared fixtures: the real teachers, loaded once per test session (the default teacher takes ~20 s on 2 cores).

Every test sees the same objects: a test that patches or changes a model must put it back before it finishes
(e.g. `to_dense` in a fixture's teardown)."""

from __future__ import annotations

import os

import pytest

# Packaged teachers load once per test process and are deep-copied after that (sea_edge/teacher.py: CACHE_ENV);
# subprocesses the tests start inherit it.
os.environ.setdefault("SEA_EDGE_TEACHER_CACHE", "1")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter (CI). Set here, before any test module imports the
# kernels (triton reads it at import), so every kernel test file runs the same way alone or in a whole run.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default teacher, SmolLM2-135M-Instruct, fp32, eval mode, eager attention."""
    from sea_edge.teacher import DEFAULT_TEACHER, load_teacher

    return load_teacher(DEFAULT_TEACHER)


@pytest.fixture
def sea_smollm2(smollm2):
    """The shared teacher in SEA mode with the default estimator, dense again afterwards."""
    from sea_edge.estimator_io import apply_estimator, resolve_estimator
    from sea_edge.patch import to_dense

    model, tok = smollm2
    apply_estimator(model, resolve_estimator("smollm2-135m", "default"))
    yield model, tok
    to_dense(model)


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2, the bidirectional (BERT encoder) teacher."""
    from sea_edge.teacher import load_teacher

    return load_teacher("minilm-l6")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """The default export (exported_default) takes ~10 minutes on 2 cores, mostly single-threaded tracing in
    torch.onnx.export. When collected tests need it, it starts now in a background process, and those tests run last
    (a stable sort: pytest's own grouping by fixture parameters stays), so the other tests use the second core
    meanwhile."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if os.environ.get("SEA_EDGE_EXPORTED_DEFAULT") or config.option.collectonly:
        return
    needs = [("exported_default" in getattr(item, "fixturenames", ())) and not _skipped(item) for item in items]
    if not any(needs):
        return
    order = sorted(range(len(items)), key=lambda i: needs[i])
    items[:] = [items[i] for i in order]
    root = Path(tempfile.mkdtemp(prefix="sea-edge-export-"))
    out = root / "smollm2-sea"
    with (root / "export.log").open("w") as log:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from sea_edge.export.exporter import "
                                 "ExportConfig, export; export(ExportConfig(out=sys.argv[1]))", str(out)],
                                stdout=log, stderr=subprocess.STDOUT)
    config.stash[_EXPORT] = (proc, root, out)
    # While the export holds one core, torch in this process takes one thread: two threads on the one core left
    # spin against the export (a distillation test took 84 s with 2 threads and 50 s with 1 beside a busy core, 36 s
    # alone with 2; 2 cores, 2026-12-07). pytest_runtest_setup gives the thread back once the export is done.
    import torch

    config.stash[_THREADS] = torch.get_num_threads()
    torch.set_num_threads(1)


_EXPORT = pytest.StashKey[tuple]()
_THREADS = pytest.StashKey[int]()


def pytest_runtest_setup(item):
    threads = item.config.stash.get(_THREADS, None)
    if threads is not None and item.config.stash[_EXPORT][0].poll() is not None:
        import torch

        torch.set_num_threads(threads)
        del item.config.stash[_THREADS]


def _skipped(item) -> bool:
    """Skipped whatever happens: a skip mark, or a skipif whose condition is already True (no GPU)."""
    return any(item.iter_markers("skip")) or any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


def pytest_unconfigure(config):
    import shutil

    job = config.stash.get(_EXPORT, None)
    if job is not None:
        proc, root, _ = job
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def exported_default(tmp_path_factory, pytestconfig):
    """The main job on the default model, run once per session: `export(ExportConfig(out=...))` with the default
    teacher and its embedded estimator (fp32, opset 18). Returns the ExportResult (folder in .out). Several minutes
    on 2 cores, started in the background at collection (pytest_collection_modifyitems); every export/runtime/budget
    test shares it. SEA_EDGE_EXPORTED_DEFAULT=DIR reuses a folder that
    `sea-edge export --out DIR` wrote instead (the GPU script exports once and hands it to its tests); tests never
    write into it (they tamper with copies)."""
    import json
    import os
    from pathlib import Path

    from sea_edge.export.exporter import ExportConfig, ExportResult, export

    reuse = os.environ.get("SEA_EDGE_EXPORTED_DEFAULT")
    job = pytestconfig.stash.get(_EXPORT, None)
    if job is not None:  # started in the background at collection
        proc, root, reuse = job
        if proc.wait() != 0:
            tail = (root / "export.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"the background export failed (exit {proc.returncode}):\n{tail}", pytrace=False)
    if reuse:
        manifest = json.loads((Path(reuse) / "sea_edge.json").read_text(encoding="utf-8"))
        return ExportResult(Path(reuse), manifest, 0.0, manifest.get("validation", {}))
    return export(ExportConfig(out=tmp_path_factory.mktemp("export") / "smollm2-sea"))
