"""De-duplication: exact (decoded pixels and/or normalised caption) then near-duplicate
(image-embedding cosine >= threshold, FAISS range search).

Keepers are chosen deterministically, independent of how shards are spread over ranks: pairs
are visited in sorted key order (ties: pool order). Exact groups keep their first member. Near
duplicates are clustered greedily: the first unclaimed pair keeps itself and claims every
unclaimed later pair within the threshold, so every dropped pair is within the threshold of a
kept one (connected components would chain a~b~c and drop c although it is far from a).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..inference import batched
from ..utils import atomic_open
from .embed import Embedder, normalize_rows, read_embeddings
from .hashing import caption_hash, pixel_hash
from .neighbors import choose_index, range_pairs
from .records import Unit
from .runner import Decision, Item, Step, StepRun

EXACT_MODES = ("image", "pair", "caption", "none")
KEEP, EXACT, NEAR = 0, 1, 2


class DedupStep(Step):
    name = "dedup"
    needs_samples = False
    batch_size = 512

    def __init__(self, *, exact: str = "image", threshold: float | None = 0.95, embedder: Embedder | None = None,
                 embeddings: str | Path | None = None, index: str = "auto", nprobe: int = 16, flat_max: int = 30000,
                 embed_batch_size: int = 64, top_n: int = 20) -> None:
        if exact not in EXACT_MODES:
            raise ValueError(f"exact must be one of {EXACT_MODES}, got {exact!r}")
        if embedder is not None and embeddings is not None:
            raise ValueError("give either a model or an embeddings folder for near-duplicates, not both")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if embeddings is not None and not (Path(embeddings) / "img_emb").is_dir():
            raise FileNotFoundError(f"embeddings folder {embeddings} has no img_emb/ (run clipforge embed first)")
        self.exact, self.embedder, self.embeddings = exact, embedder, embeddings
        self.threshold = threshold if (embedder is not None or embeddings is not None) else None
        self.index, self.nprobe, self.flat_max = index, nprobe, flat_max
        self.embed_batch_size, self.top_n = embed_batch_size, top_n
        self.plan: dict[str, dict[str, np.ndarray]] = {}
        self.g: dict[str, np.ndarray] = {}

    def config(self) -> dict[str, Any]:
        near = None
        if self.embedder is not None:
            near = f"model:{self.embedder.name}"
        elif self.embeddings is not None:
            near = f"embeddings:{Path(self.embeddings).resolve()}"
        return {"exact": self.exact, "near": near, "threshold": self.threshold, "index": self.index,
                "nprobe": self.nprobe, "flat_max": self.flat_max}

    # -- pass 1: hashes (+ embeddings) -----------------------------------------------------
    def _hash_unit(self, run: StepRun, unit: Unit, bar: tqdm) -> dict[str, np.ndarray]:
        keys, bad, ph, ch = [], [], [], []
        emb_rows: list[np.ndarray] = []
        dim = 0
        for chunk in batched(run.iter_items(unit, decode=True, bar=bar), self.embed_batch_size):
            good = [it for it in chunk if it.sample is not None]
            if self.embedder is not None and good:
                e = np.asarray(self.embedder.embed_images([it.sample.image for it in good]), dtype=np.float32)
                dim = e.shape[1]
                rows = iter(e)
            for it in chunk:
                keys.append(it.record.key)
                if it.sample is None:
                    bad.append(it.bad.reason if it.bad is not None else "decode_error")
                    ph.append("")
                    ch.append("")
                    if self.embedder is not None:
                        emb_rows.append(None)  # type: ignore[arg-type]
                    continue
                bad.append("")
                ph.append(pixel_hash(it.sample.image))
                ch.append(caption_hash(it.sample.captions))
                if self.embedder is not None:
                    emb_rows.append(next(rows))
        out = {"keys": np.array(keys, dtype=str), "bad": np.array(bad, dtype=str),
               "pixel": np.array(ph, dtype=str), "caption": np.array(ch, dtype=str)}
        if self.embedder is not None:
            emb = np.zeros((len(keys), dim), dtype=np.float16)
            for i, r in enumerate(emb_rows):
                if r is not None:
                    emb[i] = r
            out["emb"] = emb
        return out

    def prepare(self, run: StepRun) -> None:
        load = run.map_units("hash", self._hash_unit, desc="dedup: hashing" + (" + embedding" if self.embedder else ""))
        self.g = run.once("plan", lambda: self._plan(run, load))
        data_len = [int(n) for n in self.g["sizes"]]
        keys_all = self.g["keys"]
        bad_all = self.g["bad"]
        pos = 0
        for u, n in zip(run.units, data_len):
            self.plan[u.name] = {"keys": keys_all[pos:pos + n], "bad": bad_all[pos:pos + n],
                                 "code": self.g["code"][pos:pos + n], "dup_of": self.g["dup_of"][pos:pos + n],
                                 "sim": self.g["sim"][pos:pos + n]}
            pos += n

    def _plan(self, run: StepRun, load) -> dict[str, np.ndarray]:
        data = [load(u) for u in run.units]
        keys = np.concatenate([d["keys"] for d in data]).astype(str)
        bad = np.concatenate([d["bad"] for d in data]).astype(str)
        n = len(keys)
        code = np.zeros(n, dtype=np.int8)
        dup_of = np.full(n, -1, dtype=np.int64)
        sim = np.full(n, np.nan, dtype=np.float32)
        good = np.flatnonzero(bad == "")
        order = good[np.argsort(keys[good], kind="stable")]
        # exact duplicates: first member of each hash group (in key order) stays
        if self.exact != "none" and len(order):
            pix = np.concatenate([d["pixel"] for d in data]).astype(str)
            cap = np.concatenate([d["caption"] for d in data]).astype(str)
            ek = {"image": pix, "caption": cap, "pair": np.char.add(np.char.add(pix, ":"), cap)}[self.exact]
            first: dict[str, int] = {}
            for i in order:
                j = first.setdefault(str(ek[i]), int(i))
                if j != i:
                    code[i], dup_of[i], sim[i] = EXACT, j, 1.0
        missing = 0
        index_kind = ""
        if self.threshold is not None:
            survivors = order[code[order] == KEEP]
            if self.embedder is not None:
                emb_all = np.concatenate([d["emb"] for d in data]).astype(np.float32)
                vecs, have = emb_all[survivors], np.ones(len(survivors), dtype=bool)
            else:
                ekeys, evecs = read_embeddings(self.embeddings)
                row = {k: i for i, k in enumerate(ekeys)}
                rows = np.array([row.get(str(keys[i]), -1) for i in survivors], dtype=np.int64)
                have = rows >= 0
                missing = int((~have).sum())
                vecs = evecs[rows[have]] if have.any() else np.zeros((0, evecs.shape[1]), np.float32)
            cand = survivors[have]
            vecs = normalize_rows(vecs) if len(vecs) else vecs
            index_kind = choose_index(len(cand), self.index, self.flat_max)
            claimed = np.full(len(cand), -1, dtype=np.int64)
            for p, nbrs, sims in range_pairs(vecs, self.threshold, index=self.index, nprobe=self.nprobe,
                                             flat_max=self.flat_max, progress=run.opts.progress):
                if claimed[p] >= 0:
                    continue
                later = (nbrs > p)
                nbrs, sims = nbrs[later], sims[later]
                free = claimed[nbrs] < 0
                claimed[nbrs[free]] = p
                code[cand[nbrs[free]]] = NEAR
                dup_of[cand[nbrs[free]]] = cand[p]
                sim[cand[nbrs[free]]] = sims[free]
        return {"keys": keys, "bad": bad, "code": code, "dup_of": dup_of, "sim": sim,
                "sizes": np.array([len(d["keys"]) for d in data], dtype=np.int64),
                "missing_embeddings": np.array(missing), "index_kind": np.array(index_kind)}

    # -- pass 2: write ---------------------------------------------------------------------
    def decide(self, run: StepRun, unit: Unit, items: list[Item]) -> list[Decision]:
        p = self.plan[unit.name]
        keys_all = self.g["keys"]
        out = []
        for it in items:
            i = it.index
            if i >= len(p["keys"]) or p["keys"][i] != it.record.key:
                raise RuntimeError(f"{unit.name}: record {i} is {it.record.key!r} but the hashing pass saw "
                                   f"{p['keys'][i] if i < len(p['keys']) else 'nothing'!r}: the input changed; re-run with --force")
            if p["bad"][i]:
                out.append(Decision(False, str(p["bad"][i])))
            elif p["code"][i] == EXACT:
                out.append(Decision(False, "exact_duplicate", {"duplicate_of": str(keys_all[p["dup_of"][i]])}))
            elif p["code"][i] == NEAR:
                out.append(Decision(False, "near_duplicate", {"duplicate_of": str(keys_all[p["dup_of"][i]]),
                                                              "similarity": round(float(p["sim"][i]), 6)}))
            else:
                out.append(Decision(True))
        return out

    # -- report ----------------------------------------------------------------------------
    def global_outputs(self, run: StepRun) -> list:
        return [run.out / "clusters.jsonl"]

    def summarize(self, run: StepRun, report: dict[str, Any]) -> dict[str, Any]:
        import json

        g = self.g
        keys, code, dup_of = g["keys"], g["code"], g["dup_of"]
        out: dict[str, Any] = {"exact": self.exact, "threshold": self.threshold}
        clusters: list[dict[str, Any]] = []
        for kind, c in (("exact", EXACT), ("near", NEAR)):
            members = np.flatnonzero(code == c)
            groups: dict[int, list[int]] = {}
            for m in members:
                groups.setdefault(int(dup_of[m]), []).append(int(m))
            sizes = Counter(len(v) + 1 for v in groups.values())
            out[kind] = {"clusters": len(groups), "dropped": int(len(members)),
                         "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())}}
            for keeper, ms in sorted(groups.items(), key=lambda kv: (-len(kv[1]), str(keys[kv[0]]))):
                clusters.append({"kind": kind, "kept": str(keys[keeper]), "duplicates": [str(keys[m]) for m in ms]})
        out["largest_clusters"] = sorted(clusters, key=lambda c: -len(c["duplicates"]))[: self.top_n]
        if self.threshold is not None:
            out["near"]["index"] = str(g["index_kind"])
            out["near"]["missing_embeddings"] = int(g["missing_embeddings"])
        with atomic_open(run.out / "clusters.jsonl", "w", encoding="utf-8") as f:
            for c in clusters:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        out["clusters_file"] = str(run.out / "clusters.jsonl")
        return out
