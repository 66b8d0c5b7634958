"""Image-caption selection (CLIP_benchmark's ``image_caption_selection`` task: SugarCREPE,
Winoground): for each image choose its caption among hard negatives, and, where an instance
holds several images, for each caption choose its image.

An instance holds ``I`` images and ``T >= I`` captions; caption ``i`` belongs to image ``i`` for
``i < I``, the rest are negatives. Scores, as CLIP_benchmark 1.6.2 computes them (argmax of the
cosine similarities, so a tie goes to the lower index):

* ``text_acc`` (Winoground's text score): every image's best caption is its own;
* ``image_acc`` (image score): every caption ``i < I`` has its own image as its best; with one
  image per instance (SugarCREPE) it is 1 by construction;
* ``acc`` (group score): both.

Inputs: CLIP_benchmark's SugarCREPE layout (``ROOT/<task>.json`` = ``{id: {filename, caption,
negative_caption}}``, images in ``ROOT/val2017/``; one record per task file, dataset
``sugar_crepe/<task>``), a plain JSONL (one line per image: ``image``, ``caption``,
``negatives``, optional ``group`` (lines sharing it form one instance: their images, their
captions in line order, then their negatives) and ``type`` (the negative type, for per-type
accuracy)), or the built-in minimal pairs ``builtin:scenes-selection[?n_per_type=50&seed=0&size=64]``
(:func:`clipforge.data.scene_pairs.selection_groups`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.scene_pairs import SELECTION_TYPES, selection_groups
from ..data.scenes import parse_scenes_query, render_scene
from ..inference import embed_images
from ..models.heads import objective_of
from ..preprocess import image_transform, load_image
from .features import skippable_errors
from .zeroshot import embed_texts_length_sorted

TASK = "image_caption_selection"
#: The annotation files of CLIP_benchmark's ``sugar_crepe/<task>`` datasets.
SUGAR_CREPE_TASKS: tuple[str, ...] = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att",
                                      "swap_obj")
BUILTIN = "builtin:scenes-selection"


@dataclass
class SelectionInstance:
    """``images``: PIL images or paths; ``captions[i]`` is true of ``images[i]`` (``i < len(images)``),
    the rest are negatives. ``type``: the negative type (per-type accuracy), ``key``: names it in errors."""

    images: list[Any]
    captions: list[str]
    type: str | None = None
    key: str = ""


@dataclass
class SelectionSet:
    """A named list of instances (one record each)."""

    name: str
    instances: list[SelectionInstance]
    info: dict[str, Any] = field(default_factory=dict)


# --- scoring ------------------------------------------------------------------------------------------

def selection_correct(similarity: torch.Tensor) -> tuple[bool, bool]:
    """(text correct, image correct) of one instance's ``[I, T]`` image-caption similarities."""
    if similarity.dim() != 2 or similarity.shape[0] < 1 or similarity.shape[1] < 1:
        raise ValueError(f"similarity must be [images, captions], got {tuple(similarity.shape)}")
    g = min(similarity.shape)
    gt = torch.arange(g)
    text_ok = bool((similarity.argmax(dim=1)[:g] == gt).all())
    image_ok = bool((similarity.argmax(dim=0)[:g] == gt).all())
    return text_ok, image_ok


def _scores(flags: Sequence[tuple[bool, bool]]) -> dict[str, float]:
    t = np.array([a for a, _ in flags], dtype=np.float64)
    i = np.array([b for _, b in flags], dtype=np.float64)
    return {"image_acc": float(i.mean()), "text_acc": float(t.mean()), "acc": float((t * i).mean())}


def selection_metrics(similarities: Sequence[torch.Tensor], types: Sequence[str | None] | None = None
                      ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(``{image_acc, text_acc, acc}`` over all instances, the same per negative type with ``n``)."""
    if not similarities:
        raise ValueError("no instances to score")
    flags = [selection_correct(s) for s in similarities]
    per_type: dict[str, dict[str, float]] = {}
    if types is not None:
        for t in dict.fromkeys(x for x in types if x is not None):
            mine = [f for f, x in zip(flags, types) if x == t]
            per_type[t] = {**_scores(mine), "n": len(mine)}
    return _scores(flags), per_type


# --- readers ------------------------------------------------------------------------------------------

def _need_str(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def read_selection_jsonl(path: str | Path) -> SelectionSet:
    """A plain JSONL file (module docstring); image paths are relative to the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image-caption selection file not found: {p}")
    groups: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
    order: list[Any] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with image, caption, negatives")
        _need_str(row.get("image"), where, "image")
        _need_str(row.get("caption"), where, "caption")
        negs = row.get("negatives", [])
        if isinstance(negs, str):
            negs = [negs]
        if not isinstance(negs, list) or not all(isinstance(x, str) and x.strip() for x in negs):
            raise ValueError(f"{where}: 'negatives' must be a list of non-empty strings, got {negs!r}")
        row["negatives"] = negs
        if row.get("type") is not None and not isinstance(row["type"], str):
            raise ValueError(f"{where}: 'type' must be a string, got {row['type']!r}")
        gid = ("group", json.dumps(row["group"])) if row.get("group") is not None else ("line", n)
        if gid not in groups:
            groups[gid] = []
            order.append(gid)
        groups[gid].append((n, row))
    instances = []
    for gid in order:
        rows = groups[gid]
        first = rows[0][0]
        types = {r.get("type") for _, r in rows}
        if len(types) > 1:
            raise ValueError(f"{p}:{first}: group {gid[1]} mixes types {sorted(map(str, types))}")
        captions = [r["caption"] for _, r in rows]
        if len(set(captions)) < len(captions):
            raise ValueError(f"{p}:{first}: group {gid[1]} gives two images the same caption")
        for _, r in rows:
            captions += [x for x in r["negatives"] if x not in captions]
        if len(captions) < 2:
            raise ValueError(f"{p}:{first}: nothing to choose from: a line needs 'negatives' or a 'group' partner")
        images = [str((p.parent / r["image"]) if not Path(r["image"]).is_absolute() else r["image"]) for _, r in rows]
        instances.append(SelectionInstance(images, captions, types.pop(), key=f"{p.name}:{first}"))
    if not instances:
        raise ValueError(f"{p}: no instances")
    return SelectionSet(p.stem, instances, {"format": "jsonl", "path": str(p)})


def read_sugar_crepe(path: str | Path) -> SelectionSet:
    """One of CLIP_benchmark's SugarCREPE annotation files ``ROOT/<task>.json``, images from
    ``ROOT/val2017/`` (where its builder puts COCO val2017); dataset ``sugar_crepe/<task>``."""
    p = Path(path)
    try:
        ann = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(ann, dict) or not ann:
        raise ValueError(f"{p}: expected a non-empty object of id -> {{filename, caption, negative_caption}}")
    root = p.parent / "val2017"
    instances = []
    for key, item in ann.items():
        where = f"{p}: item {key!r}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object")
        fn = _need_str(item.get("filename"), where, "filename")
        caps = [_need_str(item.get("caption"), where, "caption"),
                _need_str(item.get("negative_caption"), where, "negative_caption")]
        instances.append(SelectionInstance([str(root / fn)], caps, p.stem, key=f"{p.name}:{key}"))
    return SelectionSet(f"sugar_crepe/{p.stem}", instances, {"format": "clip_benchmark/sugar_crepe", "path": str(p)})


def builtin_selection(spec: str = BUILTIN, image_size: int | None = None) -> SelectionSet:
    """The built-in minimal pairs: ``builtin:scenes-selection?n_per_type=50&seed=0&size=64[&types=a,b]``
    (``size`` defaults to ``image_size``, the model's input size, else 64)."""
    q = parse_scenes_query(spec)
    known = {"n_per_type", "seed", "size", "types"}
    if set(q) - known:
        raise ValueError(f"{spec}: unknown option(s) {sorted(set(q) - known)}; known: {', '.join(sorted(known))}")
    try:
        n, seed = int(q.get("n_per_type", 50)), int(q.get("seed", 0))
        size = int(q.get("size", image_size or 64))
    except ValueError:
        raise ValueError(f"{spec}: n_per_type, seed and size must be integers") from None
    types = tuple(q["types"].split(",")) if q.get("types") else SELECTION_TYPES
    instances = [SelectionInstance([render_scene(s, size) for s in g.specs], list(g.captions), g.type,
                                   key=f"{g.type}/{k}")
                 for k, g in enumerate(selection_groups(n, seed, types))]
    return SelectionSet("scenes-selection", instances,
                        {"format": "builtin", "n_per_type": n, "seed": seed, "size": size, "types": list(types)})


def open_selection(spec: Any, image_size: int | None = None) -> list[SelectionSet]:
    """The sets a ``--dataset`` spec names: the built-in pairs, a JSONL file, one SugarCREPE
    ``<task>.json``, or a folder holding SugarCREPE task files (each is a set) or JSONL files."""
    if isinstance(spec, SelectionSet):
        return [spec]
    s = str(spec)
    if s.startswith("builtin:"):
        if not s.split("?")[0] == BUILTIN:
            raise ValueError(f"unknown built-in selection set {s!r}; use {BUILTIN}[?n_per_type=50&seed=0&size=64]")
        return [builtin_selection(s, image_size)]
    p = Path(s)
    if p.is_dir():
        tasks = [p / f"{t}.json" for t in SUGAR_CREPE_TASKS if (p / f"{t}.json").is_file()]
        if tasks:
            return [read_sugar_crepe(t) for t in tasks]
        lines = sorted(p.glob("*.jsonl"))
        if lines:
            return [read_selection_jsonl(x) for x in lines]
        raise ValueError(f"{p}: no SugarCREPE task file ({', '.join(t + '.json' for t in SUGAR_CREPE_TASKS)}) "
                         f"and no .jsonl file")
    if not p.is_file():
        raise FileNotFoundError(f"image-caption selection dataset not found: {p}")
    if p.suffix.lower() == ".jsonl":
        return [read_selection_jsonl(p)]
    if p.suffix.lower() == ".json":
        return [read_sugar_crepe(p)]
    raise ValueError(f"{p}: expected a .jsonl file, a SugarCREPE <task>.json, a folder of them, or {BUILTIN}")


# --- the task -----------------------------------------------------------------------------------------

def selection_similarities(model: Any, instances: Sequence[SelectionInstance], *, preprocess: Any = None,
                           batch_size: int = 64, text_batch_size: int = 256, progress: bool = False,
                           long_text: str | None = None, long_text_overlap: int | None = None
                           ) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """Each usable instance's ``[I, T]`` cosine similarities, the indices of those instances, and
    the skipped ones (``key: reason``: an unreadable image skips its instance). Every distinct
    image path and caption is embedded once."""
    bad = skippable_errors()
    pre = preprocess or image_transform(model.config.preprocess)
    row: dict[Any, int] = {}         # image ref -> row of its feature
    failed: dict[Any, str] = {}
    pending: list[tuple[Any, torch.Tensor]] = []
    feats: list[torch.Tensor] = []
    kept, skipped = [], []

    def flush() -> None:  # embedded as they are read: a large set never holds all its pixels at once
        if pending:
            feats.append(embed_images(model, [t for _, t in pending], batch_size=batch_size))
            for ref, _ in pending:
                row[ref] = len(row)
            pending.clear()

    waiting: set[Any] = set()
    for k, inst in enumerate(tqdm(instances, desc="images", disable=not progress)):
        problem = None
        for im in inst.images:
            ref = im if isinstance(im, str) else id(im)
            if ref in failed:
                problem = failed[ref]
            elif ref not in row and ref not in waiting:
                try:
                    pending.append((ref, pre(load_image(im, name=im) if isinstance(im, str) else im)))
                    waiting.add(ref)
                except bad as e:
                    failed[ref] = problem = str(e)
        if problem is not None:
            skipped.append(f"{inst.key or k}: {problem}")
            continue
        kept.append(k)
        if len(pending) >= batch_size:
            flush()
            waiting.clear()
    flush()
    img = F.normalize(torch.cat(feats).float(), dim=-1) if feats else torch.empty(0, 1)
    texts = list(dict.fromkeys(c for k in kept for c in instances[k].captions))
    kw = {} if long_text_overlap is None else {"overlap": long_text_overlap}
    txt = embed_texts_length_sorted(model, texts, batch_size=text_batch_size, progress=progress,
                                    long_text=long_text, **kw) if texts else torch.empty(0, img.shape[-1])
    txt = F.normalize(txt.float(), dim=-1)
    col = {t: i for i, t in enumerate(texts)}
    sims = []
    for k in kept:
        inst = instances[k]
        a = img[[row[im if isinstance(im, str) else id(im)] for im in inst.images]]
        b = txt[[col[c] for c in inst.captions]]
        sims.append(a @ b.t())                                    # [I, T]
    return sims, kept, skipped


def run_image_caption_selection(ctx: Any, dataset: Any) -> list[dict[str, Any]]:
    """One CLIP_benchmark ``image_caption_selection`` record per set of ``dataset`` (metrics
    ``image_acc``, ``text_acc``, ``acc``; extras: ``per_type``, ``n``, ``skipped``)."""
    objective = objective_of(ctx.model)
    if objective != "contrastive":
        raise ValueError(f"image-caption selection compares image and text embeddings; a model trained with "
                         f"objective {objective!r} has no aligned text embedding")
    records = []
    for sset in open_selection(dataset, getattr(ctx.model, "image_size", None)):
        t0 = time.perf_counter()
        sims, kept, skipped = selection_similarities(
            ctx.model, sset.instances, preprocess=ctx.preprocess, batch_size=ctx.batch_size,
            text_batch_size=ctx.text_batch_size, progress=ctx.progress, long_text=ctx.long_text,
            long_text_overlap=ctx.long_text_overlap)
        if not sims:
            raise ValueError(f"{sset.name}: no usable instance ({len(skipped)} skipped, e.g. {skipped[:2]})")
        metrics, per_type = selection_metrics(sims, [sset.instances[k].type for k in kept])
        shape = sorted({tuple(s.shape) for s in sims})
        records.append(ctx.record(sset.name, TASK, metrics, per_type=per_type, n=len(sims), skipped=len(skipped),
                                  skipped_examples=skipped[:5], instance_shapes=[list(x) for x in shape],
                                  source=sset.info, tie_rule="clip_benchmark (argmax: ties go to the lower index)",
                                  timings={"total": time.perf_counter() - t0}))
    return records


__all__ = ["SelectionInstance", "SelectionSet", "selection_correct", "selection_metrics", "read_selection_jsonl",
           "read_sugar_crepe", "builtin_selection", "open_selection", "selection_similarities",
           "run_image_caption_selection", "SUGAR_CREPE_TASKS", "TASK"]
