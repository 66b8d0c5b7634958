"""Result records in CLIP_benchmark's format and their text-table rendering.

A record carries every key CLIP_benchmark 1.6.2's ``clip_benchmark eval`` writes - ``dataset``,
``model`` (architecture), ``pretrained`` (checkpoint path or tag), ``task``, ``metrics`` (its
metric names: ``acc1``/``acc5``/``mean_per_class_recall``, ``lp_acc1``/``lp_acc5``/
``lp_mean_per_class_recall``, ``image_retrieval_recall@K``/``text_retrieval_recall@K``),
``language`` - plus extras (timings, counts, class names, the data behind the report's plots),
so ``clip_benchmark build`` aggregates a folder of our records into its CSV unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..utils import jsonable, write_json

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "fewshot", "robustness",
         "image_caption_selection")


CLIP_BENCHMARK_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")


def make_record(dataset: str, model: str, task: str, metrics: dict[str, Any], *, pretrained: str = "",
                language: str = "en", **extras: Any) -> dict[str, Any]:
    """One result record; ``model`` is the architecture, ``pretrained`` the weights (path or tag)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rec: dict[str, Any] = {"dataset": dataset, "model": model, "pretrained": str(pretrained or ""), "task": task,
                           "metrics": jsonable(metrics), "language": language}
    rec.update(jsonable(extras))
    return rec


def slug(text: str, max_len: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return (s or "x")[:max_len]


def record_path(out_dir: str | Path, record: dict[str, Any], tag: str | None = None) -> Path:
    """``<task>__<dataset>__<model>__<weights>[__<tag>].json``; ``tag`` tells apart records that
    share all four (the suite passes its task index, so two tasks never write one file)."""
    weights = Path(str(record.get("pretrained") or "")).name
    parts = [record["task"], slug(record["dataset"]), slug(str(record["model"])), *([slug(weights)] if weights else []),
             *([slug(tag)] if tag else [])]
    return Path(out_dir) / ("__".join(parts) + ".json")


def save_record(out_dir: str | Path, record: dict[str, Any], tag: str | None = None) -> Path:
    path = record_path(out_dir, record, tag)
    write_json(path, record)
    return path


def display_model(record: dict[str, Any]) -> str:
    """``arch (weights file name)`` for tables and report headings."""
    weights = Path(str(record.get("pretrained") or "")).name
    return f"{record['model']} ({weights})" if weights else str(record["model"])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Plain-text table of dicts (columns default to the union of keys, in first-seen order)."""
    if not rows:
        return "(no results)"
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def records_table(records: Iterable[dict[str, Any]], max_metrics: int = 10) -> str:
    """One table per task: dataset, model, then the task's scalar metrics."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for task, recs in by_task.items():
        rows = []
        for r in recs:
            row: dict[str, Any] = {"dataset": r["dataset"], "model": display_model(r)}
            scalars = [(k, v) for k, v in r["metrics"].items() if isinstance(v, (int, float)) or v is None]
            row.update(dict(scalars[:max_metrics]))
            if r.get("skipped"):
                row["skipped"] = r["skipped"]
            rows.append(row)
        out.append(f"== {task} ==\n{format_table(rows)}")
    return "\n\n".join(out)
