"""Run many evaluation tasks from one YAML file and write all records plus an HTML report.

```yaml
model: runs/flickr/final.safetensors   # optional; --model on the command line wins
defaults: {batch_size: 64}             # context options (batch_size, text_batch_size)
tasks:
  - {task: zeroshot, dataset: /data/cifar10_test.npz, compare_prompts: true}
  - {task: linear_probe, dataset: /data/cifar10_test.npz, test_fraction: 0.5}
  - {task: fewshot, dataset: /data/cifar10_test.npz, shots: [1, 2, 4, 8, 16], seeds: 3}
  - {task: robustness, dataset: /data/cifar10_test.npz, shifts: [grayscale, blur, noise]}
  - {task: retrieval, dataset: /data/flickr8k, split: test}
```
A task whose record already exists in ``out_dir`` for the same model and options is not re-run.

``out_dir`` holds one CLIP_benchmark-format record per task (``<task>__<dataset>__<model>__<weights>
__<NNN>[-name].json``: the task's index keeps two tasks on one dataset and model apart), so
``clip_benchmark build out_dir/`` turns it into its CSV; ``results.jsonl`` (all records, one per
line: not ``.json``, which ``clip_benchmark build`` would try to read as a record), ``report.html``
and ``records/`` (re-run markers) sit beside them.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..utils import atomic_write_text, jsonable, read_json, write_json
from ..utils.typed import coerce_fields
from .cache import json_hash, text_tower_fingerprint
from .records import save_record, slug
from .report import build_report
from .tasks import TASK_RUNNERS, EvalContext

CONTEXT_KEYS = ("batch_size", "text_batch_size")


def load_suite(suite: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Parse and validate a suite (file or already-parsed dict)."""
    where = "suite"
    if not isinstance(suite, dict):
        where = str(suite)
        p = Path(suite)
        if not p.is_file():
            raise FileNotFoundError(f"suite file not found: {p}")
        try:
            suite = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(suite, dict):
        raise ValueError(f"{where}: expected a mapping with a 'tasks' list")
    tasks = suite.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{where}: 'tasks' must be a non-empty list")
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or "task" not in t:
            raise ValueError(f"{where}: tasks[{i}] must be a mapping with a 'task' key")
        runner = TASK_RUNNERS.get(str(t["task"]))
        if runner is None:
            raise ValueError(f"{where}: tasks[{i}]: unknown task {t['task']!r}; expected one of {sorted(set(TASK_RUNNERS))}")
        allowed = set(inspect.signature(runner).parameters) - {"ctx"}
        for key in t:
            if key not in allowed and key not in ("task", "name"):
                raise ValueError(f"{where}: tasks[{i}] ({t['task']}): unknown option {key!r}; "
                                 f"allowed: {', '.join(sorted(allowed))}")
        tasks[i] = coerce_fields(runner, t, f"{where}: tasks[{i}] ({t['task']})")  # YAML "5e-4" -> 0.0005
    for key in (suite.get("defaults") or {}):
        if key not in CONTEXT_KEYS:
            raise ValueError(f"{where}: defaults: unknown option {key!r}; allowed: {', '.join(CONTEXT_KEYS)}")
    if suite.get("defaults"):
        suite["defaults"] = coerce_fields(EvalContext, suite["defaults"], f"{where}: defaults")
    return suite


def run_suite(suite: str | Path | dict[str, Any], out_dir: str | Path, *, ctx: EvalContext | None = None,
              make_context: Callable[[str | None, dict[str, Any]], EvalContext] | None = None,
              model: str | None = None, force: bool = False, report: bool = True,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every task; returns the records. Either pass a ready ``ctx`` or ``make_context(model, defaults)``."""
    spec = load_suite(suite)
    out = Path(out_dir)
    defaults = dict(spec.get("defaults") or {})
    if ctx is None:
        if make_context is None:
            raise ValueError("run_suite needs ctx or make_context")
        ctx = make_context(model or spec.get("model"), defaults)
    else:
        for k, v in defaults.items():
            setattr(ctx, k, v)
    model_key = json_hash({"image": ctx.image_fingerprint(), "text": text_tower_fingerprint(ctx.model)})
    records = []
    for i, task in enumerate(spec["tasks"]):
        opts = {k: v for k, v in task.items() if k not in ("task", "name")}
        runner = TASK_RUNNERS[str(task["task"])]
        key = json_hash({"task": runner.__name__, "opts": opts, "model": model_key, "files": _file_stats(opts)})
        marker = out / "records" / f"{i:03d}-{slug(task.get('name') or task['task'])}-{key[:12]}.json"
        if not force and marker.is_file():
            rec = read_json(marker)
            log(f"[{i + 1}/{len(spec['tasks'])}] {task['task']} on {rec.get('dataset')}: already done, reused")
            records.append(rec)
            continue
        log(f"[{i + 1}/{len(spec['tasks'])}] {task['task']} ...")
        t0 = time.perf_counter()
        rec = runner(ctx, **opts)
        if task.get("name"):
            rec["name"] = task["name"]
        rec["suite_task"] = i
        write_json(marker, rec)
        path = save_record(out, rec, tag=_tag(i, task))
        records.append(rec)
        log(f"    done in {time.perf_counter() - t0:.1f}s -> {path}")
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in records))
    if report:
        build_report(records, out / "report.html", title=f"clipforge evaluation: {ctx.model_name}")
    return records


def _tag(i: int, task: dict[str, Any]) -> str:
    return f"{i:03d}" + (f"-{slug(str(task['name']), 40)}" if task.get("name") else "")


def _file_stats(opts: dict[str, Any]) -> dict[str, list[int]]:
    """Size and mtime of every option value that names an existing file or folder, so a record
    is not reused after its data changed."""
    out: dict[str, list[int]] = {}
    for v in opts.values():
        for item in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]):
            if isinstance(item, str) and len(item) < 4096:
                p = Path(item)
                try:
                    if p.exists():
                        st = p.stat()
                        out[item] = [st.st_size, int(st.st_mtime)]
                except OSError:
                    pass
    return out
