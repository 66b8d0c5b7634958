"""FAISS indexes over embedding collections: build, incremental add, delete, load. The plan and the
tuning are :mod:`.planning`'s, the directory layout, lock and commit :mod:`.store`'s (shared with
:mod:`.milvus`)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import faiss
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ..embeddings import Collection, load_embeddings
from ..utils import read_json, write_json
# human_bytes, parse_memory, choose_nlist, recall_at_k, set_search_params, INFO_FILE, remove_strays: also
# importable from here, where callers found them before the split
from .planning import (
    RECALL_K, IndexPlan, choose_nlist, drop_self, exact_topk, human_bytes, parse_memory, plan_index,
    recall_at_k, set_search_params, tune_nprobe,
)
from .milvus import MilvusIndex, add_milvus, delete_milvus  # pymilvus itself loads only when used
from .store import (
    BuildReport, INDEX_FILE, INDEX_FORMAT, INFO_FILE, IVFDATA_FILE, META_DIR, ShardRef, collection_refs,
    live_files, load_metadata_parts, metadata_table, next_generation, read_index_info, remove_strays,
    sample_ids, shard_vectors, vectors_at, write_metadata_streaming, write_parquet, writer_lock,
)

if TYPE_CHECKING:
    from .backend import SearchBackend


def _write_index_file(index: faiss.Index, path: Path) -> int:
    """faiss writes by file name: write to a temporary sibling, fsync, rename (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def _measure_and_tune(index: faiss.Index, refs: list[ShardRef], kind: str, dim: int, n: int, nlist: int | None,
                      target: float, n_queries: int, rng: np.random.Generator, progress: bool,
                      query_ids: np.ndarray | None = None) -> tuple[int | None, float, list[dict[str, float]], int]:
    if query_ids is None:
        query_ids = sample_ids(n, n_queries, rng)
    queries = vectors_at(refs, kind, query_ids)
    truth = exact_topk(refs, kind, dim, queries, query_ids, RECALL_K, progress)
    if nlist is None:  # exact index: measure anyway (it is the ground truth, so 1.0 up to ties)
        _, ids = index.search(queries, RECALL_K + 1)
        return None, recall_at_k(drop_self(ids, query_ids, RECALL_K), truth), [], len(query_ids)
    nprobe, recall, table = tune_nprobe(index, queries, query_ids, truth, target, nlist)
    return nprobe, recall, table, len(query_ids)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk lists print progress with printf to stdout, which would corrupt ``--json``
    output: point file descriptor 1 at stderr meanwhile."""
    import sys

    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)  # C's stdout is block-buffered on a pipe: empty it while it still points at stderr
        os.dup2(saved, 1)
        os.close(saved)


def _block_rows(budget: int | None, plan: IndexPlan) -> int:
    """Vectors per in-RAM block of an on-disk build: a quarter of what the budget leaves (float32
    input + codes + ids), at least 1,000; 250,000 without a budget."""
    per_row = plan.dim * 4 + plan.dim + 8
    if budget is None:
        return 250_000
    return max(1_000, (budget - plan.est_bytes) // 4 // per_row)


def _fill_on_disk(trained: faiss.Index, refs: list[ShardRef], kind: str, dim: int, ivfdata: Path,
                  block_rows: int, progress: bool) -> faiss.Index:
    """Add the collection to ``trained`` with its inverted lists in ``ivfdata`` (faiss
    ``OnDiskInvertedLists``: a file mapped shared, so codes go to the page cache and disk, not to
    process memory), ``block_rows`` vectors at a time read from the memory-mapped shards. Lists
    grow by doubling while filled, so they are then merged into a compact file (as faiss's
    ``merge_ondisk`` does) and the filling file is deleted."""
    ivfdata.parent.mkdir(parents=True, exist_ok=True)
    filling = ivfdata.with_name(ivfdata.name + ".fill.tmp")
    index = trained
    ivf = faiss.extract_index_ivf(index)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(filling))
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns it now
    with _stdout_to_stderr(), tqdm(total=sum(r.count for r in refs), desc="add to on-disk index", unit="vec",
                                   disable=not progress) as bar:
        for ref in refs:
            arr = load_embeddings(ref.paths(kind).emb)  # memory-mapped: one block in RAM at a time
            if arr.shape != (ref.count, dim):
                raise ValueError(f"{ref.paths(kind).emb}: shape {arr.shape}, expected ({ref.count}, {dim})")
            for lo in range(0, ref.count, block_rows):
                hi = min(ref.count, lo + block_rows)
                x = np.ascontiguousarray(arr[lo:hi], dtype=np.float32)
                index.add_with_ids(x, np.arange(ref.first_id + lo, ref.first_id + hi, dtype=np.int64))
                bar.update(hi - lo)
                del x
        compact = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
        sources = faiss.InvertedListsPtrVector()
        sources.push_back(ivf.invlists)
        compact.merge_from_multiple(sources.data(), 1, False)
        ivf.replace_invlists(compact, True)  # frees (unmaps) the filling lists
        compact.this.disown()
    filling.unlink()
    return index


def build_index(embeddings: str | Path, out_dir: str | Path, *, max_memory: int | str | None = None,
                exact_threshold: int = 100_000, target_recall: float = 0.95, n_queries: int = 1000,
                train_size: int | None = None, seed: int = 0, progress: bool = True,
                kind: str | None = None, on_disk: bool = False) -> BuildReport:
    """Build an index of every finished shard in ``embeddings`` into ``out_dir``, replacing what
    it holds only once the new index is complete (``kind``: image/text, for folders holding both).
    ``on_disk``: IVF with inverted lists in a file beside the index, memory-mapped when searched,
    built in blocks sized to ``max_memory`` (a collection larger than RAM stays searchable)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    t0 = time.time()
    coll = Collection.open(embeddings, kind)
    kind, dim = coll.kind, coll.dim
    refs = collection_refs(coll)
    n = sum(r.count for r in refs)
    budget = parse_memory(max_memory)
    plan = plan_index(n, dim, max_memory=budget, exact_threshold=exact_threshold, on_disk=on_disk)
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    notes.extend(coll.manifest.get("notes", []) if coll.foreign else [])
    if not coll.manifest.get("complete", False):
        notes.append(f"embedding collection {coll.root} is not complete "
                     f"({len(refs)} of {coll.manifest.get('num_shards')} shards finished)")
    nq = min(n_queries, max(1, n // 10))
    query_ids = sample_ids(n, nq, rng)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "ivf":
        assert plan.nlist is not None
        ntrain = train_size or min(n - nq, max(40 * plan.nlist, 20_000))
        if on_disk and budget is not None and train_size is None:  # the sample is the largest array built
            ntrain = min(ntrain, max(4 * plan.nlist, (budget - plan.est_bytes) // (4 * dim * 4)))
        train_ids = sample_ids(n, ntrain, rng, exclude=query_ids)
        xt = vectors_at(refs, kind, train_ids)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 15  # k-means converges well before faiss's 25 on embedding data
        if progress:
            print(f"training {plan.factory} on {len(xt)} vectors", flush=True)
        index.train(xt)
        del xt
    if not on_disk:
        for ref in tqdm(refs, desc="add to index", unit="shard", disable=not progress):
            index.add(shard_vectors(ref, kind, dim))
        nprobe, recall, table, nq = _measure_and_tune(index, refs, kind, dim, n, plan.nlist, target_recall, nq,
                                                      rng, progress, query_ids=query_ids)
    out = Path(out_dir)
    with writer_lock(out):
        strays = remove_strays(out)
        if strays:
            notes.append(f"removed {len(strays)} leftover file(s) of an interrupted run (e.g. {strays[0]})")
        old = read_json(out / INFO_FILE) if (out / INFO_FILE).is_file() else {}
        if old.get("backend") == "milvus":
            notes.append(f"replaces a Milvus-backed index: collection {old.get('collection')} at {old.get('uri')} "
                         "is left in place")
        gen = next_generation(out)
        faiss_rel, meta_rel = f"g{gen:06d}/{INDEX_FILE}", f"{META_DIR}/part-{gen:06d}.parquet"
        ivf_rel = None
        if on_disk:
            ivf_rel = f"g{gen:06d}/{IVFDATA_FILE}"
            index = _fill_on_disk(index, refs, kind, dim, out / ivf_rel, _block_rows(budget, plan), progress)
            nprobe, recall, table, nq = _measure_and_tune(index, refs, kind, dim, n, plan.nlist, target_recall, nq,
                                                          rng, progress, query_ids=query_ids)
        if plan.kind == "ivf" and recall < target_recall:
            notes.append(f"target recall@10 {target_recall} not reached with {plan.codes} codes "
                         f"(best {recall:.3f} at nprobe={nprobe}); allow more memory for finer codes")
        nbytes = _write_index_file(index, out / faiss_rel) + ((out / ivf_rel).stat().st_size if ivf_rel else 0)
        if on_disk:
            write_metadata_streaming(refs, kind, out / meta_rel)
        else:
            write_parquet(metadata_table(refs, kind), out / meta_rel)
        info = {
            "format": INDEX_FORMAT, "kind": kind, "type": plan.kind, "factory": plan.factory,
            "metric": "inner_product", "dim": dim, "ntotal": int(index.ntotal),
            "params": {"nlist": plan.nlist, "codes": plan.codes, "nprobe": nprobe,
                       "efSearch": (max(64, 2 * nprobe) if nprobe else None), "on_disk": on_disk},
            "exact_threshold": exact_threshold, "max_memory": parse_memory(max_memory),
            "target_recall": target_recall, "recall_at_10": recall, "recall_queries": nq,
            "tuning": table, "index_bytes": nbytes, "estimated_bytes": plan.est_bytes,
            "build_seconds": round(time.time() - t0, 3), "plan_reason": plan.reason,
            "model": coll.manifest.get("model"), "embeddings_format": coll.manifest.get("format"),
            "sources": [r.to_dict() for r in refs], "notes": notes,
            "files": {"generation": gen, "faiss": faiss_rel, "metadata": [meta_rel], "ivfdata": ivf_rel},
            "deleted": [], "count": int(index.ntotal),
        }
        write_json(out / INFO_FILE, info)  # the commit: one atomic rename
        remove_strays(out)  # the superseded generation
    return BuildReport(str(out), plan.to_dict(), int(index.ntotal), int(index.ntotal), recall, nprobe, nbytes,
                       time.time() - t0, table, notes)


def add_to_index(embeddings: str | Path, index_dir: str | Path, *, target_recall: float | None = None,
                 n_queries: int = 1000, seed: int = 0, progress: bool = True) -> BuildReport:
    """Add the finished shards of ``embeddings`` that the index does not hold yet; re-measure
    recall (and re-tune nprobe) over the grown collection. The grown index and a metadata part
    with the new rows are written beside the live ones and committed by renaming ``index.json``."""
    t0 = time.time()
    out = Path(index_dir)
    read_index_info(out)  # a clear error before anything is created or locked
    with writer_lock(out):
        notes: list[str] = []
        strays = remove_strays(out)
        if strays:
            notes.append(f"removed {len(strays)} leftover file(s) of an interrupted run (e.g. {strays[0]})")
        info = read_index_info(out)
        kind, dim = info["kind"], info["dim"]
        coll = Collection.open(embeddings, kind)
        if coll.kind != kind or coll.dim != dim:
            raise ValueError(f"{coll.root} holds {coll.kind} embeddings of dim {coll.dim}, the index at {out} "
                             f"{kind} embeddings of dim {dim}")
        old_hash = (info.get("model") or {}).get("weights_sha256")
        new_hash = (coll.manifest.get("model") or {}).get("weights_sha256")
        if old_hash and new_hash and old_hash != new_hash:
            raise ValueError(f"{coll.root} was embedded with different model weights than the index at {out} "
                             f"({new_hash[:12]} vs {old_hash[:12]}); rebuild the index instead")
        refs = [ShardRef(**r) for r in info["sources"]]
        have = {(r.dir, r.name) for r in refs}
        ntotal = int(info["ntotal"])
        new = collection_refs(coll, first_id=ntotal, exclude=have)
        if not new:
            return BuildReport(str(out), {"kind": info["type"], "factory": info["factory"]}, ntotal, 0,
                               info.get("recall_at_10"), info["params"].get("nprobe"), int(info["index_bytes"]),
                               time.time() - t0, info.get("tuning", []), notes + ["no new shards: index unchanged"])
        if info.get("backend") == "milvus":
            target = target_recall if target_recall is not None else float(info.get("target_recall", 0.95))
            return add_milvus(out, info, refs, new, kind, dim, target=target, n_queries=n_queries, seed=seed,
                              progress=progress, notes=notes, t0=t0)
        if info["params"].get("on_disk"):
            raise ValueError(f"{out} is an on-disk FAISS index: --add is not supported for it; "
                             "rebuild it (without --add) over the grown collection")
        files = live_files(info)
        index = faiss.read_index(str(out / files["faiss"]))
        if index.ntotal != ntotal:
            raise ValueError(f"{out / files['faiss']} holds {index.ntotal} vectors but index.json says {ntotal}")
        for ref in tqdm(new, desc="add to index", unit="shard", disable=not progress):
            index.add(shard_vectors(ref, kind, dim))
        refs += new
        n = int(index.ntotal)
        target = target_recall if target_recall is not None else float(info.get("target_recall", 0.95))
        rng = np.random.default_rng(seed)
        nlist = info["params"].get("nlist")
        missing = [r for r in refs if not r.paths(kind).emb.is_file()]
        if missing:
            nprobe, recall, table = info["params"].get("nprobe"), None, []
            nq = 0
            notes.append(f"recall not re-measured: {len(missing)} source shards are gone (e.g. {missing[0].dir})")
            if nprobe:
                set_search_params(index, nprobe)
        else:
            nprobe, recall, table, nq = _measure_and_tune(index, refs, kind, dim, n, nlist, target,
                                                          min(n_queries, max(1, n // 10)), rng, progress)
        if info["type"] == "flat" and n > int(info.get("exact_threshold") or 0):
            notes.append(f"the exact index now holds {n} vectors (> threshold {info.get('exact_threshold')}); "
                         "rebuild without --add for an approximate one")
        gen = next_generation(out)
        faiss_rel, meta_rel = f"g{gen:06d}/{INDEX_FILE}", f"{META_DIR}/part-{gen:06d}.parquet"
        nbytes = _write_index_file(index, out / faiss_rel)
        write_parquet(metadata_table(new, kind), out / meta_rel)
        info.update({"ntotal": n, "sources": [r.to_dict() for r in refs], "index_bytes": nbytes,
                     "count": n - len(info.get("deleted", [])),
                     "recall_at_10": recall, "recall_queries": nq, "target_recall": target, "tuning": table,
                     "notes": list(info.get("notes", [])) + notes,
                     "files": {"generation": gen, "faiss": faiss_rel, "metadata": list(files["metadata"]) + [meta_rel]}})
        info["params"]["nprobe"] = nprobe
        info["params"]["efSearch"] = max(64, 2 * nprobe) if nprobe else None
        write_json(out / INFO_FILE, info)  # the commit: one atomic rename
        remove_strays(out)
    return BuildReport(str(out), {"kind": info["type"], "factory": info["factory"]}, n, n - ntotal, recall,
                       nprobe, nbytes, time.time() - t0, table, notes)


@dataclass
class LoadedIndex:
    """A FAISS index ready to search (a :class:`.backend.SearchBackend`): faiss index (search
    parameters applied), metadata, info. Deleted ids are skipped by an id selector at search time
    (their vectors stay in the file until the next build)."""

    index: faiss.Index
    metadata: pa.Table
    info: dict[str, Any]
    path: Path
    mmap: bool
    deleted: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self._params: Any = None
        if self.deleted:
            ids = np.array(sorted(self.deleted), dtype=np.int64)
            batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            sel = faiss.IDSelectorNot(batch)
            if self.info["type"] == "ivf":
                p = self.info["params"]
                params = faiss.SearchParametersIVF(sel=sel, nprobe=int(p["nprobe"] or 1))
                q = faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer)
                if isinstance(q, faiss.IndexHNSW):
                    params.quantizer_params = qp = faiss.SearchParametersHNSW(
                        efSearch=int(p.get("efSearch") or max(64, 2 * int(p["nprobe"] or 1))))
                    self._keep_qp = qp
            else:
                params = faiss.SearchParameters(sel=sel)
            self._params, self._keep = params, (ids, batch, sel)  # the selector does not own what it points to

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def count(self) -> int:
        return self.ntotal - len(self.deleted)

    def has(self, item_id: int) -> bool:
        return 0 <= item_id < self.ntotal and item_id not in self.deleted

    def close(self) -> None:
        """Nothing to release (the Milvus backend has a connection)."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.info["dim"]:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.info['dim']}")
        if self._params is not None:
            return self.index.search(q, min(k, self.ntotal), params=self._params)
        return self.index.search(q, min(k, self.ntotal))

    def _check(self, item_id: int) -> None:
        if not self.has(item_id):
            raise KeyError(f"unknown item id {item_id} (index holds ids 0..{self.ntotal - 1}"
                           + (", some deleted)" if self.deleted else ")"))

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (for compressed codes: decoded) vector of ``item_id``."""
        self._check(item_id)
        return self.index.reconstruct(int(item_id))

    def row(self, item_id: int) -> dict[str, Any]:
        self._check(item_id)
        return self.metadata.slice(item_id, 1).to_pylist()[0]

    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        return self.metadata.take(pa.array(ids, pa.int64())).to_pylist()


MMAP_AUTO_BYTES = 1 << 30


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads for searches made by the calling thread. OpenMP's thread count is
    per thread: a thread started later (a server's request workers) gets the process default,
    every core, whatever the main thread set. Concurrent requests on a 2-core machine each
    searching on 2 threads spun against each other and the encoder: a 100k-vector flat index
    answered 56 queries/s on 2 cores from one caller, 72/s on 1 core with 1 thread
    (benchmarks/serve_load.py)."""
    faiss.omp_set_num_threads(int(threads))


def load_index(index_dir: str | Path, mmap: bool | None = None) -> "SearchBackend":
    """Load an index directory: FAISS (:class:`LoadedIndex`) or, when ``index.json`` says
    ``backend: milvus``, a connection to its collection (:class:`.milvus.MilvusIndex`; close it).
    ``mmap=None`` memory-maps FAISS files over 1 GiB (codes stay on disk, paged in on demand);
    on-disk indexes always read their inverted lists from disk - read-only: :func:`add_to_index`
    loads its own writable copy.
    A writer committing meanwhile may delete the generation just read: then read again."""
    for attempt in range(3):
        try:
            return _load_index(Path(index_dir), mmap)
        except FileNotFoundError:
            if attempt == 2 or not (Path(index_dir) / INFO_FILE).is_file():
                raise
    raise AssertionError("unreachable")


def _load_index(d: Path, mmap: bool | None) -> "SearchBackend":
    info = read_index_info(d)
    if info.get("backend") == "milvus":
        return MilvusIndex(d, info)
    files = live_files(info)
    path = d / files["faiss"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (named in {d / INFO_FILE})")
    if mmap is None:
        mmap = path.stat().st_size >= MMAP_AUTO_BYTES
    flags = 0
    if info["params"].get("on_disk"):
        mmap, flags = True, faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists file beside it, memory-mapped
        if not (d / files["ivfdata"]).is_file():
            raise FileNotFoundError(f"{d / files['ivfdata']} is missing (named in {d / INFO_FILE})")
    elif mmap:
        flags = faiss.IO_FLAG_MMAP_IFC if info["type"] == "flat" else faiss.IO_FLAG_MMAP
    with _stdout_to_stderr() if flags == faiss.IO_FLAG_ONDISK_SAME_DIR else contextlib.nullcontext():
        index = faiss.read_index(str(path), flags)
    if index.ntotal != info["ntotal"]:
        raise ValueError(f"{path} holds {index.ntotal} vectors but {INFO_FILE} says {info['ntotal']}")
    if info["type"] == "ivf":
        set_search_params(index, info["params"]["nprobe"], info["params"].get("efSearch"))
        faiss.extract_index_ivf(index).make_direct_map()  # for reconstruct (search by result)
    meta = load_metadata_parts(d, list(files["metadata"]))
    if meta.num_rows != index.ntotal:
        raise ValueError(f"{d}: metadata has {meta.num_rows} rows but the index holds {index.ntotal} vectors")
    return LoadedIndex(index, meta, info, d, bool(mmap), frozenset(int(i) for i in info.get("deleted", [])))


def delete_from_index(index_dir: str | Path, ids: Iterable[int]) -> dict[str, Any]:
    """Delete items by id. Milvus: the rows are deleted. FAISS: the ids are recorded in
    ``index.json`` and every search skips them (vectors and metadata stay in the files until
    the next build). Returns ``{"deleted": [...], "not_found": [...], "count": live items}``."""
    out = Path(index_dir)
    read_index_info(out)
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise ValueError("no ids to delete")
    with writer_lock(out):
        remove_strays(out)
        info = read_index_info(out)
        ntotal = int(info["ntotal"])
        bad = [i for i in ids if not 0 <= i < ntotal]
        if bad:
            raise ValueError(f"unknown item id(s) {bad[:5]}: the index at {out} holds ids 0..{ntotal - 1}")
        if info.get("backend") == "milvus":
            done, absent = delete_milvus(out, info, ids)
        else:
            prev = {int(i) for i in info.get("deleted", [])}
            done, absent = [i for i in ids if i not in prev], [i for i in ids if i in prev]
            info["deleted"] = sorted(prev | set(done))
            info["count"] = ntotal - len(info["deleted"])
            write_json(out / INFO_FILE, info)  # the commit: one atomic rename
    return {"deleted": done, "not_found": absent, "count": int(info["count"])}


__all__ = ["build_index", "add_to_index", "LoadedIndex", "MMAP_AUTO_BYTES", "load_index", "delete_from_index",
           "human_bytes", "parse_memory", "choose_nlist", "plan_index", "recall_at_k", "set_search_params",
           "INFO_FILE", "read_index_info", "remove_strays"]
