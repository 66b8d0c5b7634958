"""Evaluation-set decontamination (``split``): drop training pairs whose image is an exact
(same decoded pixels) or near (image-embedding cosine >= threshold) duplicate of an image in
any evaluation set, and report the overlap per evaluation set, as in the paper's data overlap
analysis (Section 5): how many eval images have a duplicate in the training data, and which.

Evaluation sets: image folders (searched recursively), CSV/TSV/JSONL manifests with an image
column, WebDataset shards or plain image tars, ``.npz`` with an ``images`` array, or
``builtin:scenes-<task>``. Unreadable evaluation images are counted and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.files import walk_files
from ..data.labelled import FOLDER_IMAGE_EXTS, open_labelled
from ..data.remote import is_remote
from ..data.shards import IMAGE_EXTS, read_shard, resolve_shards
from ..data.tables import IMAGE_COLUMNS, find_column, is_manifest, read_rows
from ..inference import batched
from ..preprocess import ImageLoadError, load_image
from ..utils import atomic_open, text_name
from .embed import Embedder
from .hashing import pixel_hash
from .neighbors import best_match
from .records import Unit
from .runner import Decision, Item, Step, StepRun

logger = logging.getLogger("clipforge.curation")


def eval_set_name(spec: str) -> str:
    if spec.startswith("builtin:"):
        return spec[len("builtin:"):].partition("?")[0]
    p = Path(spec.rstrip("/"))
    name = p.name
    for suf in (".tar", ".npz", ".csv", ".tsv", ".jsonl"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return name or "eval"


def check_eval_set(spec: str) -> None:
    """Fail before any work when an evaluation set does not exist."""
    if spec.startswith("builtin:"):
        return
    if is_manifest(spec) or spec.lower().endswith(".npz"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"evaluation set not found: {spec}")
        return
    if Path(spec).is_dir():
        return
    resolve_shards(spec)  # raises FileNotFoundError naming the pattern


def iter_eval_images(spec: str) -> Iterator[tuple[str, Image.Image | None, str]]:
    """``(key, image or None, error)`` for every image of an evaluation set."""
    if spec.startswith("builtin:"):
        ds = open_labelled(spec)
        for i in range(len(ds)):
            yield (ds.keys[i] if ds.keys else str(i)), ds[i], ""
        return
    p = Path(spec)
    if p.is_dir() and not any(x.name.lower().endswith(".tar") for x in p.iterdir() if x.is_file()):
        files = walk_files(p, FOLDER_IMAGE_EXTS)
        if not files:
            raise ValueError(f"evaluation folder {p} holds no images ({', '.join(FOLDER_IMAGE_EXTS)})")
        for f in files:
            yield from _load(text_name(f.relative_to(p).as_posix()), f)
        return
    if spec.lower().endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"{p}: no 'images' array; arrays found: {z.files}")
            images = z["images"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"{p}: 'images' must be uint8 NHWC or NHW, got {images.dtype} {images.shape}")
        for i, a in enumerate(images):
            yield f"{p.name}[{i}]", Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a), ""
        return
    if is_manifest(spec):
        columns, rows = read_rows(p)
        col = find_column(p, columns, IMAGE_COLUMNS, "image")
        for lineno, r in rows:
            rel = str(r.get(col) or "").strip()
            if not rel:
                yield f"{p.name}:{lineno}", None, "missing_image"
                continue
            f = Path(rel) if Path(rel).is_absolute() else p.parent / rel
            yield from _load(rel, f)
        return
    for shard in resolve_shards(spec):
        for rec in read_shard(shard, frozenset(IMAGE_EXTS)):
            if rec.error:
                yield rec.key, None, rec.error
                continue
            ext = next((e for e in IMAGE_EXTS if rec.files.get(e) is not None), None)
            if ext is None:
                continue  # a caption-only member group: not an image
            try:
                yield rec.key, load_image(rec.files[ext], name=f"{shard}:{rec.key}.{ext}"), ""
            except ImageLoadError:
                yield rec.key, None, "decode_error"


def _load(key: str, path: Path) -> Iterator[tuple[str, Image.Image | None, str]]:
    try:
        yield key, load_image(path), ""
    except ImageLoadError:
        yield key, None, "decode_error" if path.exists() else "missing_file"


def _identity(spec: str) -> dict[str, Any]:
    p = Path(spec)
    if p.is_file():
        st = p.stat()
        return {"spec": spec, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        return {"spec": spec, "files": sum(1 for _ in p.rglob("*")), "mtime_ns": p.stat().st_mtime_ns}
    if spec.startswith("builtin:"):
        return {"spec": spec}
    return {"spec": spec, "shards": [(s,) if is_remote(s) else (s, os.stat(s).st_size, os.stat(s).st_mtime_ns)
                                     for s in resolve_shards(spec)]}


class DecontamStep(Step):
    name = "split"

    def __init__(self, eval_sets: list[str], *, embedder: Embedder | None = None, threshold: float = 0.95,
                 batch_size: int = 64, max_examples: int = 20) -> None:
        if not eval_sets:
            raise ValueError("give at least one evaluation set")
        for spec in eval_sets:
            check_eval_set(spec)
        names = [eval_set_name(s) for s in eval_sets]
        self.names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.specs, self.embedder, self.threshold = list(eval_sets), embedder, float(threshold)
        self.batch_size, self.max_examples = batch_size, max_examples
        self.ev: dict[str, np.ndarray] = {}
        self._hash_index: dict[str, list[int]] = {}

    def config(self) -> dict[str, Any]:
        return {"eval_sets": [_identity(s) for s in self.specs],
                "model": self.embedder.name if self.embedder is not None else None,
                "threshold": self.threshold if self.embedder is not None else None}

    # -- eval index (rank 0 builds it once) --------------------------------------------------
    def _build(self, run: StepRun) -> dict[str, np.ndarray]:
        set_ids, keys, hashes, bad_counts, totals = [], [], [], [], []
        embs: list[np.ndarray] = []
        for s, (name, spec) in enumerate(zip(self.names, self.specs)):
            n_bad = n = 0
            bar = tqdm(desc=f"split: eval set {name}", unit="img", disable=not run.opts.progress)
            for chunk in batched(iter_eval_images(spec), self.batch_size):
                good = [(k, im) for k, im, err in chunk if im is not None]
                n += len(chunk)
                n_bad += len(chunk) - len(good)
                for k, im in good:
                    set_ids.append(s)
                    keys.append(k)
                    hashes.append(pixel_hash(im))
                if self.embedder is not None and good:
                    embs.append(np.asarray(self.embedder.embed_images([im for _, im in good]), dtype=np.float32))
                bar.update(len(chunk))
            bar.close()
            if n_bad:
                logger.warning("evaluation set %s: %d of %d images unreadable (skipped)", name, n_bad, n)
            if n == n_bad:
                raise ValueError(f"evaluation set {spec}: no readable image ({n} found)")
            bad_counts.append(n_bad)
            totals.append(n)
        out = {"set": np.array(set_ids, dtype=np.int64), "keys": np.array(keys, dtype=str),
               "hash": np.array(hashes, dtype=str), "bad": np.array(bad_counts, dtype=np.int64),
               "total": np.array(totals, dtype=np.int64)}
        if self.embedder is not None:
            out["emb"] = np.concatenate(embs)
        return out

    def prepare(self, run: StepRun) -> None:
        self.ev = run.once("eval_sets", lambda: self._build(run))
        self._hash_index = {}
        for i, h in enumerate(self.ev["hash"]):
            self._hash_index.setdefault(str(h), []).append(i)
        self._per_set = [np.flatnonzero(self.ev["set"] == s) for s in range(len(self.names))]

    # -- writing pass ----------------------------------------------------------------------
    def decide(self, run: StepRun, unit: Unit, items: list[Item]) -> list[Decision]:
        ev = self.ev
        matches: list[dict[int, dict[str, Any]]] = [{} for _ in items]
        for m, it in zip(matches, items):
            for j in self._hash_index.get(pixel_hash(it.sample.image), []):
                s = int(ev["set"][j])
                m.setdefault(s, {"eval_set": self.names[s], "eval_key": str(ev["keys"][j]), "similarity": 1.0,
                                 "exact": True})
        if self.embedder is not None:
            q = np.asarray(self.embedder.embed_images([it.sample.image for it in items]), dtype=np.float32)
            for s, rows in enumerate(self._per_set):
                idx, sim = best_match(q, ev["emb"][rows])
                for m, j, v in zip(matches, idx, sim):
                    if j >= 0 and v >= self.threshold and s not in m:
                        m[s] = {"eval_set": self.names[s], "eval_key": str(ev["keys"][rows[j]]),
                                "similarity": round(float(v), 6), "exact": False}
        out = []
        for m in matches:
            if not m:
                out.append(Decision(True))
                continue
            found = [m[s] for s in sorted(m)]
            out.append(Decision(False, "eval_duplicate", {"eval_set": found[0]["eval_set"],
                                                          "eval_key": found[0]["eval_key"], "matches": found}))
        return out

    # -- report ----------------------------------------------------------------------------
    def global_outputs(self, run: StepRun) -> list:
        return [run.out / "overlap.jsonl"]

    def summarize(self, run: StepRun, report: dict[str, Any]) -> dict[str, Any]:
        per = {n: {"eval_images": int(self.ev["total"][s]), "unreadable_eval_images": int(self.ev["bad"][s]),
                   "train_pairs_matching": 0, "exact": 0, "near": 0, "eval_images_with_duplicates": set(), "examples": []}
               for s, n in enumerate(self.names)}
        with atomic_open(run.out / "overlap.jsonl", "w", encoding="utf-8") as f:
            for u, r in run.iter_decisions():
                for m in r.get("matches", []):
                    d = per[m["eval_set"]]
                    d["train_pairs_matching"] += 1
                    d["exact" if m["exact"] else "near"] += 1
                    d["eval_images_with_duplicates"].add(m["eval_key"])
                    rec = {"train_key": r["key"], "shard": u.name, **m}
                    if len(d["examples"]) < self.max_examples:
                        d["examples"].append(rec)
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        for d in per.values():
            n_dup = len(d.pop("eval_images_with_duplicates"))
            d["eval_images_with_duplicates"] = n_dup
            readable = d["eval_images"] - d["unreadable_eval_images"]
            d["overlap_fraction"] = round(n_dup / readable, 6) if readable else 0.0
        return {"threshold": self.threshold if self.embedder is not None else None,
                "mode": "exact+near" if self.embedder is not None else "exact only (no --model)",
                "eval_sets": per, "overlap_file": str(run.out / "overlap.jsonl")}
