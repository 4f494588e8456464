"""The wheel holds every module of the package (STYLE: wheels drop sub-packages pyproject does not list), and
`import sea_edge` stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> where its modules land in the wheel (pyproject package-dir)
MAPPED = {
    "sea_edge": "sea_edge",
    "kernels": "sea_edge/kernels",
    "export": "sea_edge/export",
    "runtime": "sea_edge/runtime",
}


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the source so the repository gets no build/ or egg-info from the test."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "*.onnx", "*.onnx.data")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for folder in MAPPED:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = out.glob("sea_edge-*.whl")
    return wheel


def _in_a_package(path: Path, top: Path) -> bool:
    """True if every folder from `top` down to the file's holds an __init__.py (scripts in plain folders don't ship)."""
    folder = path.parent
    while True:
        if not (folder / "__init__.py").is_file():
            return False
        if folder == top:
            return True
        folder = folder.parent


def test_wheel_holds_every_module(tmp_path):
    wheel = zipfile.ZipFile(_build_wheel(tmp_path))
    names = set(wheel.namelist())
    expected = {
        f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, target in MAPPED.items()
        for path in (ROOT / folder).rglob("*.py")
        if _in_a_package(path, ROOT / folder)
    }
    for must in (
        "sea_edge/kernels/__init__.py",
        "sea_edge/export/__init__.py",
        "sea_edge/runtime/__init__.py",
        "sea_edge/cli.py",
        "sea_edge/teacher.py",
    ):
        assert must in expected
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel (list their packages in pyproject): {missing}"
    assert "sea_edge/py.typed" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "sea-edge = sea_edge.cli:app" in wheel.read(entry_points).decode()


def test_import_is_light():
    """`import sea_edge` and the command line's module load neither torch nor transformers."""
    code = (
        "import sys, sea_edge, sea_edge.cli, sea_edge.teacher, sea_edge.data, sea_edge.evaluation; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton', 'onnxruntime') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "", f"imported at `import sea_edge`: {result.stdout.strip()}"


def test_kernels_folder_is_not_importable_as_top_level_kernels():
    """From the repository root, transformers probes `import kernels` (the Hugging Face package) and would find our
    folder; that import must fail cleanly instead of registering the op twice (seen: a broken op afterwards)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = (
        "import torch, sea_edge.kernels as sk\n"
        "try:\n"
        "    import kernels\n"
        "    raise SystemExit('top-level kernels imported')\n"
        "except ImportError:\n"
        "    pass\n"
        "q = torch.randn(1, 2, 3, 8); k = torch.randn(1, 1, 3, 8)\n"
        "idx = torch.tensor([0, 1, 2, -1]).expand(1, 2, 3, 4).contiguous()\n"
        "out = sk.sparse_attention(q.requires_grad_(), k, k, idx, 0.3)\n"
        "out.sum().backward()\n"
        "print('ok', tuple(out.shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok (1, 2, 3, 8)" in r.stdout, r.stderr[-2000:]
