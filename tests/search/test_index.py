"""FAISS indexes: planning, exact vs approximate (recall target reached), incremental add, mmap load."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from clipforge.search.index import (INFO_FILE, add_to_index, build_index, choose_nlist, load_index, parse_memory,
                                    plan_index, recall_at_k)
from search.searchutil import clustered_vectors, exact_topk, write_collection


def test_parse_memory():
    assert parse_memory("4G") == 4 * 2**30
    assert parse_memory("512M") == 512 * 2**20
    assert parse_memory("1.5GB") == int(1.5 * 2**30)
    assert parse_memory("1000") == 1000
    assert parse_memory(None) is None
    with pytest.raises(ValueError, match="cannot parse memory size"):
        parse_memory("lots")


def test_plan_scales_with_size_and_memory():
    assert plan_index(5000, 512).kind == "flat"
    big = plan_index(1_000_000, 512)
    assert big.kind == "ivf" and big.codes == "SQ8" and big.factory == f"IVF{big.nlist}_HNSW32,SQ8"
    assert big.nlist == choose_nlist(1_000_000) == 4096
    assert choose_nlist(20_000) < choose_nlist(200_000) < big.nlist
    # a tight budget forces product quantisation, tighter still fewer bytes per code
    pq = plan_index(1_000_000, 512, max_memory=parse_memory("200M"))
    assert pq.codes == "PQ128x8" and pq.factory.endswith(",PQ128x8np") and pq.est_bytes <= 200 * 2**20
    tighter = plan_index(1_000_000, 512, max_memory=parse_memory("100M"))
    assert tighter.codes == "PQ64x8"
    # the exact index is abandoned when it would not fit, even for a small collection
    assert plan_index(50_000, 512, max_memory=parse_memory("50M")).kind == "ivf"
    with pytest.raises(ValueError, match="do not fit"):
        plan_index(1_000_000, 512, max_memory=parse_memory("1M"))
    with pytest.raises(ValueError, match="empty collection"):
        plan_index(0, 512)


def test_exact_index(tmp_path):
    x = clustered_vectors(3000, 32, seed=0)
    emb = write_collection(tmp_path / "emb", x, shard_size=700)
    r = build_index(emb, tmp_path / "idx", n_queries=200, progress=False)
    assert r.plan["kind"] == "flat" and r.ntotal == 3000 and r.recall_at_10 == pytest.approx(1.0, abs=0.002)
    info = json.loads((tmp_path / "idx" / INFO_FILE).read_text())
    assert info["type"] == "flat" and info["ntotal"] == 3000 and len(info["sources"]) == 5
    idx = load_index(tmp_path / "idx")
    base = x.astype(np.float16).astype(np.float32)
    q = clustered_vectors(20, 32, seed=7)
    _, ids = idx.search(q, 10)
    np.testing.assert_array_equal(ids, exact_topk(base, q, 10))
    assert idx.row(1234)["key"] == "v1234" and idx.row(1234)["id"] == 1234


@pytest.fixture(scope="module")
def ivf(tmp_path_factory):
    """30k clustered 64-d vectors in 6 shards; exact threshold lowered so the IVF path is taken."""
    d = tmp_path_factory.mktemp("ivf")
    x = clustered_vectors(30_000, 64, seed=0, centres=200)
    emb = write_collection(d / "emb", x, shard_size=5000)
    r = build_index(emb, d / "idx", exact_threshold=5000, target_recall=0.95, n_queries=500, progress=False)
    return d, x, r


def test_ivf_reaches_recall_target(ivf):
    d, x, r = ivf
    assert r.plan["kind"] == "ivf" and r.plan["codes"] == "SQ8"
    assert r.plan["factory"] == f"IVF{choose_nlist(30_000)}_HNSW32,SQ8"
    assert r.recall_at_10 >= 0.95, r.tuning
    # "at least cost": the chosen nprobe is the smallest tried setting that reaches the target
    reaching = [t["nprobe"] for t in r.tuning if t["recall_at_10"] >= 0.95]
    assert r.nprobe == min(reaching) and r.nprobe < choose_nlist(30_000)
    assert any(t["recall_at_10"] < 0.95 for t in r.tuning)  # the search really had to tune
    info = json.loads((d / "idx" / INFO_FILE).read_text())
    assert info["params"]["nprobe"] == r.nprobe and info["recall_at_10"] == r.recall_at_10
    assert info["index_bytes"] == (d / "idx" / info["files"]["faiss"]).stat().st_size
    assert info["index_bytes"] < x.nbytes / 2  # SQ8 codes: ~1/4 of float32 plus ids and centroids

    # independent check on fresh queries from the same distribution (not in the collection)
    idx = load_index(d / "idx")
    q = clustered_vectors(400, 64, seed=99, centres=200)
    base = x.astype(np.float16).astype(np.float32)
    _, got = idx.search(q, 10)
    fresh = recall_at_k(got, exact_topk(base, q, 10))
    # the tuned nprobe was chosen on 500 sampled queries; a fresh sample agrees within sampling error
    assert fresh >= 0.93, fresh


def test_mmap_load_gives_same_results(ivf, tmp_path):
    d, x, _ = ivf
    q = clustered_vectors(50, 64, seed=5, centres=200)
    ram = load_index(d / "idx", mmap=False)
    mm = load_index(d / "idx", mmap=True)
    assert mm.mmap and not ram.mmap
    invlists = faiss.extract_index_ivf(mm.index).invlists
    assert type(faiss.downcast_InvertedLists(invlists)).__name__ == "OnDiskInvertedLists"
    a, ia = ram.search(q, 10)
    b, ib = mm.search(q, 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(a, b)
    # search by a stored vector works on the mapped index (direct map over on-disk lists)
    np.testing.assert_allclose(mm.vector(123), ram.vector(123))
    # exact index, mapped
    emb = write_collection(tmp_path / "emb", x[:2000], shard_size=1000)
    build_index(emb, tmp_path / "flat", n_queries=50, progress=False)
    f_ram, f_mm = load_index(tmp_path / "flat", mmap=False), load_index(tmp_path / "flat", mmap=True)
    np.testing.assert_array_equal(f_ram.search(q, 5)[1], f_mm.search(q, 5)[1])


def test_incremental_add(tmp_path):
    x = clustered_vectors(9000, 32, seed=1, centres=50)
    emb = write_collection(tmp_path / "emb", x[:6000], shard_size=2000)
    build_index(emb, tmp_path / "idx", exact_threshold=1000, n_queries=300, progress=False)
    info0 = json.loads((tmp_path / "idx" / INFO_FILE).read_text())
    assert info0["type"] == "ivf" and info0["ntotal"] == 6000
    # more shards land in the same embedding directory (as a later `clipforge embed` would write)
    write_collection(tmp_path / "emb", x[6000:8000], shard_size=2000, start_shard=3, first_key=6000)
    r = add_to_index(tmp_path / "emb", tmp_path / "idx", n_queries=300, progress=False)
    assert r.added == 2000 and r.ntotal == 8000 and r.recall_at_10 is not None
    # and a second embedding directory made with the same model
    write_collection(tmp_path / "emb2", x[8000:], shard_size=600, key_prefix="w")
    r2 = add_to_index(tmp_path / "emb2", tmp_path / "idx", n_queries=300, progress=False)
    assert r2.added == 1000 and r2.ntotal == 9000
    assert r2.recall_at_10 >= 0.95  # re-tuned over the grown collection
    idx = load_index(tmp_path / "idx")
    info = idx.info
    assert [s["name"] for s in info["sources"]] == ["00000", "00001", "00002", "00003", "00000", "00001"]
    assert [s["first_id"] for s in info["sources"]] == [0, 2000, 4000, 6000, 8000, 8600]
    assert idx.row(6500)["key"] == "v6500" and idx.row(8000)["key"] == "w0" and idx.row(8999)["key"] == "w999"
    assert idx.metadata.column("id").to_pylist() == list(range(9000))
    # new vectors are findable under their new ids
    base = x.astype(np.float16).astype(np.float32)
    _, ids = idx.search(base[[6100, 8500]], 1)
    assert ids[:, 0].tolist() == [6100, 8500]
    # adding again is a no-op; other weights are refused
    r3 = add_to_index(tmp_path / "emb", tmp_path / "idx", progress=False)
    assert r3.added == 0 and r3.notes == ["no new shards: index unchanged"]
    write_collection(tmp_path / "emb3", x[:100], shard_size=100, weights="other")
    with pytest.raises(ValueError, match="different model weights"):
        add_to_index(tmp_path / "emb3", tmp_path / "idx", progress=False)


def test_add_to_exact_index_notes_threshold(tmp_path):
    x = clustered_vectors(1500, 16, seed=2)
    emb = write_collection(tmp_path / "emb", x[:1000], shard_size=500)
    build_index(emb, tmp_path / "idx", exact_threshold=1200, n_queries=50, progress=False)
    write_collection(tmp_path / "emb", x[1000:], shard_size=500, start_shard=2, first_key=1000)
    r = add_to_index(emb, tmp_path / "idx", n_queries=50, progress=False)
    assert r.ntotal == 1500 and r.recall_at_10 == pytest.approx(1.0, abs=0.002)
    assert any("rebuild" in n for n in r.notes)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="embedding directory not found"):
        build_index(tmp_path / "nope", tmp_path / "idx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither manifest.json nor img_emb"):
        build_index(tmp_path / "empty", tmp_path / "idx")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a \\(complete\\) index"):
        load_index(tmp_path / "half")
    x = clustered_vectors(100, 8)
    write_collection(tmp_path / "e", x, shard_size=50)
    build_index(tmp_path / "e", tmp_path / "i", n_queries=10, progress=False)
    write_collection(tmp_path / "e16", clustered_vectors(100, 16), shard_size=50)
    with pytest.raises(ValueError, match="dim 16"):
        add_to_index(tmp_path / "e16", tmp_path / "i", progress=False)
