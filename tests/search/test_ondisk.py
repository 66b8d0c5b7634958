"""FAISS past RAM: on-disk inverted lists answer like the in-RAM IVF index with the same
quantiser and parameters, and the process's own memory stays under --max-memory (measured in a
subprocess); deletes by id on the FAISS backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from clipforge.cli.main import main
from clipforge.search.index import INFO_FILE, build_index, delete_from_index, load_index, remove_strays
from clipforge.search.searcher import QueryError, Searcher
from search.searchutil import clustered_vectors, micro_model, write_collection


def test_on_disk_answers_like_in_ram_ivf(tmp_path):
    x = clustered_vectors(12_000, 64, seed=0)
    emb = write_collection(tmp_path / "emb", x, shard_size=2500)
    r = build_index(emb, tmp_path / "od", on_disk=True, max_memory="16M", n_queries=300, progress=False)
    info = json.loads((tmp_path / "od" / INFO_FILE).read_text())
    assert info["params"]["on_disk"] is True and info["type"] == "ivf"
    assert r.recall_at_10 >= 0.95 and info["recall_at_10"] == r.recall_at_10
    g = tmp_path / "od" / info["files"]["ivfdata"]
    assert g.is_file() and g.stat().st_size >= 12_000 * 64  # SQ8 codes live in the lists file
    assert not list((tmp_path / "od").rglob("*.tmp")) and remove_strays(tmp_path / "od") == []
    od = load_index(tmp_path / "od")
    assert od.mmap and od.ntotal == 12_000
    # the same trained quantiser and codes, lists in RAM, filled by a plain add
    ram = faiss.read_index(str(tmp_path / "od" / info["files"]["faiss"]), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(ram)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns them now
    ram.ntotal = ivf.ntotal = 0
    ram.add(x.astype(np.float16).astype(np.float32))
    from clipforge.search.index import set_search_params

    set_search_params(ram, info["params"]["nprobe"], info["params"]["efSearch"])
    q = clustered_vectors(200, 64, seed=7)
    d1, i1 = od.search(q, 10)
    d2, i2 = ram.search(q, 10)
    same = np.mean([list(a) == list(b) for a, b in zip(i1, i2)])
    assert same >= 0.99, same
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
    # reconstruct (search by item) reads codes from the lists file
    np.testing.assert_allclose(od.vector(5), x[5], atol=0.02)


_MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq, faiss
    from pathlib import Path
    from clipforge.search.index import build_index, load_index
    from clipforge.search.memwatch import PeakMemory
    emb, out, on_disk, ceiling = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    # fixed one-time costs of the libraries (thread pools, allocator arenas), not of the index
    pq.write_table(pa.table({"a": [1]}), out + ".warm.parquet"); pq.read_table(out + ".warm.parquet")
    faiss.knn(np.ones((4, 8), "float32"), np.ones((4, 8), "float32"), 2)
    with PeakMemory() as b:
        build_index(emb, out, on_disk=on_disk, max_memory=ceiling if on_disk else None, exact_threshold=0,
                    n_queries=200, progress=False, seed=0)
    q = np.asarray(np.load(Path(emb) / "img_emb" / "img_emb_00001.npy")[:300], np.float32)
    with PeakMemory() as s:
        idx = load_index(out)
        for i in range(0, 300, 50):
            idx.search(q[i:i + 50], 10)
    print(json.dumps({"build": b.to_dict(), "search": s.to_dict()}))
""")


def _measure(emb: Path, out: Path, on_disk: bool, ceiling: str) -> dict:
    # live memory, not allocator retention: large arrays always mmapped (returned when freed), no arrow pool
    env = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    p = subprocess.run([sys.executable, "-c", _MEASURE, str(emb), str(out), "1" if on_disk else "0", ceiling],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_on_disk_memory_stays_under_the_ceiling(tmp_path):
    """60,000 x 512 (120 MB as float32, 31 MB of SQ8 codes): built and searched on disk within
    48 MiB of process memory above the libraries' baseline (16 MiB of it k-means' distance
    block); the in-RAM build of the same collection needs over twice that, so the measurement
    tells them apart."""
    ceiling = 48 * 2**20
    emb = write_collection(tmp_path / "emb", clustered_vectors(60_000, 512, seed=0), shard_size=5000)
    od = _measure(emb, tmp_path / "od", True, "48M")
    ram = _measure(emb, tmp_path / "ram", False, "48M")
    assert od["build"]["anon_delta_bytes"] < ceiling, od
    assert od["search"]["anon_delta_bytes"] < ceiling, od
    assert ram["build"]["anon_delta_bytes"] > 2 * ceiling, ram  # the in-RAM path would not have fit
    info = json.loads((tmp_path / "od" / INFO_FILE).read_text())
    assert info["recall_at_10"] >= 0.9 and info["params"]["on_disk"]


def test_on_disk_cli_and_refusals(tmp_path, capsys):
    emb = write_collection(tmp_path / "emb", clustered_vectors(4000, 32, seed=1), shard_size=1000)
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx"), "--on-disk",
                 "--max-memory", "8M", "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # faiss's own printing must not corrupt the JSON
    assert out["plan"]["reason"].startswith("--on-disk") and out["ntotal"] == 4000
    write_collection(emb, clustered_vectors(500, 32, seed=2), shard_size=1000, start_shard=4, first_key=4000)
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx"), "--add", "--no-progress"]) == 1
    assert "on-disk FAISS index: --add is not supported" in capsys.readouterr().err
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "m"), "--backend", "milvus",
                 "--on-disk"]) == 1
    assert "--on-disk is for the FAISS backend" in capsys.readouterr().err
    with pytest.raises(ValueError, match="RAM, more than --max-memory"):
        build_index(emb, tmp_path / "tiny", on_disk=True, max_memory="10K", progress=False)


@pytest.mark.parametrize("kind", ["flat", "ivf", "on_disk"])
def test_faiss_delete_by_id(tmp_path, kind, capsys):
    x = clustered_vectors(3000, 32, seed=3)
    emb = write_collection(tmp_path / "emb", x, shard_size=1000)
    build_index(emb, tmp_path / "idx", exact_threshold=0 if kind != "flat" else 100_000,
                on_disk=kind == "on_disk", n_queries=200, progress=False)
    xs = x.astype(np.float16).astype(np.float32)
    before = load_index(tmp_path / "idx").search(xs[:5], 3)[1]
    assert list(before[:, 0]) == [0, 1, 2, 3, 4]
    assert main(["index", "--out", str(tmp_path / "idx"), "--delete", "1,3", "--delete", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": [1, 3], "not_found": [], "count": 2998}
    idx = load_index(tmp_path / "idx")
    assert idx.count() == 2998 and not idx.has(1) and idx.has(2)
    _, ids = idx.search(xs[:5], 3)
    assert 1 not in ids and 3 not in ids and list(ids[[0, 2, 4], 0]) == [0, 2, 4]
    with pytest.raises(KeyError, match="unknown item id 3"):
        idx.row(3)
    assert delete_from_index(tmp_path / "idx", [3, 4])["not_found"] == [3]
    with pytest.raises(ValueError, match=r"unknown item id\(s\) \[3000\]"):
        delete_from_index(tmp_path / "idx", [3000])
    assert main(["index", "--out", str(tmp_path / "idx"), "--delete", "x"]) == 2
    assert "--delete" in capsys.readouterr().err
    # a rebuild starts from the collection again: nothing deleted
    build_index(emb, tmp_path / "idx", n_queries=50, progress=False)
    assert load_index(tmp_path / "idx").has(1)


def test_searcher_refuses_deleted_item(tmp_path):
    from clipforge.search.embed import embed_collection
    from clipforge.search.sources import ImageFolderSource
    from search.searchutil import make_image_folder

    model = micro_model()
    make_image_folder(tmp_path / "photos")
    embed_collection(model, ImageFolderSource(tmp_path / "photos"), tmp_path / "emb", shard_size=5,
                     progress=False, rank=0, world_size=1)
    build_index(tmp_path / "emb", tmp_path / "idx", n_queries=5, progress=False)
    delete_from_index(tmp_path / "idx", [2])
    s = Searcher(tmp_path / "idx", model)
    with pytest.raises(QueryError, match="unknown or deleted item id 2") as e:
        s.item(2)
    assert e.value.status == 404
    assert all(h.id != 2 for h in s.search_item(0, 13))
