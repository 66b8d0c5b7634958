"""kill -9 during `index` (rebuild over an existing index) and `index --add`, at seeded random
moments: the previous index keeps answering identically, the next run cleans up and completes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from search.searchutil import clustered_vectors, write_collection

from clipforge.search.index import INFO_FILE, add_to_index, build_index, load_index, remove_strays

CHILD = textwrap.dedent("""
    import sys, time
    from clipforge.search.index import add_to_index, build_index
    mode, emb, out = sys.argv[1:4]
    print("ready", flush=True)
    sys.stdin.readline()
    t = time.perf_counter()
    if mode == "add":
        add_to_index(emb, out, n_queries=200, progress=False)
    else:
        build_index(emb, out, exact_threshold=1000, n_queries=100, progress=False)
    print("done", time.perf_counter() - t, flush=True)
""")


def run_child(mode: str, emb: Path, out: Path, kill_after: float | None) -> float | None:
    """Run a build/add in a fresh process (imports done before the clock starts); SIGKILL it
    ``kill_after`` seconds in. Returns the work's duration when it finished."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(emb), str(out)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    p.stdin.write("go\n")
    p.stdin.flush()
    if kill_after is None:
        out_text, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        return float(out_text.split()[-1])
    time.sleep(kill_after)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    return None


def answers(idx_dir: Path, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    idx = load_index(idx_dir)
    scores, ids = idx.search(queries, 10)
    return scores, ids, idx.rows(ids[:, 0].tolist())


def strays(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp"))


@pytest.mark.parametrize("mode,seeds", [
    ("rebuild", (0,)), ("add", (0,)),
    pytest.param("rebuild", (1, 2, 3), marks=pytest.mark.slow), pytest.param("add", (1, 2, 3), marks=pytest.mark.slow)])
def test_kill_keeps_previous_index(tmp_path, mode, seeds):
    # IVF (exact threshold 1000) over 3k vectors: training, tuning and writing take long enough
    # for random kills to land in every stage
    a = clustered_vectors(3000, 32, seed=1, centres=40)
    b = clustered_vectors(3000, 32, seed=2, centres=40)
    emb_a = write_collection(tmp_path / "a", a, shard_size=1500, key_prefix="a")
    out = tmp_path / "idx"
    build_index(emb_a, out, exact_threshold=1000, n_queries=100, progress=False)
    probe = tmp_path / "probe"  # a copy, to time the uninterrupted work (and scale the kill times)
    shutil.copytree(out, probe)
    if mode == "add":  # the same collection grows by two shards, then --add runs
        emb = write_collection(tmp_path / "a", b, shard_size=1500, start_shard=2, key_prefix="b", first_key=3000)
    else:  # a different collection replaces the index
        emb = write_collection(tmp_path / "b", b, shard_size=1500, key_prefix="b")
    queries = clustered_vectors(25, 32, seed=9, centres=40)
    before = answers(out, queries)
    info_before = (out / INFO_FILE).read_text()

    t0 = time.perf_counter()  # the same work in this process (already imported): how long it takes
    if mode == "add":
        add_to_index(emb, probe, n_queries=100, progress=False)
    else:
        build_index(emb, probe, exact_threshold=1000, n_queries=100, progress=False)
    duration = time.perf_counter() - t0
    print(f"{mode}: uninterrupted work takes {duration:.2f} s; kills at seeded times in [0, {1.1 * duration:.2f}] s")

    commits = 0
    for seed in seeds:
        for kill_after in np.random.default_rng(seed).uniform(0.0, 1.1 * duration, size=2):
            run_child(mode, emb, out, float(kill_after))
            info_now = (out / INFO_FILE).read_text()
            now = answers(out, queries)
            if info_now == info_before:  # killed before the commit: the previous index, identically
                np.testing.assert_array_equal(now[1], before[1])
                np.testing.assert_array_equal(now[0], before[0])
                assert now[2] == before[2]
            else:  # killed after the commit (index.json renamed): the new index is complete,
                commits += 1  # and from now on it is the one that must survive
                assert load_index(out).ntotal == (6000 if mode == "add" else 3000)
                before, info_before = now, info_now
    print(f"{mode}: {len(seeds) * 2} kills, {commits} after the commit, the rest before it")

    # the next run removes what the killed ones left and completes
    run_child(mode, emb, out, None)
    assert strays(out) == [] and remove_strays(out) == []
    live = {p.name for p in out.iterdir()}
    assert live <= {INFO_FILE, ".lock", "metadata"} | {d for d in live if d.startswith("g")}
    assert len([d for d in live if d.startswith("g")]) == 1
    final = load_index(out)
    assert final.ntotal == (6000 if mode == "add" else 3000)
    keys = final.rows([0, final.ntotal - 1])
    assert keys[0]["key"] == ("a0" if mode == "add" else "b0") and keys[1]["key"].startswith("b")


def test_stray_files_removed_and_old_layout_read(tmp_path):
    """Leftovers of an interrupted run go on the next run; an index from before generations
    (index.faiss + metadata.parquet at the top, column ``path``) loads and is migrated by --add."""
    import json

    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = clustered_vectors(300, 16, seed=0)
    emb = write_collection(tmp_path / "e", x[:200], shard_size=100)
    out = tmp_path / "idx"
    build_index(emb, out, n_queries=20, progress=False)
    info = json.loads((out / INFO_FILE).read_text())
    # turn it into the old layout
    os.replace(out / info["files"]["faiss"], out / "index.faiss")
    meta = pq.read_table(out / info["files"]["metadata"][0])
    pq.write_table(meta.rename_columns(["path" if c == "image_path" else c for c in meta.column_names]),
                   out / "metadata.parquet")
    for p in [out / info["files"]["metadata"][0]]:
        p.unlink()
    os.rmdir(out / info["files"]["faiss"].split("/")[0])
    del info["files"]
    (out / INFO_FILE).write_text(json.dumps(info))
    old = load_index(out)
    assert old.ntotal == 200 and "image_path" in old.metadata.column_names and "path" not in old.metadata.column_names
    # leftovers of a killed run
    (out / "g000007").mkdir()
    (out / "g000007" / ".index.faiss.123.tmp").write_bytes(b"x" * 100)
    (out / "metadata" / "part-000007.parquet").parent.mkdir(exist_ok=True)
    (out / "metadata" / "part-000007.parquet").write_bytes(b"partial")
    (out / f".{INFO_FILE}.abc.tmp").write_text("{")
    write_collection(tmp_path / "e", x[200:], shard_size=100, start_shard=2, first_key=200)
    r = add_to_index(emb, out, n_queries=20, progress=False)
    assert r.added == 100 and any("leftover" in n for n in r.notes)
    # the old metadata.parquet stays a live part; the old index.faiss and every leftover are gone
    assert sorted(p.name for p in out.iterdir()) == sorted([INFO_FILE, ".lock", "metadata", "metadata.parquet",
                                                            "g000001"])
    assert [p.name for p in (out / "metadata").iterdir()] == ["part-000001.parquet"]
    new = load_index(out)
    assert new.ntotal == 300 and new.row(5)["key"] == "v5" and new.row(250)["key"] == "v250"
    faiss_ids = new.search(x[250:251], 1)[1][0]
    assert faiss_ids[0] == 250
    assert isinstance(faiss.read_index(str(out / "g000001" / "index.faiss")), faiss.Index)
    assert pa  # pyarrow used above


def test_second_writer_is_refused(tmp_path):
    import fcntl

    x = clustered_vectors(200, 16, seed=0)
    emb = write_collection(tmp_path / "e", x, shard_size=100)
    out = tmp_path / "idx"
    build_index(emb, out, n_queries=20, progress=False)
    with open(out / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="being written by another"):
            build_index(emb, out, n_queries=20, progress=False)
    assert load_index(out).ntotal == 200
