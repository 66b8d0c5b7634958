"""Milvus as the search backend: the same ``index.json`` directory, its vectors and metadata in a
Milvus collection instead of a FAISS file.

``uri`` is a local ``*.db`` path (milvus-lite, embedded: it runs in this process, one process
per database) or ``http(s)://host:19530`` (a Milvus standalone or cluster). Both go through the
same ``pymilvus.MilvusClient`` calls; only connecting differs (:func:`connect`). The server branch
is not exercised by the tests (no server here).

Index choice follows the FAISS path (:func:`.index.plan_index`): ``FLAT`` up to the exact
threshold, then ``IVF_FLAT`` when the float vectors fit ``max_memory``, else ``IVF_SQ8``
(the IVF types milvus-lite implements besides HNSW); ``nlist`` ~ 4*sqrt(n), ``nprobe`` tuned on
held-out collection vectors to the recall@10 target against exact search, and stored.

Generations: a build writes collection ``{name}_g{gen:06d}``, commits ``index.json`` naming it, then
drops the superseded one, so the old collection answers until the new one is complete. ``--add``
upserts rows with the ids ``index.json`` assigns (a crash before the commit leaves rows that the
next ``--add`` overwrites, not duplicates). Deletes remove rows and record their ids.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..embeddings import Collection, load_metadata
from ..utils import read_json, write_json
from .planning import (RECALL_K, IndexPlan, drop_self, exact_topk, choose_nlist, human_bytes, parse_memory,
    recall_at_k, tune_nprobe)
from .store import (INDEX_FORMAT, INFO_FILE, BuildReport, ShardRef, collection_refs, next_generation, vectors_at,
    sample_ids, shard_vectors, writer_lock, remove_strays)

EXTRA_HINT = "the Milvus backend needs pymilvus and milvus-lite: pip install 'clipforge[milvus]'"
DEFAULT_DB = "milvus.db"
SERVER_SCHEMES = ("http://", "https://", "tcp://")
META_FIELDS = ("key", "image_path", "member", "caption", "width", "height", "shard")
_VARCHAR = 65535
_INSERT_BATCH = 2000


def _client_cls() -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ModuleNotFoundError(EXTRA_HINT, name="pymilvus") from None
    return MilvusClient


def is_server(uri: str) -> bool:
    return uri.startswith(SERVER_SCHEMES)


def check_collection_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", name or ""):
        raise ValueError(f"Milvus collection name {name!r}: use letters, digits and _ (not starting with a digit)")
    return name


def resolve_uri(uri: str | None, index_dir: Path) -> tuple[str, str]:
    """(uri as stored in index.json, uri to connect to). Local databases inside the index
    directory are stored relative to it, so the directory can be moved."""
    if uri is None:
        uri = DEFAULT_DB
        path = index_dir / uri
    elif is_server(uri):
        return uri, uri
    else:
        path = Path(uri)  # relative: to the working directory, as the user typed it
    if path.suffix != ".db":
        raise ValueError(f"--uri {uri}: a milvus-lite database path must end in .db "
                         f"(or give http(s)://host:19530 for a Milvus server)")
    path = path.resolve()
    try:
        stored = path.relative_to(index_dir.resolve()).as_posix()
    except ValueError:
        stored = str(path)
    return stored, str(path)


def connect_uri(info: dict[str, Any], index_dir: Path) -> str:
    uri = info["uri"]
    return uri if is_server(uri) or Path(uri).is_absolute() else str((index_dir / uri).resolve())


# --- connections: milvus-lite runs in-process, one server per database path ----------------------

_lock = threading.Lock()
_open: dict[str, int] = {}


def connect(uri: str) -> Any:
    """A MilvusClient for ``uri`` (a resolved .db path or a server URI). Pair with :func:`disconnect`."""
    cls = _client_cls()
    if is_server(uri):
        return cls(uri=uri)
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    # milvus-lite buffers inserts as Python objects up to an *estimated* 128 MB (several times that
    # in fact: 1.4 GB at 50k x 512 measured); 32 MB keeps a build's memory near its segments' size.
    # Read once when milvus_lite is first imported; the caller's own setting wins.
    os.environ.setdefault("MILVUS_LITE_MEMTABLE_MEMORY_LIMIT_BYTES", str(32 << 20))
    try:
        import milvus_lite  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(EXTRA_HINT, name="milvus_lite") from None
    try:
        client = cls(uri=uri)
    except Exception as e:
        raise OSError(f"cannot open milvus-lite database {uri}: {e} (milvus-lite lets one process "
                           f"use a database at a time: is `clipforge serve` or another run using it?)") from None
    with _lock:
        _open[uri] = _open.get(uri, 0) + 1
    return client


def disconnect(client: Any, uri: str) -> None:
    """Close the client; the last user of a local database also stops its in-process server and
    releases the database lock (milvus-lite would otherwise hold it until the process exits)."""
    try:
        client.close()
    finally:
        if not is_server(uri):
            with _lock:
                _open[uri] = _open.get(uri, 1) - 1
                last = _open[uri] <= 0
                if last:
                    del _open[uri]
            if last:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(uri)


# --- planning -------------------------------------------------------------------------------------


def plan_milvus(n: int, dim: int, *, max_memory: int | None = None, exact_threshold: int = 100_000) -> IndexPlan:
    """FLAT / IVF_FLAT / IVF_SQ8 for ``n`` vectors of ``dim`` within ``max_memory`` bytes."""
    if n < 1:
        raise ValueError("cannot index an empty collection (no embeddings found)")
    flat = n * dim * 4
    if n <= exact_threshold and (max_memory is None or flat <= max_memory):
        return IndexPlan("flat", "FLAT", dim, n, est_bytes=flat,
                         reason=f"{n} <= exact threshold {exact_threshold}: exact search")
    nlist = choose_nlist(n)
    why = (f"{n} > exact threshold {exact_threshold}" if n > exact_threshold
           else f"exact index ({human_bytes(flat)}) exceeds --max-memory {human_bytes(max_memory or 0)}")
    tried = []
    for itype, code_bytes in (("IVF_FLAT", 4 * dim), ("IVF_SQ8", dim)):
        est = n * (code_bytes + 8) + nlist * dim * 4
        tried.append(f"{itype}: {human_bytes(est)}")
        if max_memory is None or est <= max_memory:
            return IndexPlan("ivf", itype, dim, n, nlist=nlist, codes=itype.split("_")[1], est_bytes=est,
                             reason=f"{why}; {itype} fits the memory budget")
    raise ValueError(f"{n} vectors of dim {dim} do not fit in --max-memory {human_bytes(max_memory or 0)} "
                     f"with milvus-lite's index types ({', '.join(tried)}): use the FAISS backend with --on-disk, "
                     "or a Milvus server")


# --- the backend ------------------------------------------------------------------------------------


def _search_params(info: dict[str, Any], nprobe: int | None = None) -> dict[str, Any]:
    p = nprobe if nprobe is not None else info["params"].get("nprobe")
    return {"metric_type": "IP", "params": {"nprobe": int(p)} if p else {}}


class MilvusIndex:
    """An index directory whose vectors live in Milvus (see :class:`.backend.SearchBackend`)."""

    mmap = False

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = path
        self.info = info
        self.collection = info["collection"]
        self.uri = connect_uri(info, path)
        self.client = connect(self.uri)
        self._closed = False
        try:
            if not self.client.has_collection(self.collection):
                raise FileNotFoundError(f"{path / INFO_FILE} names Milvus collection {self.collection!r}, "
                                        f"which {info['uri']} does not hold")
            self.client.load_collection(self.collection)
        except BaseException:
            self.close()
            raise

    @property
    def ntotal(self) -> int:
        return int(self.info["ntotal"])

    def count(self) -> int:
        res = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(res[0]["count(*)"])

    @property
    def filter_columns(self) -> dict[str, str]:
        """Metadata fields a search filter may name (pushed down as a Milvus filter expression)."""
        return {"key": "string", "caption": "string", "width": "number", "height": "number"}

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               filter_expr: str = "") -> tuple[np.ndarray, np.ndarray]:
        """``filter_expr``: a Milvus boolean expression over the metadata fields (search.filters.milvus_expr)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.info["dim"]:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.info['dim']}")
        res = self.client.search(self.collection, data=q.tolist(), limit=int(k), output_fields=[],
                                 search_params=_search_params(self.info, nprobe), filter=filter_expr)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for i, hits in enumerate(res):
            for j, h in enumerate(list(hits)[:k]):
                ids[i, j], scores[i, j] = int(h["id"]), float(h["distance"])
        return scores, ids

    def _get(self, ids: list[int], fields: list[str]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        res = self.client.query(self.collection, ids=ids, output_fields=fields, consistency_level="Strong")
        return {int(r["id"]): dict(r) for r in res}

    def has(self, item_id: int) -> bool:
        return 0 <= item_id < self.ntotal and bool(self._get([int(item_id)], ["id"]))

    def vector(self, item_id: int) -> np.ndarray:
        got = self._get([int(item_id)], ["vector"])
        if not got:
            raise KeyError(f"unknown item id {item_id}")
        return np.asarray(got[int(item_id)]["vector"], dtype=np.float32)

    def row(self, item_id: int) -> dict[str, Any]:
        got = self.rows([item_id])
        return got[0]

    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        got = self._get(ids, list(META_FIELDS))
        missing = [i for i in ids if i not in got]
        if missing:
            raise KeyError(f"unknown item id {missing[0]}")
        return [{"id": i, **{f: got[i].get(f) for f in META_FIELDS}} for i in ids]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            disconnect(self.client, self.uri)

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- writing ------------------------------------------------------------------------------------


def _schema(client_cls: Any, dim: int) -> Any:
    from pymilvus import DataType

    s = client_cls.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    for name in META_FIELDS:
        if name in ("width", "height"):
            s.add_field(name, DataType.INT32, nullable=True)
        else:
            s.add_field(name, DataType.VARCHAR, max_length=_VARCHAR, nullable=True)
    return s


def _create(client: Any, name: str, plan: IndexPlan) -> None:
    cls = type(client)
    ip = client.prepare_index_params()
    ip.add_index(field_name="vector", index_type=plan.factory, metric_type="IP",
                 params={"nlist": int(plan.nlist)} if plan.nlist else {})
    client.create_collection(name, schema=_schema(cls, plan.dim), index_params=ip, consistency_level="Strong")


def _batches(refs: list[ShardRef], kind: str, dim: int) -> Iterator[list[dict[str, Any]]]:
    """Rows (id, vector, metadata) of ``refs`` in insert batches, one shard in memory at a time."""
    for ref in refs:
        if ref.count == 0:
            continue
        x = shard_vectors(ref, kind, dim)
        meta = load_metadata(ref.paths(kind).metadata, ref.name)
        if meta.num_rows != ref.count:
            raise ValueError(f"{ref.paths(kind).metadata}: {meta.num_rows} rows but {ref.count} embeddings")
        cols = {f: (meta.column(f).to_pylist() if f in meta.column_names else [None] * ref.count)
                for f in META_FIELDS if f != "shard"}
        shard = f"{Path(ref.dir).name}/{ref.name}"
        for lo in range(0, ref.count, _INSERT_BATCH):
            hi = min(lo + _INSERT_BATCH, ref.count)
            vecs = x[lo:hi].tolist()
            yield [{"id": ref.first_id + i, "vector": vecs[i - lo],
                    **{f: (None if cols[f][i] is None else (int(cols[f][i]) if f in ("width", "height")
                                                              else str(cols[f][i]))) for f in cols},
                    "shard": shard} for i in range(lo, hi)]


def _insert(client: Any, name: str, refs: list[ShardRef], kind: str, dim: int, progress: bool,
            upsert: bool = False) -> None:
    from tqdm.auto import tqdm

    total = sum(r.count for r in refs)
    with tqdm(total=total, desc="insert into milvus", unit="vec", disable=not progress) as bar:
        for rows in _batches(refs, kind, dim):
            (client.upsert if upsert else client.insert)(name, rows)
            bar.update(len(rows))


def _measure(index: MilvusIndex, refs: list[ShardRef], kind: str, dim: int, n: int, target: float,
             n_queries: int, rng: np.random.Generator, progress: bool, deleted: set[int],
             query_ids: np.ndarray | None = None) -> tuple[int | None, float | None, list[dict[str, float]], int]:
    """Recall@10 against exact search over the live vectors; for IVF, nprobe tuned to ``target``."""
    if len(deleted) > 1000:
        return index.info["params"].get("nprobe"), None, [], 0
    if query_ids is None:
        query_ids = sample_ids(n, n_queries, rng, exclude=np.array(sorted(deleted), np.int64))
    queries = vectors_at(refs, kind, query_ids)
    extra = len(deleted)
    truth = exact_topk(refs, kind, dim, queries, query_ids, RECALL_K + extra, progress)
    truth = np.stack([np.pad(np.array(r, np.int64), (0, RECALL_K), constant_values=-1)[:RECALL_K] for r in
                      ([x for x in row if int(x) not in deleted] for row in truth)]) if extra else truth
    nlist = index.info["params"].get("nlist")

    def search(q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        return index.search(q, k, nprobe=nprobe)[1]

    if not nlist:
        ids = search(queries, RECALL_K + 1, 0)
        return None, recall_at_k(drop_self(ids, query_ids, RECALL_K), truth), [], len(query_ids)
    nprobe, recall, table = tune_nprobe(None, queries, query_ids, truth, target, int(nlist), search=search)
    return nprobe, recall, table, len(query_ids)


def build_milvus_index(embeddings: str | Path, out_dir: str | Path, *, uri: str | None = None,
                       collection: str = "clipforge", max_memory: int | str | None = None,
                       exact_threshold: int = 100_000, target_recall: float = 0.95, n_queries: int = 1000,
                       seed: int = 0, progress: bool = True, kind: str | None = None) -> BuildReport:
    """Build a Milvus-backed index of every finished shard of ``embeddings``; ``out_dir`` gets the
    ``index.json`` that points ``search``/``serve`` at the collection."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    check_collection_name(collection)
    _client_cls()  # the missing extra, said before any work
    t0 = time.time()
    out = Path(out_dir)
    stored_uri, conn_uri = resolve_uri(uri, out)
    coll = Collection.open(embeddings, kind)
    kind, dim = coll.kind, coll.dim
    refs = collection_refs(coll)
    n = sum(r.count for r in refs)
    budget = parse_memory(max_memory)
    plan = plan_milvus(n, dim, max_memory=budget, exact_threshold=exact_threshold)
    rng = np.random.default_rng(seed)
    notes: list[str] = list(coll.manifest.get("notes", [])) if coll.foreign else []
    if not coll.manifest.get("complete", False):
        notes.append(f"embedding collection {coll.root} is not complete "
                     f"({len(refs)} of {coll.manifest.get('num_shards')} shards finished)")
    nq = min(n_queries, max(1, n // 10))
    query_ids = sample_ids(n, nq, rng)
    with writer_lock(out):
        strays = remove_strays(out)
        if strays:
            notes.append(f"removed {len(strays)} leftover file(s) of an interrupted run (e.g. {strays[0]})")
        old = read_json(out / INFO_FILE) if (out / INFO_FILE).is_file() else {}
        gen = next_generation(out, extra=_milvus_generation(old))
        name = f"{collection}_g{gen:06d}"
        client = connect(conn_uri)
        try:
            if client.has_collection(name):
                client.drop_collection(name)  # an interrupted build's
            _create(client, name, plan)
            _insert(client, name, refs, kind, dim, progress)
            client.load_collection(name)
            info: dict[str, Any] = {
                "format": INDEX_FORMAT, "backend": "milvus", "uri": stored_uri, "collection": name,
                "collection_base": collection, "kind": kind, "type": plan.kind, "factory": f"milvus:{plan.factory}",
                "metric": "inner_product", "dim": dim, "ntotal": n, "count": n,
                "params": {"index_type": plan.factory, "nlist": plan.nlist, "codes": plan.codes, "nprobe": None},
                "exact_threshold": exact_threshold, "max_memory": budget, "target_recall": target_recall,
                "estimated_bytes": plan.est_bytes, "plan_reason": plan.reason,
                "model": coll.manifest.get("model"), "embeddings_format": coll.manifest.get("format"),
                "sources": [r.to_dict() for r in refs], "deleted": [],
                "files": {"generation": gen, "faiss": None, "metadata": [],
                          "milvus": None if is_server(stored_uri) or Path(stored_uri).is_absolute() else stored_uri},
            }
            probe = _Borrowed(out, info, client, conn_uri)
            nprobe, recall, table, nq = _measure(probe, refs, kind, dim, n, target_recall, nq, rng, progress,
                                                 set(), query_ids=query_ids)
            if plan.kind == "ivf" and recall is not None and recall < target_recall:
                notes.append(f"target recall@10 {target_recall} not reached with {plan.factory} "
                             f"(best {recall:.3f} at nprobe={nprobe})")
            info["params"]["nprobe"] = nprobe
            info.update({"recall_at_10": recall, "recall_queries": nq, "tuning": table, "index_bytes": _db_bytes(conn_uri),
                         "build_seconds": round(time.time() - t0, 3), "notes": notes})
            write_json(out / INFO_FILE, info)  # the commit: one atomic rename
            remove_strays(out)  # a superseded FAISS generation
            _drop_superseded(client, collection, name, old, stored_uri)
        finally:
            disconnect(client, conn_uri)
    return BuildReport(str(out), plan.to_dict(), n, n, recall, nprobe, info["index_bytes"], time.time() - t0,
                       table, notes)


class _Borrowed(MilvusIndex):
    """A MilvusIndex on a client the caller owns (no second connect, no close)."""

    def __init__(self, path: Path, info: dict[str, Any], client: Any, uri: str) -> None:
        self.path, self.info, self.client, self.uri = path, info, client, uri
        self.collection = info["collection"]
        self._closed = True


def _milvus_generation(info: dict[str, Any]) -> int:
    m = re.search(r"_g(\d{6})$", str(info.get("collection", "")))
    return int(m.group(1)) if m else 0


def _drop_superseded(client: Any, base: str, live: str, old: dict[str, Any], stored_uri: str) -> None:
    """Drop collections of earlier (or interrupted) generations of this index in the same database."""
    stale = {c for c in client.list_collections() if re.fullmatch(rf"{re.escape(base)}_g\d{{6}}", c) and c != live}
    if old.get("backend") == "milvus" and old.get("uri") == stored_uri and old.get("collection") != live:
        stale.add(old["collection"])
    for c in sorted(stale):
        if client.has_collection(c):
            client.drop_collection(c)


def _db_bytes(uri: str) -> int:
    """On-disk size of a local database (unknown for a server: 0)."""
    if is_server(uri):
        return 0
    p = Path(uri)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def add_milvus(out: Path, info: dict[str, Any], refs: list[ShardRef], new: list[ShardRef], kind: str, dim: int,
               *, target: float, n_queries: int, seed: int, progress: bool, notes: list[str],
               t0: float) -> BuildReport:
    """``--add`` for a Milvus-backed index (the caller holds the writer lock and checked ``new``)."""
    index = MilvusIndex(out, info)
    try:
        _insert(index.client, index.collection, new, kind, dim, progress, upsert=True)
        refs = refs + new
        n = sum(r.count for r in refs)
        info.update({"ntotal": n, "sources": [r.to_dict() for r in refs]})
        deleted = set(int(i) for i in info.get("deleted", []))
        missing = [r for r in refs if not r.paths(kind).emb.is_file()]
        if missing:
            nprobe, recall, table, nq = info["params"].get("nprobe"), None, [], 0
            notes.append(f"recall not re-measured: {len(missing)} source shards are gone (e.g. {missing[0].dir})")
        else:
            nprobe, recall, table, nq = _measure(index, refs, kind, dim, n, target,
                                                 min(n_queries, max(1, n // 10)), np.random.default_rng(seed),
                                                 progress, deleted)
            if recall is None:
                notes.append(f"recall not re-measured: {len(deleted)} deleted ids")
        if info["type"] == "flat" and n > int(info.get("exact_threshold") or 0):
            notes.append(f"the exact index now holds {n} vectors (> threshold {info.get('exact_threshold')}); "
                         "rebuild without --add for an approximate one")
        info["params"]["nprobe"] = nprobe
        info.update({"count": index.count(), "recall_at_10": recall, "recall_queries": nq, "target_recall": target,
                     "tuning": table, "index_bytes": _db_bytes(index.uri),
                     "notes": list(info.get("notes", [])) + notes})
        write_json(out / INFO_FILE, info)  # the commit: one atomic rename
    finally:
        index.close()
    return BuildReport(str(out), {"kind": info["type"], "factory": info["factory"]}, n, sum(r.count for r in new),
                       recall, nprobe, int(info["index_bytes"]), time.time() - t0, table, notes)


def delete_milvus(out: Path, info: dict[str, Any], ids: list[int]) -> tuple[list[int], list[int]]:
    """Delete ``ids`` from the collection (caller holds the lock); returns (deleted, not found)."""
    index = MilvusIndex(out, info)
    try:
        present = sorted(index._get(ids, ["id"]))
        absent = sorted(set(ids) - set(present))
        if present:
            index.client.delete(index.collection, ids=present)
        info["deleted"] = sorted(set(int(i) for i in info.get("deleted", [])) | set(present))
        info["count"] = index.count()
        write_json(out / INFO_FILE, info)
    finally:
        index.close()
    return present, absent
