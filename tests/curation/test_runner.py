"""The step runner: resumable per shard, reuse vs --force, atomic outputs after a crash, rank
split with file barriers and --merge, manifest and builtin inputs."""

from __future__ import annotations

import json
import threading

import pytest

from clipforge.curation import (BalanceStep, DedupStep, FilterStep, RunOptions, ScoreStep, ScoreTable, StatsStep,
                                open_pool, read_decisions, run_step)
from clipforge.curation import records as records_mod
from curation.curationutil import ColourEmbedder, TinyImageEmbedder, out_keys, pattern, png, read_shard_members
from curation.test_steps import QUERIES, balance_pool, dedup_pool, score_pool


def decisions(out) -> dict[str, tuple[bool, str]]:
    return {r["key"]: (r["kept"], r["reason"]) for r in read_decisions(out)}


@pytest.fixture
def count_reads(monkeypatch):
    """Counts how often each input shard is read."""
    reads: dict[str, int] = {}
    real = records_mod.read_shard

    def spy(path, wanted, fileobj=None):
        name = path.rsplit("/", 1)[-1]
        reads[name] = reads.get(name, 0) + 1
        return real(path, wanted, fileobj)

    monkeypatch.setattr(records_mod, "read_shard", spy)
    return reads


def test_resume_skips_finished_shards_and_reuses_finished_runs(tmp_path, opts, count_reads):
    pool = balance_pool(tmp_path / "pool")
    out = tmp_path / "bal"
    first = run_step(BalanceStep(QUERIES, max_per_query=2), open_pool(pool), out, opts())
    assert count_reads == {"00000.tar": 2, "00001.tar": 2}  # matching pass + writing pass
    before = decisions(out)
    t0 = (out / "00000.tar").stat().st_mtime_ns
    # a finished run is reused: nothing is read or rewritten
    count_reads.clear()
    again = run_step(BalanceStep(QUERIES, max_per_query=2), open_pool(pool), out, opts())
    assert again["reused"] is True and count_reads == {} and again["kept"] == first["kept"]
    # an unfinished shard (no done-marker) is redone; finished ones are skipped
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").unlink()
    (out / "report.json").unlink()
    count_reads.clear()
    rep = run_step(BalanceStep(QUERIES, max_per_query=2), open_pool(pool), out, opts())
    assert count_reads == {"00001.tar": 1}  # the matching pass is finished too
    assert (out / "00000.tar").stat().st_mtime_ns == t0
    assert decisions(out) == before and rep.get("reused") is None and rep["kept"] == first["kept"]


def test_other_settings_need_force(tmp_path, opts, count_reads):
    pool = balance_pool(tmp_path / "pool")
    out = tmp_path / "bal"
    run_step(BalanceStep(QUERIES, max_per_query=2), open_pool(pool), out, opts())
    with pytest.raises(ValueError, match=r"max_per_query.*--force"):
        run_step(BalanceStep(QUERIES, max_per_query=1), open_pool(pool), out, opts())
    with pytest.raises(ValueError, match="'balance' run"):
        run_step(StatsStep(), open_pool(pool), out, opts())
    rep = run_step(BalanceStep(QUERIES, max_per_query=1), open_pool(pool), out, opts(force=True))
    assert rep["kept"] == 4 and rep["dropped_by_reason"]["over_cap"] == 6  # one per query now
    assert {k for k, (kept, _) in decisions(out).items() if kept} == {"a00", "a02", "a03", "a04"}
    # --force on the same settings redoes the work
    count_reads.clear()
    run_step(BalanceStep(QUERIES, max_per_query=1), open_pool(pool), out, opts(force=True))
    assert count_reads == {"00000.tar": 2, "00001.tar": 2}


def test_crash_leaves_no_partial_shard_and_resume_finishes(tmp_path, opts):
    pool = score_pool(tmp_path / "pool")
    run_step(ScoreStep(ColourEmbedder()), open_pool(pool), tmp_path / "scores", opts())

    class Crashing(FilterStep):
        def decide(self, run, unit, items):
            if unit.name == "00001":
                raise RuntimeError("killed")
            return super().decide(run, unit, items)

    out = tmp_path / "f"
    with pytest.raises(RuntimeError, match="killed"):
        run_step(Crashing(ScoreTable(tmp_path / "scores"), min_score=0.5), open_pool(pool), out, opts())
    assert (out / "00000_stats.json").exists() and not (out / "00001_stats.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"] and not list(out.rglob("*.tmp"))
    rep = run_step(FilterStep(ScoreTable(tmp_path / "scores"), min_score=0.5), open_pool(pool), out, opts())
    assert rep["kept"] == 3 and out_keys(out) == {"r1", "r3", "r6"}


def _run_ranks(make_step, pool, out, opts, world=2):
    results, errors = {}, []

    def work(rank):
        try:
            results[rank] = run_step(make_step(), open_pool(pool), out, opts(rank=rank, world_size=world))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("make", [lambda: BalanceStep(QUERIES, max_per_query=2),
                                  lambda: DedupStep(exact="image", threshold=0.9, embedder=TinyImageEmbedder())],
                         ids=["balance", "dedup"])
def test_two_ranks_match_one_process(tmp_path, opts, make):
    pool = balance_pool(tmp_path / "pool") if isinstance(make(), BalanceStep) else dedup_pool(tmp_path / "pool")
    single = run_step(make(), open_pool(pool), tmp_path / "one", opts())
    res = _run_ranks(make, pool, tmp_path / "two", opts)
    assert res[1] == {"rank": 1, "units": 1, "merged": False}
    assert res[0]["kept"] == single["kept"] and res[0]["dropped_by_reason"] == single["dropped_by_reason"]
    assert decisions(tmp_path / "two") == decisions(tmp_path / "one")
    assert out_keys(tmp_path / "two") == out_keys(tmp_path / "one")


def test_merge_after_ranks_finish_separately(tmp_path, opts):
    pool = score_pool(tmp_path / "pool")
    run_step(ScoreStep(ColourEmbedder()), open_pool(pool), tmp_path / "scores", opts())
    out = tmp_path / "f"
    table = ScoreTable(tmp_path / "scores")
    r1 = run_step(FilterStep(table, min_score=0.5), open_pool(pool), out, opts(rank=1, world_size=2))
    assert r1["merged"] is False and not (out / "report.json").exists()
    with pytest.raises(ValueError, match="1 of 2 input shard"):
        run_step(FilterStep(table, min_score=0.5), open_pool(pool), out, opts(merge_only=True))
    run_step(FilterStep(table, min_score=0.5), open_pool(pool), out, opts(rank=0, world_size=2))  # merges at the end
    rep = json.loads((out / "report.json").read_text())
    assert rep["kept"] == 3 and rep["seen"] == 6
    merged = run_step(FilterStep(table, min_score=0.5), open_pool(pool), out, opts(merge_only=True))
    assert merged["reused"] is True



def test_manifest_input_keeps_original_bytes(tmp_path, opts):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.png").write_bytes(png(pattern(1)))
    (img_dir / "b.png").write_bytes(png(pattern(1), compress_level=1))  # same pixels
    pattern(2).save(img_dir / "c.jpg", quality=90)
    (tmp_path / "pairs.csv").write_text("image,caption\nimgs/a.png,first\nimgs/b.png,second\nimgs/c.jpg,third\n"
                                        "imgs/d.png,missing file\nimgs/c.jpg,another caption of c\n")
    rep = run_step(DedupStep(exact="image"), open_pool(str(tmp_path / "pairs.csv"), samples_per_unit=2),
                   tmp_path / "dd", opts())
    rows = {r["source_key"]: r for r in read_decisions(tmp_path / "dd")}
    assert {k: (r["kept"], r["reason"]) for k, r in rows.items()} == {
        "imgs/a.png": (True, ""), "imgs/b.png": (False, "exact_duplicate"), "imgs/c.jpg": (True, ""),
        "imgs/d.png": (False, "missing_file")}
    assert rep["shards_in"] == 2 and rep["shards_out"] == 2
    members = read_shard_members(tmp_path / "dd" / "00001.tar")
    key = rows["imgs/c.jpg"]["key"]
    assert members[f"{key}.jpg"] == (img_dir / "c.jpg").read_bytes()
    assert json.loads(members[f"{key}.txt"]) == ["third", "another caption of c"]  # several captions as a JSON list
    assert json.loads(members[f"{key}.json"])["source_key"] == "imgs/c.jpg"
    # the output is a valid pool for the next step (and for clipforge.data)
    from clipforge.data import open_pairs
    samples = list(open_pairs(str(tmp_path / "dd")).iter_samples(shuffle=False))
    assert sorted(len(s.captions) for s in samples) == [1, 2]


def test_builtin_scenes_input(tmp_path, opts):
    rep = run_step(StatsStep(), open_pool("builtin:scenes?n=6&size=32", samples_per_unit=4), tmp_path / "st", opts())
    assert rep["seen"] == 6 and rep["shards_in"] == 2
    assert rep["step_summary"]["image_formats"] == {"png": 6} and rep["step_summary"]["top_sizes"] == {"32x32": 6}


def test_missing_input_and_out_equal_to_input(tmp_path, opts):
    with pytest.raises(FileNotFoundError, match="shard not found"):
        open_pool(str(tmp_path / "nope.tar"))
    with pytest.raises(FileNotFoundError):
        open_pool(str(tmp_path / "pool/{00000..00003}.tar"))
    pool = score_pool(tmp_path / "pool")
    with pytest.raises(ValueError, match="input folder"):
        run_step(StatsStep(), open_pool(pool), tmp_path / "pool", opts())


def test_truncated_shard_is_counted_not_fatal(tmp_path, opts):
    pool = score_pool(tmp_path / "pool")
    data = (tmp_path / "pool" / "00000.tar").read_bytes()
    cut = data.index(b"r3.png")  # truncate inside the third sample's header block
    (tmp_path / "pool" / "00000.tar").write_bytes(data[: cut + 700])
    rep = run_step(StatsStep(), open_pool(pool), tmp_path / "st", opts())
    assert rep["dropped_by_reason"].get("corrupt_shard") == 1
    assert rep["step_summary"]["good_samples"] == 4  # r1, r2 of the cut shard; r4, r6 of the other


@pytest.mark.distributed
def test_torchrun_style_processes(tmp_path):
    """Two processes with RANK/WORLD_SIZE (as torchrun sets them) give the single-process result."""
    import os
    import subprocess
    import sys

    pool = balance_pool(tmp_path / "pool")
    q = tmp_path / "q.txt"
    q.write_text("\n".join(QUERIES) + "\n")
    cmd = [sys.executable, "-m", "clipforge.cli.main", "data", "balance", "--data", pool, "--queries", str(q),
           "--max-per-query", "2", "--no-progress"]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / "two")], env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank 1: finished its 1 shard(s)" in outs[0][0] and "kept 7, dropped 7" in outs[1][0]
    run_step(BalanceStep(QUERIES, max_per_query=2), open_pool(pool), tmp_path / "one", RunOptions(progress=False))
    assert decisions(tmp_path / "two") == decisions(tmp_path / "one")
