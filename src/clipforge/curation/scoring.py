"""Image-text similarity scores per pair (``score``) and filtering on them (``filter``), the
CLIP-score filtering LAION later applied to crawled pairs (threshold 0.28 for ViT-B/32).

``score`` writes one ``{unit}.scores.npz`` per input shard (``keys``, ``score`` = cosine of
the image and caption embeddings, the best caption's when a sample has several, NaN for
unusable samples, and ``reason`` why) plus ``scores.parquet`` when pyarrow is importable.
``filter`` reads those files by key and copies the pairs scoring >= ``min_score``.

Scores are only meaningful for the data they were computed on, and ``filter`` applies them by
key (keys like ``000000123`` repeat across datasets), so ``score`` also writes ``data.json``:
the data spec and a content fingerprint of every input (size + SHA-256 of each shard file, or
of the manifest; remote shards by name). ``filter`` recomputes it for its ``--data`` and refuses
scores of other data, and scores without ``data.json`` (written before it existed).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.remote import is_remote
from ..utils import atomic_open, read_json, write_json
from .embed import Embedder
from .records import ChunkUnit, Pool, ShardUnit, Unit
from .runner import FINISHED, Decision, Item, Step, StepRun


DATA_FILE = "data.json"


def _file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def data_fingerprint(pool: Pool) -> list[dict[str, Any]]:
    """What a pool's contents are, independent of where they live (so a moved or renamed copy
    matches): one entry per input in order. Local shards: size + SHA-256 of the file; remote
    shards: their name; manifests: rows, split and the manifest file's size + SHA-256."""
    out: list[dict[str, Any]] = []
    for u in pool.units:
        if isinstance(u, ShardUnit):
            out.append({"url": u.path} if is_remote(u.path) else _file_digest(u.path))
        elif isinstance(u, ChunkUnit):
            ident = u.identity()
            if out:  # chunks of one manifest: the manifest once
                continue
            entry = {"rows": ident.get("n"), "split": ident.get("split")}
            path = ident.get("path")
            entry.update(_file_digest(path) if path else {"spec": ident.get("spec")})
            out.append(entry)
        else:
            out.append(u.identity())
    return out


def score_summary(scores: np.ndarray) -> dict[str, Any]:
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return {"n": 0}
    q = np.percentile(s, [1, 5, 25, 50, 75, 95, 99])
    return {"n": int(len(s)), "mean": round(float(s.mean()), 5), "std": round(float(s.std()), 5),
            "min": round(float(s.min()), 5), "max": round(float(s.max()), 5),
            "percentiles": {f"p{p}": round(float(v), 5) for p, v in zip((1, 5, 25, 50, 75, 95, 99), q)}}


def pair_scores(embedder: Embedder, images: list, captions: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (best caption's cosine, mean over captions)."""
    img = np.asarray(embedder.embed_images(images), dtype=np.float32)
    flat = [c for caps in captions for c in caps]
    txt = np.asarray(embedder.embed_texts(flat), dtype=np.float32)
    owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    sims = np.einsum("nd,nd->n", img[owner], txt)
    best = np.full(len(captions), -np.inf, dtype=np.float32)
    np.maximum.at(best, owner, sims)
    mean = np.bincount(owner, weights=sims, minlength=len(captions)) / np.maximum(1, [len(c) for c in captions])
    return best, mean.astype(np.float32)


class ScoreStep(Step):
    name = "score"
    writes_shards = False

    def __init__(self, embedder: Embedder, *, batch_size: int = 64) -> None:
        self.embedder = embedder
        self.batch_size = batch_size

    def config(self) -> dict[str, Any]:
        return {"model": self.embedder.name}

    def scores_path(self, run: StepRun, unit: Unit) -> Path:
        return run.out / f"{unit.name}.scores.npz"

    def decide(self, run: StepRun, unit: Unit, items: list[Item]) -> list[Decision]:
        best, mean = pair_scores(self.embedder, [it.sample.image for it in items], [it.sample.captions for it in items])
        return [Decision(True, extra={"score": round(float(b), 6), "score_mean": round(float(m), 6),
                                      "n_captions": len(it.sample.captions)})
                for it, b, m in zip(items, best, mean)]

    def finish_unit(self, run: StepRun, unit: Unit, rows: list[dict[str, Any]]) -> dict[str, Any]:
        keys = np.array([r["key"] for r in rows], dtype=str)
        score = np.array([r.get("score", np.nan) for r in rows], dtype=np.float32)
        mean = np.array([r.get("score_mean", np.nan) for r in rows], dtype=np.float32)
        reason = np.array([r["reason"] for r in rows], dtype=str)
        with atomic_open(self.scores_path(run, unit), "wb") as f:
            np.savez(f, keys=keys, score=score, score_mean=mean, reason=reason)
        return {"scores": self.scores_path(run, unit).name}

    def unit_outputs(self, run: StepRun, unit: Unit) -> list[Path]:
        return [self.scores_path(run, unit)]

    def global_outputs(self, run: StepRun) -> list[Path]:
        return [run.out / "scores.parquet", run.out / DATA_FILE]

    def summarize(self, run: StepRun, report: dict[str, Any]) -> dict[str, Any]:
        all_scores = []
        tables = []
        for u in run.units:
            with np.load(self.scores_path(run, u), allow_pickle=False) as z:
                all_scores.append(z["score"])
                tables.append((u.name, z["keys"], z["score"], z["score_mean"]))
        out: dict[str, Any] = {"model": self.embedder.name,
                               "scores": score_summary(np.concatenate(all_scores) if all_scores else np.zeros(0))}
        listing = "".join(f"{n}\t{k}\n" for n, ks, _, _ in tables for k in ks)
        keys = hashlib.sha256(listing.encode("utf-8", "surrogatepass"))
        write_json(run.out / DATA_FILE, {"data": run.pool.spec, "inputs": data_fingerprint(run.pool),
                                         "count": int(sum(len(ks) for _, ks, _, _ in tables)),
                                         "keys_sha256": keys.hexdigest()})
        out["data_identity"] = str(run.out / DATA_FILE)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return out
        table = pa.table({"key": [str(k) for _, ks, _, _ in tables for k in ks],
                          "shard": [n for n, ks, _, _ in tables for _ in ks],
                          "score": np.concatenate([s for _, _, s, _ in tables]) if tables else np.zeros(0, np.float32),
                          "score_mean": np.concatenate([m for _, _, _, m in tables]) if tables else np.zeros(0, np.float32)})
        with atomic_open(run.out / "scores.parquet", "wb") as f:
            pq.write_table(table, f)
        out["parquet"] = str(run.out / "scores.parquet")
        return out


class ScoreTable:
    """Scores of a finished ``score`` run, looked up per unit (same shard name) or, when the
    filtered pool's shards are named differently, through one key -> score dict."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"scores folder not found: {self.folder}")
        info_path = self.folder / "_run.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{self.folder} is not a score run (no _run.json): run `clipforge data score` first")
        info = read_json(info_path)
        if info.get("step") != "score":
            raise ValueError(f"{self.folder} holds a {info.get('step')!r} run, not scores")
        if not (self.folder / FINISHED).exists():
            raise ValueError(f"score run in {self.folder} is not finished (no {FINISHED}); finish or merge it first")
        self.fingerprint = str(info.get("fingerprint"))
        ident = self.folder / DATA_FILE
        if not ident.is_file():
            raise ValueError(f"scores in {self.folder} do not record which data they were computed on "
                             f"(written by an older clipforge): re-run `clipforge data score --force` on the data to filter")
        self.identity = read_json(ident)
        self.files = {p.name[: -len(".scores.npz")]: p for p in self.folder.glob("*.scores.npz")}
        if not self.files:
            raise FileNotFoundError(f"no *.scores.npz files in {self.folder}")
        self._global: dict[str, tuple[float, str]] | None = None

    @staticmethod
    def _load(p: Path) -> dict[str, tuple[float, str]]:
        with np.load(p, allow_pickle=False) as z:
            return {str(k): (float(s), str(r)) for k, s, r in zip(z["keys"], z["score"], z["reason"])}

    def check_data(self, pool: Pool) -> None:
        """Refuse to apply these scores to other data than they were computed on."""
        if data_fingerprint(pool) != self.identity.get("inputs"):
            raise ValueError(f"scores in {self.folder} were computed on {self.identity.get('data')!r}, not on "
                             f"--data {pool.spec!r} (contents differ): score this data with `clipforge data score`")

    def for_unit(self, name: str) -> dict[str, tuple[float, str]]:
        if name in self.files:
            return self._load(self.files[name])
        if self._global is None:
            self._global = {}
            for p in self.files.values():
                self._global.update(self._load(p))
        return self._global


class FilterStep(Step):
    name = "filter"
    needs_samples = False  # the score pass already decoded every sample (bad ones carry a reason)
    batch_size = 512

    def __init__(self, scores: ScoreTable, *, min_score: float) -> None:
        self.scores, self.min_score = scores, float(min_score)
        self._unit: str | None = None
        self._table: dict[str, tuple[float, str]] = {}

    def config(self) -> dict[str, Any]:
        return {"scores": self.scores.fingerprint, "min_score": self.min_score}

    def check_input(self, pool: Pool) -> None:
        self.scores.check_data(pool)

    def decide(self, run: StepRun, unit: Unit, items: list[Item]) -> list[Decision]:
        if self._unit != unit.name:
            self._unit, self._table = unit.name, self.scores.for_unit(unit.name)
        out = []
        for it in items:
            got = self._table.get(it.record.key)
            if got is None:
                out.append(Decision(False, "no_score"))
                continue
            s, reason = got
            if reason:
                out.append(Decision(False, reason))
            elif s >= self.min_score:
                out.append(Decision(True, extra={"score": round(s, 6)}))
            else:
                out.append(Decision(False, "low_score", {"score": round(s, 6)}))
        return out

    def summarize(self, run: StepRun, report: dict[str, Any]) -> dict[str, Any]:
        kept, low = [], []
        for _, r in run.iter_decisions():
            if "score" in r:
                (kept if r["kept"] else low).append(r["score"])
        return {"min_score": self.min_score, "scores": str(self.scores.folder),
                "kept_scores": score_summary(np.array(kept)), "dropped_scores": score_summary(np.array(low)),
                "no_score": report["dropped_by_reason"].get("no_score", 0)}
