"""Reading an exported folder the way a device does: the manifest, then every file it lists, checked by size and
sha256 before anything is handed to onnxruntime (a truncated copy or a tampered graph fails here, in one line).

Standard library only. The names mirror sea_edge.export.exporter (MANIFEST, FORMAT); a test keeps them equal,
since the runtime may not import the export package (it pulls in torch on a device that has none).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sea_edge.errors import SeaEdgeError

LOGITS_TO_KEEP = "num_logits_to_keep"
"""An optional prefill input (int64 [1], default 0): logits of the last n positions only, 0 = every position. A
generation's prefill asks for 1, which spares the (B, T, V) logits, the largest buffer of a long prefill (1.5 GiB at
T = 8192 for SmolLM2), and the lm_head's T x E x V multiply-adds. Written by sea_edge.export.graphs."""

__all__ = [
    "ATTENTION", "FORMAT", "LOGITS_TO_KEEP", "MANIFEST", "read_folder", "sha256_file"]

MANIFEST, FORMAT = "sea_edge.json", "sea-edge-model/1"
ATTENTION = ("sea", "dense")
"""What the folder's attention is: "sea" (sea-edge export, the default when the key is absent) or "dense" (the
teacher exported with optimum by sea_edge.export.dense, the baseline)."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_folder(folder: Path, verify: bool = True) -> dict:
    """The manifest of `folder` after checking that every listed file is there with its size (and, when `verify`,
    its sha256). Raises SeaEdgeError naming the first problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SeaEdgeError(f"model folder {folder} does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        raise SeaEdgeError(f"{folder} is not a sea-edge export: no {MANIFEST}")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SeaEdgeError(f"corrupt manifest {path}: {exc}") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise SeaEdgeError(f"{path}: unknown format {fmt!r} (this runtime reads {FORMAT})")
    attention = man.get("attention", "sea")
    if attention not in ATTENTION:
        raise SeaEdgeError(f"{path}: unknown attention {attention!r} (expected one of {', '.join(ATTENTION)})")
    for key in ("files", "graphs", "source_model"):
        if not isinstance(man.get(key), dict):
            raise SeaEdgeError(f"{path}: manifest has no {key!r} section")
    for name, entry in man["files"].items():
        f = folder / name
        if not f.is_file():
            raise SeaEdgeError(f"{folder}: file {name} listed in the manifest is missing")
        if f.stat().st_size != entry.get("bytes"):
            raise SeaEdgeError(f"{folder}: file {name} has {f.stat().st_size} bytes, the manifest says "
                               f"{entry.get('bytes')} (truncated or replaced)")
        if verify and sha256_file(f) != entry.get("sha256"):
            raise SeaEdgeError(f"{folder}: file {name} fails its sha256 check (modified after export)")
    for role in ("prefill", "decode"):
        g = man["graphs"].get(role)
        if not isinstance(g, dict) or g.get("file") not in man["files"]:
            raise SeaEdgeError(f"{path}: graph {role!r} is not described or its file is not listed in 'files'")
    if "tokenizer.json" not in man["files"]:
        raise SeaEdgeError(f"{path}: no tokenizer.json listed in 'files'")
    return man
