"""A small stand-in for an exported folder, for timing runs on a machine the real weights cannot travel to (the GPU
machine takes 64 MiB per call; SmolLM2's fp32 weights are 552 MB): every file of the folder as it is, except that
each large floating-point weight is replaced by random values of its own mean and standard deviation. Shapes,
dtypes, graph and small tensors (norms, the estimator, index tables) are the real ones, so the kernels, memory and
time are those of the real model; its outputs are not (use such a folder for time and memory only).

    python -m sea_edge.runtime.weight_pack pack DIR PACK      # PACK/: the small files, weights.gz, fill.json
    python -m sea_edge.runtime.weight_pack unpack PACK DIR    # DIR: the folder again, large weights random

weights.gz is the weights file with the large tensors zeroed (it compresses to the small tensors' size);
fill.json lists each zeroed region (file, offset, bytes, dtype, mean, std). The manifest's sha256 of the weights
file no longer matches after unpacking: open the folder with verify=False.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from sea_edge.errors import SeaEdgeError

__all__ = ["LARGE_BYTES", "pack", "unpack"]

LARGE_BYTES = 1 << 20
"""Float tensors of at least this many bytes are replaced; smaller ones travel as they are."""
_FLOATS = {1: np.float32, 10: np.float16, 11: np.float64}  # onnx TensorProto data types
_CHUNK = 1 << 24


def _external(folder: Path) -> dict[str, list[dict]]:
    """{weights file: [{name, offset, length, dtype}]} over every .onnx graph of the folder (shared files once)."""
    import onnx

    out: dict[str, dict[int, dict]] = {}
    for graph in sorted(folder.glob("*.onnx")):
        m = onnx.load(str(graph), load_external_data=False)
        for t in m.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
            out.setdefault(info["location"], {})[offset] = {"name": t.name, "offset": offset, "length": length,
                                                            "data_type": int(t.data_type)}
    return {f: sorted(v.values(), key=lambda r: r["offset"]) for f, v in out.items()}


def pack(folder: str | Path, dest: str | Path, large_bytes: int = LARGE_BYTES) -> dict:
    """Write the pack of `folder` to `dest` (a new folder). Returns {"files", "zeroed_bytes", "kept_bytes"}."""
    folder, dest = Path(folder), Path(dest)
    if not (folder / "sea_edge.json").is_file():
        raise SeaEdgeError(f"{folder} is not an exported folder (no sea_edge.json)")
    if dest.exists():
        raise SeaEdgeError(f"{dest} exists: give a new folder")
    tables = _external(folder)
    dest.mkdir(parents=True)
    fill, zeroed, kept = [], 0, 0
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in tables:
            shutil.copy2(f, dest / f.name)
    for wname, rows in tables.items():
        data = np.fromfile(folder / wname, dtype=np.uint8)
        for r in rows:
            n = r["length"] if r["length"] is not None else 0
            dt = _FLOATS.get(r["data_type"])
            if dt is None or n < large_bytes:
                kept += n
                continue
            x = data[r["offset"]:r["offset"] + n].view(dt).astype(np.float64)
            fill.append({"file": wname, "name": r["name"], "offset": r["offset"], "bytes": n,
                         "dtype": np.dtype(dt).name, "mean": float(x.mean()), "std": float(x.std())})
            data[r["offset"]:r["offset"] + n] = 0
            zeroed += n
        with gzip.open(dest / f"{wname}.gz", "wb", compresslevel=1) as out:
            for i in range(0, len(data), _CHUNK):
                out.write(data[i:i + _CHUNK].tobytes())
    (dest / "fill.json").write_text(json.dumps({"format": "sea-edge-weight-pack/1", "regions": fill}, indent=1))
    return {"files": sorted(p.name for p in dest.iterdir()), "zeroed_bytes": zeroed, "kept_bytes": kept}


def unpack(src: str | Path, folder: str | Path, seed: int = 0) -> dict:
    """Rebuild a folder from a pack: the small files, the weights files, the large tensors random."""
    src, folder = Path(src), Path(folder)
    meta_file = src / "fill.json"
    if not meta_file.is_file():
        raise SeaEdgeError(f"{src} is not a weight pack (no fill.json)")
    meta = json.loads(meta_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "fill.json":
            continue
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as inp, open(folder / f.stem, "wb") as out:
                shutil.copyfileobj(inp, out, _CHUNK)
        else:
            shutil.copy2(f, folder / f.name)
    rng = np.random.default_rng(seed)
    for r in meta["regions"]:
        dt = np.dtype(r["dtype"])
        mm = np.memmap(folder / r["file"], dtype=dt, mode="r+", offset=r["offset"], shape=(r["bytes"] // dt.itemsize,))
        mm[:] = rng.normal(r["mean"], r["std"], mm.shape).astype(dt)
        mm.flush()
        del mm
    return {"regions": len(meta["regions"]), "folder": str(folder)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sea_edge.runtime.weight_pack", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("pack", "unpack"))
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    try:
        res = pack(args.src, args.dest) if args.command == "pack" else unpack(args.src, args.dest)
    except SeaEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
