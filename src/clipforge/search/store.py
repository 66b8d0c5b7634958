"""The on-disk layout of an embedding collection (the one clip-retrieval users know).

```
emb/
  img_emb/img_emb_00000.npy           float16 [n, dim], L2-normalised rows (text: text_emb/text_emb_*)
  metadata/metadata_00000.parquet     one row per embedding: key, path, member, caption, width, height
  done/shard_00000.json               done-marker: count + the items skipped in this shard (key, reason)
  manifest.json                       model (config + weights hash), dim, kind, source, shard sizes
  errors.jsonl                        every skipped item of the collection (key, reason, shard)
```

A shard is *finished* only when its ``.npy``, its ``.parquet`` and its done-marker all exist;
each file is written atomically and the marker last, so a killed run leaves at worst a shard
without marker, which the next run redoes.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..utils import atomic_write_bytes, atomic_write_text, read_json, write_json

FORMAT = "clipforge-embeddings/1"
EMB_DIRS = {"image": "img_emb", "text": "text_emb"}
METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("path", pa.string()),      # image file, or the tar shard holding it (then `member` is set)
    ("member", pa.string()),    # member name inside a tar shard, else null
    ("caption", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def shard_name(index: int) -> str:
    return f"{index:05d}"


@dataclass(frozen=True)
class ShardPaths:
    """Where shard ``index`` of a collection of ``kind`` lives under ``root``."""

    root: Path
    kind: str
    index: int

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def emb(self) -> Path:
        d = EMB_DIRS[self.kind]
        return self.root / d / f"{d}_{self.name}.npy"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata" / f"metadata_{self.name}.parquet"

    @property
    def marker(self) -> Path:
        return self.root / "done" / f"shard_{self.name}.json"

    def is_finished(self) -> bool:
        return self.marker.is_file() and self.emb.is_file() and self.metadata.is_file()


def write_shard(paths: ShardPaths, embeddings: np.ndarray, rows: list[dict[str, Any]],
                skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one shard: embeddings, metadata, then the done-marker (each atomically)."""
    if embeddings.ndim != 2 or embeddings.shape[0] != len(rows):
        raise ValueError(f"shard {paths.name}: {embeddings.shape[0]} embeddings for {len(rows)} metadata rows")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(embeddings, dtype=np.float16))
    atomic_write_bytes(paths.emb, buf.getvalue())
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(paths.metadata, sink.getvalue().to_pybytes())
    marker = {"shard": paths.index, "name": paths.name, "count": int(embeddings.shape[0]),
              "skipped": skipped}
    write_json(paths.marker, marker)
    return marker


def read_marker(paths: ShardPaths) -> dict[str, Any]:
    return read_json(paths.marker)


def load_embeddings(path: Path, mmap: bool = True) -> np.ndarray:
    """One shard's embeddings (memory-mapped by default), checked to be a 2-D float array."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"embedding shard not found: {path}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy array: {e}") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise ValueError(f"{path}: expected a 2-D float array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def load_metadata(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"metadata shard not found: {path}") from None


def weights_sha256(model: Any) -> str:
    """Hash of a model's parameters and buffers (names, dtypes, shapes, bytes), so a collection
    embedded with one set of weights is never silently mixed with another's."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_info(model: Any) -> dict[str, Any]:
    cfg = model.config
    # dtype: embeddings of a bf16 model (``--precision``) differ from fp32 ones at ~1e-2, and the
    # weights hash (checked on resume) differs with it.
    return {"name": cfg.name, "config": cfg.to_dict(), "dtype": str(model.dtype).removeprefix("torch."),
            "weights_sha256": weights_sha256(model)}


@dataclass
class Collection:
    """A finished (or partly finished) embedding directory, read-only."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> "Collection":
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"embedding directory not found: {root}")
        man_path = root / "manifest.json"
        if not man_path.is_file():
            raise FileNotFoundError(f"{root} has no manifest.json: not an embedding directory "
                                    "(run `clipforge embed` first)")
        man = read_json(man_path)
        if man.get("format") != FORMAT:
            raise ValueError(f"{man_path}: format is {man.get('format')!r}, expected {FORMAT!r}")
        return cls(root, man)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def finished_shards(self) -> list[ShardPaths]:
        """Finished shards found on disk, in index order (the manifest may lag under torchrun)."""
        out = []
        for marker in sorted((self.root / "done").glob("shard_*.json")):
            try:
                index = int(marker.stem.split("_", 1)[1])
            except ValueError:
                continue
            sp = ShardPaths(self.root, self.kind, index)
            if sp.is_finished():
                out.append(sp)
        return out


def rebuild_summary(root: Path, kind: str, base: dict[str, Any], expected_shards: int | None) -> dict[str, Any]:
    """Rewrite manifest.json and errors.jsonl from the done-markers on disk (idempotent, so any
    rank may call it; the last to finish leaves the complete picture)."""
    shards: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for marker in sorted((root / "done").glob("shard_*.json")):
        sp = ShardPaths(root, kind, int(marker.stem.split("_", 1)[1]))
        if not sp.is_finished():
            continue
        m = read_json(marker)
        shards.append({"index": sp.index, "name": sp.name, "count": m["count"], "skipped": len(m["skipped"])})
        errors.extend({**e, "shard": sp.name} for e in m["skipped"])
    man = dict(base)
    if expected_shards is None:
        expected_shards = base.get("num_shards")
    man["num_shards"] = expected_shards
    man["shards"] = shards
    man["total"] = sum(s["count"] for s in shards)
    man["skipped"] = len(errors)
    man["complete"] = expected_shards is not None and len(shards) == expected_shards
    write_json(root / "manifest.json", man)
    atomic_write_text(root / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
    return man

