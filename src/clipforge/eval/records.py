"""Result records (CLIP_benchmark's shape) and their text-table rendering.

A record is ``{"dataset", "model", "task", "metrics": {name: number}, ...extras}``: one per
model x dataset x task; extras carry timings, counts and the data behind the report's plots.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..utils import write_json

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "fewshot", "robustness")


def make_record(dataset: str, model: str, task: str, metrics: dict[str, Any], **extras: Any) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rec: dict[str, Any] = {"dataset": dataset, "model": model, "task": task,
                           "metrics": {k: _clean(v) for k, v in metrics.items()}}
    rec.update({k: _clean(v) for k, v in extras.items()})
    return rec


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, containers recursively."""
    try:
        import numpy as np

        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def slug(text: str, max_len: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return (s or "x")[:max_len]


def record_path(out_dir: str | Path, record: dict[str, Any]) -> Path:
    return Path(out_dir) / f"{record['task']}__{slug(record['dataset'])}__{slug(Path(str(record['model'])).name)}.json"


def save_record(out_dir: str | Path, record: dict[str, Any]) -> Path:
    path = record_path(out_dir, record)
    write_json(path, record)
    return path


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
            row: dict[str, Any] = {"dataset": r["dataset"], "model": Path(str(r["model"])).name}
            scalars = [(k, v) for k, v in r["metrics"].items() if isinstance(v, (int, float)) or v is None]
            row.update(dict(scalars[:max_metrics]))
            if r.get("skipped"):
                row["skipped"] = r["skipped"]
            rows.append(row)
        out.append(f"== {task} ==\n{format_table(rows)}")
    return "\n\n".join(out)
