"""Running one curation step over a pool: unit by unit, resumable, split across ranks, with
a report of every kept and dropped pair.

Output folder layout (``OUT``)::

    _run.json                  step, settings and input fingerprint of the run that owns OUT
    {unit}.tar                 output shard (steps that write shards; absent if nothing was kept)
    {unit}_stats.json          done-marker of an input unit (img2dataset-style ``successes`` count)
    _decisions/{unit}.jsonl    one line per input record: key, kept, reason, step details
    _work/...                  analysis passes and global plans (balance, dedup, split)
    report.json                merged report (+ decisions.parquet when pyarrow is importable)

A unit is finished when its marker exists and carries the run's fingerprint, so a re-run
skips finished units; a finished run (``report.json``) is reused unless ``force``. Under
torchrun or SLURM (:mod:`clipforge.utils.jobs`), unit ``i`` belongs to rank ``i % world_size``;
global passes synchronise through marker files (file barriers, no process group needed), and
rank 0 merges the report once every unit is done (or a later ``merge_only`` run does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..data import Sample
from ..data.remote import write_small
from ..data.shards import ShardRecord
from ..data.skip import REASONS as BAD_REASONS, BadSample
from ..inference import batched
from ..utils import atomic_open, is_done, jsonable, read_json, wait_for, write_json
from .records import Pool, Unit
from .writer import ShardWriter, side_files, stats_record

logger = logging.getLogger("clipforge.curation")

FINISHED = "report.json"


@dataclass
class Decision:
    """What a step decided for one pair: ``reason`` says why it was dropped ("" when kept)."""

    keep: bool
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Item:
    """Record ``index`` of a unit (raw order), decoded when the step needs pixels/captions."""

    index: int
    record: ShardRecord
    sample: Sample | None = None
    bad: BadSample | None = None


class Step:
    """A curation step: subclasses set the flags and implement :meth:`decide`."""

    name: str = ""
    writes_shards: bool = True    # copy kept records to OUT/{unit}.tar
    needs_samples: bool = True    # decode images + captions in the writing pass
    writes_decisions: bool = True
    batch_size: int = 1

    def config(self) -> dict[str, Any]:
        """Settings that change the result (part of the run fingerprint)."""
        return {}

    def check_input(self, pool: Pool) -> None:
        """Refuse a pool this step cannot apply to (raises ValueError) before anything is written."""

    def prepare(self, run: "StepRun") -> None:
        """Global passes before the writing pass (counting, planning); may use run.map_units/once."""

    def decide(self, run: "StepRun", unit: Unit, items: list[Item]) -> list[Decision]:
        raise NotImplementedError

    def finish_unit(self, run: "StepRun", unit: Unit, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Write per-unit side outputs; the returned dict is stored in the unit's marker."""
        return {}

    def unit_outputs(self, run: "StepRun", unit: Unit) -> list[Path]:
        return []

    def global_outputs(self, run: "StepRun") -> list[Path]:
        return []

    def summarize(self, run: "StepRun", report: dict[str, Any]) -> dict[str, Any]:
        """Step-specific part of the merged report (may write extra merged files)."""
        return {}


@dataclass
class RunOptions:
    rank: int = 0
    world_size: int = 1
    force: bool = False
    merge_only: bool = False
    progress: bool = True
    wait_timeout: float = 6 * 3600.0
    poll_interval: float = 0.5
    shards_to: str | None = None  # folder or URL (s3://, gs://, pipe: not) for output shards; default OUT

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")


class StepRun:
    """The state of one step over one pool into one output folder."""

    def __init__(self, step: Step, pool: Pool, out: str | os.PathLike, opts: RunOptions | None = None) -> None:
        self.step, self.pool, self.out, self.opts = step, pool, Path(out), opts or RunOptions()
        if not pool.units:
            raise ValueError(f"{pool.spec!r}: no input to curate")
        self.config = step.config()
        ident = {"step": step.name, "config": self.config, "inputs": [u.identity() for u in pool.units]}
        if self.opts.shards_to:  # finished units must be redone when their shards go elsewhere
            ident["shards_to"] = self.opts.shards_to
        self.fingerprint = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
        self.units = pool.units
        self.work = self.out / "_work"

    # ------------------------------------------------------------------------- paths
    def marker(self, unit: Unit) -> Path:
        return self.out / f"{unit.name}_stats.json"

    def shard_path(self, unit: Unit) -> Path:
        return self.out / f"{unit.name}.tar"

    def shard_target(self, unit: Unit) -> str:
        """Where the unit's output shard is written: ``OUT`` or the ``shards_to`` folder / URL, which
        then also gets img2dataset's ``{unit}_stats.json`` (OUT keeps the run's own state)."""
        if self.opts.shards_to:
            return f"{self.opts.shards_to.rstrip('/')}/{unit.name}.tar"
        return str(self.shard_path(unit))

    def decisions_path(self, unit: Unit) -> Path:
        return self.out / "_decisions" / f"{unit.name}.jsonl"

    def mine(self) -> list[Unit]:
        return [u for u in self.units if u.index % self.opts.world_size == self.opts.rank]

    def has_marker(self, path: Path) -> bool:
        return is_done(path, self.fingerprint)

    # ------------------------------------------------------------------------- driver
    def execute(self) -> dict[str, Any]:
        """Run (or resume, or reuse) the step; returns the merged report on rank 0 (and with
        one rank), a short status dict on the other ranks."""
        self.step.check_input(self.pool)
        reused = self._check_out()
        if reused is not None:
            logger.info("%s: %s already holds a finished %s run; reusing it (use --force to redo)",
                        self.step.name, self.out, self.step.name)
            reused["reused"] = True
            return reused
        if not self.opts.merge_only:
            if self.opts.force:
                self._clean()
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "_run.json", {"step": self.step.name, "fingerprint": self.fingerprint,
                                                "data": self.pool.spec, "units": len(self.units), "config": self.config})
        self.step.prepare(self)
        if not self.opts.merge_only:
            todo = [u for u in self.mine() if not self.has_marker(self.marker(u))]
            skipped = len(self.mine()) - len(todo)
            if skipped:
                logger.info("%s: %d finished shard(s) skipped", self.step.name, skipped)
            self._process_units(todo)
        if self.opts.rank != 0 and not self.opts.merge_only:
            return {"rank": self.opts.rank, "units": len(self.mine()), "merged": False}
        markers = [self.marker(u) for u in self.units]
        if self.opts.merge_only:
            missing = [p for p in markers if not self.has_marker(p)]
            if missing:
                raise ValueError(f"cannot merge {self.out}: {len(missing)} of {len(markers)} input shard(s) are not "
                                 f"finished (e.g. {missing[0].name} missing); run the step on every rank first")
        else:
            self.wait_for(markers, "shards of other ranks")
        return self._merge()

    def _check_out(self) -> dict[str, Any] | None:
        out = self.out.resolve()
        for p in self.pool.paths:
            if Path(p).resolve().parent == out:
                raise ValueError(f"--out {self.out} is the input folder of {p}: write to another folder")
        info_path = self.out / "_run.json"
        if not info_path.exists():
            return None
        info = read_json(info_path)
        if info.get("fingerprint") != self.fingerprint and not self.opts.force:
            old = info.get("config", {})
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            what = (f"settings {diff} differ" if info.get("step") == self.step.name and diff
                    else "the inputs differ" if info.get("step") == self.step.name else f"it is a {info.get('step')!r} run")
            raise ValueError(f"{self.out} already holds the output of another run ({what}); "
                             f"use --force to overwrite it or choose another --out")
        rep = self.out / FINISHED
        if not self.opts.force and rep.exists():
            try:
                report = read_json(rep)
            except ValueError:
                return None
            if report.get("fingerprint") == self.fingerprint:
                return report
        return None

    def _clean(self) -> None:
        """--force: delete what this rank owns (its units' files; rank 0 also global files)."""
        def rm(p: Path) -> None:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()

        for u in self.mine():
            for p in [self.marker(u), self.shard_path(u), Path(side_files(self.shard_path(u))[0]),
                      self.decisions_path(u), *self.step.unit_outputs(self, u)]:
                rm(p)
            if self.work.is_dir():
                for d in self.work.iterdir():
                    for suffix in (".npz", ".done.json"):
                        rm(d / f"{u.name}{suffix}")
        if self.opts.rank == 0:
            names = {u.name for u in self.units}
            for p in [self.out / FINISHED, self.out / "decisions.parquet", self.work / "_once",
                      *self.step.global_outputs(self)]:
                rm(p)
            for m in self.out.glob("*_stats.json"):  # leftovers of units of an earlier, different input
                stem = m.name[: -len("_stats.json")]
                if stem not in names:
                    rm(m)
                    rm(self.out / f"{stem}.tar")
                    rm(self.out / f"{stem}.parquet")
                    rm(self.out / "_decisions" / f"{stem}.jsonl")

    # ------------------------------------------------------------------------- reading
    def progress(self, units: list[Unit], desc: str) -> tqdm:
        lens = [u.approx_len() for u in units]
        total = sum(lens) if lens and all(n is not None for n in lens) else None  # type: ignore[misc]
        return tqdm(total=total, desc=desc, unit="pair", disable=not self.opts.progress, dynamic_ncols=True)

    def iter_items(self, unit: Unit, *, decode: bool, bar: tqdm | None = None) -> Iterator[Item]:
        """Records of ``unit`` in their fixed order; ``bad`` is set (and ``sample`` None) for
        records that cannot be used (corrupt shard, or with ``decode`` an undecodable sample)."""
        for i, rec in enumerate(unit.records()):
            if bar is not None:
                bar.update(1)
            if rec.error:
                yield Item(i, rec, None, BadSample(rec.error, rec.key, rec.detail))
                continue
            if not decode:
                yield Item(i, rec)
                continue
            try:
                yield Item(i, rec, unit.decode(rec))
            except BadSample as e:
                yield Item(i, rec, None, e)

    # ------------------------------------------------------------------------- synchronisation
    def wait_for(self, paths: list[Path], what: str) -> None:
        """File barrier: block until every marker in ``paths`` carries this run's fingerprint."""
        wait_for(paths, self.has_marker, what=what, rank=self.opts.rank, world_size=self.opts.world_size,
                 timeout=self.opts.wait_timeout, poll=self.opts.poll_interval, progress=self.opts.progress,
                 hint="re-run, or merge later with --merge")

    def map_units(self, tag: str, fn: Callable[["StepRun", Unit, tqdm], dict[str, np.ndarray]],
                  desc: str | None = None) -> Callable[[Unit], dict[str, np.ndarray]]:
        """A per-unit analysis pass: ``fn(run, unit, bar)`` -> arrays, saved as
        ``_work/{tag}/{unit}.npz`` (resumable, rank-split, then a barrier). Returns a loader."""
        folder = self.work / tag

        def npz(u: Unit) -> Path:
            return folder / f"{u.name}.npz"

        def done(u: Unit) -> Path:
            return folder / f"{u.name}.done.json"

        if self.opts.merge_only:
            missing = [u.name for u in self.units if not self.has_marker(done(u))]
            if missing:
                raise ValueError(f"cannot merge {self.out}: analysis {tag!r} unfinished for {len(missing)} shard(s) "
                                 f"(e.g. {missing[0]})")
        else:
            todo = [u for u in self.mine() if not self.has_marker(done(u))]
            if todo:
                with self.progress(todo, desc or f"{self.step.name}: {tag}") as bar:
                    for u in todo:
                        arrays = fn(self, u, bar)
                        with atomic_open(npz(u), "wb") as f:
                            np.savez(f, **arrays)
                        write_json(done(u), {"fingerprint": self.fingerprint, "unit": u.name})
            self.wait_for([done(u) for u in self.units], f"{tag} pass of other ranks")

        def load(u: Unit) -> dict[str, np.ndarray]:
            with np.load(npz(u), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}

        return load

    def once(self, tag: str, fn: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """A global computation done by rank 0 and shared through ``_work/_once/{tag}.npz``."""
        path = self.work / "_once" / f"{tag}.npz"
        done = self.work / "_once" / f"{tag}.done.json"
        if not self.has_marker(done):
            if self.opts.rank == 0:
                arrays = fn()
                with atomic_open(path, "wb") as f:
                    np.savez(f, **arrays)
                write_json(done, {"fingerprint": self.fingerprint, "tag": tag})
            elif self.opts.merge_only:
                raise ValueError(f"cannot merge {self.out}: global pass {tag!r} not finished")
            else:
                self.wait_for([done], f"rank 0's {tag}")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    # ------------------------------------------------------------------------- writing
    def _process_units(self, units: list[Unit]) -> None:
        if not units:
            return
        with self.progress(units, f"{self.step.name}" + (f" [rank {self.opts.rank}]" if self.opts.world_size > 1 else "")) as bar:
            for u in units:
                bar.set_postfix_str(u.name, refresh=False)
                self._process_unit(u, bar)

    def _process_unit(self, unit: Unit, bar: tqdm) -> None:
        step = self.step
        rows: list[dict[str, Any]] = []
        reasons: Counter[str] = Counter()
        start = time.time()
        writer = ShardWriter(self.shard_target(unit)) if step.writes_shards else nullcontext()
        with writer as w:
            for chunk in batched(self.iter_items(unit, decode=step.needs_samples, bar=bar), max(1, step.batch_size)):
                good = [it for it in chunk if it.bad is None]
                decided = iter(step.decide(self, unit, good) if good else [])
                for it in chunk:
                    if it.bad is not None:
                        d = Decision(False, it.bad.reason, {"detail": it.bad.detail} if it.bad.detail else {})
                    else:
                        d = next(decided)
                    row: dict[str, Any] = {"key": it.record.key, "kept": d.keep, "reason": "" if d.keep else d.reason}
                    src = getattr(it.record, "source_key", None)
                    if src is not None:
                        row["source_key"] = src
                    row.update(d.extra)
                    rows.append(row)
                    if d.keep:
                        if w is not None:
                            w.write(it.record.key, it.record.files)
                    else:
                        reasons[d.reason] += 1
        if step.writes_decisions:
            with atomic_open(self.decisions_path(unit), "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False) + "\n")
        extra = step.finish_unit(self, unit, rows)
        kept = sum(1 for r in rows if r["kept"])
        if step.writes_shards and not kept and not self.opts.shards_to:
            for p in (self.shard_path(unit), Path(side_files(self.shard_path(unit))[0])):
                if p.exists():
                    p.unlink()  # a stale shard of an interrupted earlier attempt
        # img2dataset's _stats.json fields, plus what makes the file this run's done-marker
        i2d = stats_record(count=len(rows), successes=kept, start_time=start, end_time=time.time(),
                           status_dict={"success": kept, **reasons}) if step.writes_shards else {}
        marker = i2d | {"fingerprint": self.fingerprint, "step": step.name, "unit": unit.name,
                  "input": unit.identity().get("path", unit.name),
                  "shard": (self.shard_target(unit) if self.opts.shards_to else self.shard_path(unit).name)
                  if step.writes_shards and kept else None,
                  "successes": kept, "count": len(rows), "kept": kept, "dropped": len(rows) - kept,
                  "dropped_by_reason": dict(sorted(reasons.items())), "extra": extra}
        if self.opts.shards_to and step.writes_shards and kept:
            write_small(side_files(self.shard_target(unit))[1], json.dumps(i2d, indent=4).encode("utf-8"))
        write_json(self.marker(unit), marker)

    # ------------------------------------------------------------------------- merging
    def iter_decisions(self) -> Iterator[tuple[Unit, dict[str, Any]]]:
        for u in self.units:
            p = self.decisions_path(u)
            if not p.exists():
                continue
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield u, json.loads(line)

    def markers(self) -> Iterator[tuple[Unit, dict[str, Any]]]:
        for u in self.units:
            yield u, read_json(self.marker(u))

    def _merge(self) -> dict[str, Any]:
        seen = kept = 0
        reasons: Counter[str] = Counter()
        shards_out = 0
        for _, m in self.markers():
            seen += m["count"]
            kept += m["kept"]
            reasons.update(m.get("dropped_by_reason", {}))
            shards_out += 1 if m.get("shard") else 0
        bad = {r: n for r, n in reasons.items() if r in BAD_REASONS}
        report: dict[str, Any] = {
            "step": self.step.name, "data": self.pool.spec, "out": str(self.out), "fingerprint": self.fingerprint,
            "config": self.config, "shards_in": len(self.units), "shards_out": shards_out if self.step.writes_shards else None,
            "seen": seen, "kept": kept, "dropped": seen - kept, "dropped_by_reason": dict(sorted(reasons.items())),
            "bad_samples": {"total": sum(bad.values()), "counts": dict(sorted(bad.items())), "examples": []},
        }
        files = {"report": str(self.out / FINISHED)}
        if self.step.writes_decisions:
            examples = report["bad_samples"]["examples"]
            for u, r in self.iter_decisions():
                if r["reason"] in BAD_REASONS and len(examples) < 10:
                    examples.append({"key": r["key"], "shard": u.name, "reason": r["reason"], "detail": r.get("detail", "")})
                if len(examples) >= 10:
                    break
            pq = write_decisions_parquet(self)
            if pq is not None:
                files["decisions"] = str(pq)
            files["decisions_jsonl"] = str(self.out / "_decisions")
        report["step_summary"] = self.step.summarize(self, report)
        report["files"] = files
        write_json(self.out / FINISHED, report)
        return report


def write_decisions_parquet(run: StepRun) -> Path | None:
    """All decisions in one Parquet file (key, shard, kept, reason, details as JSON), streamed
    unit by unit; None when pyarrow is not importable."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("kept", pa.bool_()),
                        ("reason", pa.string()), ("details", pa.string())])
    path = run.out / "decisions.parquet"
    with atomic_open(path, "wb") as f:
        writer = pq.ParquetWriter(f, schema)
        for u in run.units:
            p = run.decisions_path(u)
            if not p.exists():
                continue
            cols: dict[str, list] = {n: [] for n in schema.names}
            with open(p, encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    r = json.loads(line)
                    cols["key"].append(r.pop("key"))
                    cols["shard"].append(u.name)
                    cols["kept"].append(bool(r.pop("kept")))
                    cols["reason"].append(r.pop("reason"))
                    cols["details"].append(json.dumps(r, ensure_ascii=False) if r else "")
            if cols["key"]:
                writer.write_table(pa.table(cols, schema=schema))
        writer.close()
    return path


def read_decisions(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every decision row of a finished (or partial) step folder, from the per-unit JSONL files."""
    folder = Path(out) / "_decisions"
    if not folder.is_dir():
        raise FileNotFoundError(f"no decisions in {out} (missing {folder})")
    rows: list[dict[str, Any]] = []
    for p in sorted(folder.glob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def run_step(step: Step, pool: Pool, out: str | os.PathLike, opts: RunOptions | None = None) -> dict[str, Any]:
    """Run ``step`` over ``pool`` into ``out`` (see the module docstring for the layout)."""
    return StepRun(step, pool, out, opts).execute()
