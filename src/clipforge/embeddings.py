"""The one on-disk store of embedding collections, shared by search (``embed``/``index``) and curation.

The layout is clip-retrieval's, so folders move between the two tools in both directions::

    emb/
      img_emb/img_emb_00000.npy           float16 [n, dim], L2-normalised rows (text: text_emb/text_emb_*)
      metadata/metadata_00000.parquet     one row per embedding: image_path, caption (clip-retrieval's
                                          names) + key, member, width, height (ours)
      done/shard_00000.json               ours: done-marker, count + the items skipped (key, reason)
      manifest.json                       ours: model (config + weights hash), dim, kind, source, shards
      errors.jsonl                        ours: every skipped item (key, reason, shard)

A shard of a ``clipforge embed`` folder is *finished* only when its ``.npy``, its ``.parquet`` and
its done-marker all exist; each file is written atomically and the marker last, so a killed run
leaves at worst a shard without marker, which the next run redoes.

A folder without our ``manifest.json`` (written by ``clip-retrieval inference``, or by
:func:`write_part`) is read as clip-retrieval writes it: every ``{img,text}_emb_N.npy`` with its
``metadata_N.parquet`` is one finished shard (N in any zero-padding), ids follow the shards'
numeric order, the dimension comes from the arrays and the model is unknown. Metadata with the old
image column ``path`` is read as ``image_path``; a missing ``key`` is taken from ``image_path``
(clip-retrieval's file path or WebDataset key) or, failing that, ``<shard>:<row>``.

pyarrow is imported only when Parquet is read or written (curation runs without it, keeping its
keys in ``metadata_N.txt``, one per line).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .precision import lowest_weight_dtype
from .utils import (
    atomic_write_bytes,
    atomic_write_text,
    is_done,
    read_json,
    text_name,
    write_json,
    write_marker,
)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("clipforge.embeddings")

FORMAT = "clipforge-embeddings/1"
FOREIGN_FORMAT = "clip-retrieval"
EMB_DIRS = {"image": "img_emb", "text": "text_emb"}
KINDS = tuple(EMB_DIRS)
IMAGE_COLUMN = "image_path"   # clip-retrieval's name (ours was ``path`` before; read as an alias)
LEGACY_COLUMNS = {"path": IMAGE_COLUMN}
METADATA_COLUMNS = (("key", "string"), (IMAGE_COLUMN, "string"), ("member", "string"), ("caption", "string"),
                    ("width", "int32"), ("height", "int32"))


def metadata_schema() -> "pa.Schema":
    """key, image_path (file, or the tar shard holding it when ``member`` is set), member, caption, width, height."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, t)()) for name, t in METADATA_COLUMNS])


def shard_name(index: int) -> str:
    return f"{index:05d}"


@dataclass(frozen=True)
class ShardPaths:
    """Where shard ``index`` of a collection of ``kind`` lives under ``root``; ``label`` is the
    number as spelled in the file names (ours: 5 digits; clip-retrieval: as many as it needs)."""

    root: Path
    kind: str
    index: int
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or shard_name(self.index)

    @property
    def emb(self) -> Path:
        d = EMB_DIRS[self.kind]
        return self.root / d / f"{d}_{self.name}.npy"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata" / f"metadata_{self.name}.parquet"

    @property
    def keys_txt(self) -> Path:
        return self.root / "metadata" / f"metadata_{self.name}.txt"

    @property
    def marker(self) -> Path:
        return self.root / "done" / f"shard_{self.name}.json"

    def is_finished(self) -> bool:
        return is_done(self.marker) and self.emb.is_file() and self.metadata.is_file()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float16))
    return buf.getvalue()


def _parquet_bytes(table: "pa.Table") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_shard(paths: ShardPaths, embeddings: np.ndarray, rows: list[dict[str, Any]],
                skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one shard of a ``clipforge embed`` folder: embeddings, metadata, then the done-marker."""
    import pyarrow as pa

    if embeddings.ndim != 2 or embeddings.shape[0] != len(rows):
        raise ValueError(f"shard {paths.name}: {embeddings.shape[0]} embeddings for {len(rows)} metadata rows")
    # file names that are not UTF-8 (surrogate-escaped str) are stored in text_name's \xNN spelling
    rows = [{k: text_name(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    skipped = [{k: text_name(v) if isinstance(v, str) else v for k, v in r.items()} for r in skipped]
    atomic_write_bytes(paths.emb, _npy_bytes(embeddings))
    atomic_write_bytes(paths.metadata, _parquet_bytes(pa.Table.from_pylist(rows, schema=metadata_schema())))
    marker = {"shard": paths.index, "name": paths.name, "count": int(embeddings.shape[0]), "skipped": skipped}
    write_marker(paths.marker, marker)
    return marker


def write_part(root: str | Path, part: int, keys: Sequence[str], image: np.ndarray | None = None,
               text: np.ndarray | None = None, captions: Sequence[str | None] | None = None) -> None:
    """Write one part in clip-retrieval's layout (no manifest, no done-marker): ``img_emb`` and/or
    ``text_emb`` rows paired with one metadata row each (``key``, ``image_path``, ``caption``)."""
    root = Path(root)
    n = len(keys)
    for kind, arr in (("image", image), ("text", text)):
        if arr is not None and (arr.ndim != 2 or arr.shape[0] != n):
            raise ValueError(f"part {part}: {kind} embeddings of shape {arr.shape} for {n} keys")
    if image is None and text is None:
        raise ValueError(f"part {part}: nothing to write (no image or text embeddings)")
    sp = {k: ShardPaths(root, k, part) for k in KINDS}
    if image is not None:
        atomic_write_bytes(sp["image"].emb, _npy_bytes(image))
    if text is not None:
        atomic_write_bytes(sp["text"].emb, _npy_bytes(text))
    try:
        import pyarrow as pa
    except ImportError:  # curation without the search extra: keys only
        atomic_write_text(sp["image"].keys_txt, "".join(f"{k}\n" for k in keys))
        return
    caps = list(captions) if captions is not None else [None] * n
    table = pa.table({"key": [str(k) for k in keys], IMAGE_COLUMN: [str(k) for k in keys], "caption": caps},
                     schema=pa.schema([("key", pa.string()), (IMAGE_COLUMN, pa.string()), ("caption", pa.string())]))
    atomic_write_bytes(sp["image"].metadata, _parquet_bytes(table))


def load_embeddings(path: Path, mmap: bool = True) -> np.ndarray:
    """One shard's embeddings (memory-mapped by default), checked to be a 2-D float array."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"embedding shard not found: {path}") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array: {e}") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise ValueError(f"{path}: expected a 2-D float array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def normalize_metadata(table: "pa.Table", label: str = "") -> "pa.Table":
    """Our column names on any metadata table: ``path`` -> ``image_path`` (folders and indexes
    written before the rename), and a ``key`` column (from ``image_path``, else ``<label>:<row>``)."""
    import pyarrow as pa

    names = list(table.column_names)
    for old, new in LEGACY_COLUMNS.items():
        if old in names and new not in names:
            names[names.index(old)] = new
    if names != table.column_names:
        table = table.rename_columns(names)
    if "key" not in names:
        if IMAGE_COLUMN in names and table.column(IMAGE_COLUMN).null_count == 0:
            keys = table.column(IMAGE_COLUMN).cast(pa.string())
        else:
            keys = pa.array([f"{label}:{i}" for i in range(table.num_rows)], pa.string())
        table = table.add_column(0, "key", keys)
    return table


def load_metadata(path: Path, label: str = "") -> "pa.Table":
    """One shard's metadata (Parquet, or a keys ``.txt`` beside it), with :func:`normalize_metadata` applied."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file() and path.with_suffix(".txt").is_file():
        keys = [ln for ln in path.with_suffix(".txt").read_text(encoding="utf-8").splitlines() if ln]
        return pa.table({"key": pa.array(keys, pa.string())})
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"metadata shard not found: {path}") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
    return normalize_metadata(table, label)


def weights_sha256(model: Any) -> str:
    """Hash of a model's parameters and buffers (names, dtypes, shapes, bytes), so a collection
    embedded with one set of weights is never silently mixed with another's."""
    import torch

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
    return {"name": cfg.name, "config": cfg.to_dict(), "dtype": str(lowest_weight_dtype(model)).removeprefix("torch."),
            "weights_sha256": weights_sha256(model)}


def _foreign_shards(root: Path, kind: str) -> list[ShardPaths]:
    """``{d}_N.npy`` files of a clip-retrieval folder in numeric order, each with its metadata."""
    d = EMB_DIRS[kind]
    pat = re.compile(rf"^{d}_(\d+)\.npy$")
    found = sorted((int(m.group(1)), m.group(1)) for p in (root / d).iterdir() if (m := pat.match(p.name)))
    seen: dict[int, str] = {}
    out = []
    for index, label in found:
        if index in seen:
            raise ValueError(f"{root / d}: {d}_{seen[index]}.npy and {d}_{label}.npy are the same shard number")
        seen[index] = label
        sp = ShardPaths(root, kind, index, label)
        if not sp.metadata.is_file() and not sp.keys_txt.is_file():
            raise FileNotFoundError(f"{sp.emb}: no matching {sp.metadata}")
        out.append(sp)
    return out


@dataclass
class Collection:
    """A finished (or partly finished) embedding folder, read-only: ours or clip-retrieval's."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path, kind: str | None = None) -> "Collection":
        """``kind`` ('image'/'text') picks the embeddings of a folder holding both (clip-retrieval
        writes ``img_emb`` and ``text_emb`` side by side); default: what the manifest says, else image."""
        root = Path(root)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not root.is_dir():
            raise FileNotFoundError(f"embedding directory not found: {root}")
        man_path = root / "manifest.json"
        if man_path.is_file():
            man = read_json(man_path)
            if man.get("format") != FORMAT:
                raise ValueError(f"{man_path}: format is {man.get('format')!r}, expected {FORMAT!r}")
            if kind is not None and man.get("kind") != kind:
                raise ValueError(f"{root} holds {man.get('kind')} embeddings; {kind} embeddings are needed here")
            return cls(root, man)
        return cls(root, cls._infer_manifest(root, kind))

    @staticmethod
    def _infer_manifest(root: Path, kind: str | None) -> dict[str, Any]:
        present = [k for k in KINDS if (root / EMB_DIRS[k]).is_dir() and any((root / EMB_DIRS[k]).glob("*.npy"))]
        if kind is None:
            if not present:
                raise FileNotFoundError(f"{root} has neither manifest.json nor img_emb/*.npy or text_emb/*.npy: "
                                        "not an embedding directory (run `clipforge embed` or `clip-retrieval "
                                        "inference` first)")
            kind = present[0]
        elif kind not in present:
            raise FileNotFoundError(f"{root} has no {EMB_DIRS[kind]}/*.npy ({kind} embeddings needed here)")
        shards = _foreign_shards(root, kind)
        dim = None
        for sp in shards:
            arr = load_embeddings(sp.emb)
            if dim is not None and arr.shape[1] != dim:
                raise ValueError(f"{sp.emb}: dim {arr.shape[1]}, earlier shards have {dim}")
            dim = int(arr.shape[1])
        notes = [f"no manifest.json: read as a clip-retrieval folder ({len(shards)} {EMB_DIRS[kind]} shards, "
                 f"each .npy + metadata pair taken as finished; model unknown, so the model that queries it "
                 f"is not checked against the one that embedded it)"]
        if len(present) > 1:
            notes.append(f"folder also holds {', '.join(EMB_DIRS[k] for k in present if k != kind)}: "
                         f"using {EMB_DIRS[kind]} (choose with --kind)")
        return {"format": FOREIGN_FORMAT, "kind": kind, "embedding_dir": EMB_DIRS[kind], "dim": dim,
                "model": None, "num_shards": len(shards), "complete": True, "notes": notes,
                "shards": [{"index": sp.index, "name": sp.name} for sp in shards]}

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def foreign(self) -> bool:
        return self.manifest.get("format") == FOREIGN_FORMAT

    def finished_shards(self) -> list[ShardPaths]:
        """Finished shards found on disk, in index order (the manifest may lag under torchrun)."""
        if self.foreign:
            return _foreign_shards(self.root, self.kind)
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

    def unfinished_shards(self) -> list[Path]:
        """Embedding files of a ``clipforge embed`` folder that have no done-marker (ignored when read)."""
        if self.foreign:
            return []
        done = {sp.emb for sp in self.finished_shards()}
        return [p for p in sorted((self.root / EMB_DIRS[self.kind]).glob("*.npy")) if p not in done]

    def read_all(self) -> tuple[list[str], np.ndarray]:
        """Every finished shard as ``(keys, float32 [n, dim])`` in id order (small collections:
        curation; the index streams shard by shard instead)."""
        keys: list[str] = []
        arrays: list[np.ndarray] = []
        for sp in self.finished_shards():
            arr = load_embeddings(sp.emb, mmap=False)
            if arr.shape[1] != self.dim:
                raise ValueError(f"{sp.emb}: expected a [n, {self.dim}] array, got shape {arr.shape}")
            meta = load_metadata(sp.metadata, sp.name)
            if meta.num_rows != len(arr):
                raise ValueError(f"{sp.metadata}: {meta.num_rows} rows but {sp.emb.name} has {len(arr)}")
            keys.extend(str(k) for k in meta.column("key").to_pylist())
            arrays.append(arr.astype(np.float32))
        if not arrays:
            raise FileNotFoundError(f"no finished {EMB_DIRS[self.kind]}_*.npy files in {self.root}")
        return keys, np.concatenate(arrays)


def rebuild_summary(root: Path, kind: str, base: dict[str, Any], expected_shards: int | None) -> dict[str, Any]:
    """Rewrite manifest.json and errors.jsonl from the done-markers on disk (idempotent, so any
    rank may call it). Markers are only ever added, so after writing it looks again and rewrites
    until the set it wrote is still the whole set: whichever rank writes last then leaves the
    complete picture, even if another rank read the markers before this one's last marker landed."""
    written: list[int] | None = None
    while True:
        shards: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for marker in sorted((root / "done").glob("shard_*.json")):
            sp = ShardPaths(root, kind, int(marker.stem.split("_", 1)[1]))
            if not sp.is_finished():
                continue
            m = read_json(marker)
            shards.append({"index": sp.index, "name": sp.name, "count": m["count"], "skipped": len(m["skipped"])})
            errors.extend({**e, "shard": sp.name} for e in m["skipped"])
        indices = [s["index"] for s in shards]
        if indices == written:
            return man
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
        written = indices

