"""The one embeddings store (clipforge.embeddings): folders without our manifest (clip-retrieval's
layout, curation's parts), the old ``path`` column, and the errors that name the file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.embeddings import Collection, load_metadata, write_part
from clipforge.search.index import build_index, load_index
from search.searchutil import clustered_vectors, write_collection


def _foreign(root, parts: list[np.ndarray], label_width: int = 1, text: bool = False):
    """A clip-retrieval-style folder: img_emb_N.npy (N unpadded) + metadata_N.parquet with image_path/caption."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    if text:
        (root / "text_emb").mkdir()
    first = 0
    for n, x in enumerate(parts):
        label = str(n).zfill(label_width)
        np.save(root / "img_emb" / f"img_emb_{label}.npy", x.astype(np.float16))
        if text:
            np.save(root / "text_emb" / f"text_emb_{label}.npy", x[:, ::-1].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"/data/{first + i}.jpg" for i in range(len(x))],
                                 "caption": [f"cap {first + i}" for i in range(len(x))]}),
                       root / "metadata" / f"metadata_{label}.parquet")
        first += len(x)
    return root


def test_foreign_folder_in_numeric_order(tmp_path):
    x = clustered_vectors(250, 16, seed=0)
    parts = [x[:100], x[100:200], x[200:]]
    root = _foreign(tmp_path / "f", parts)
    # shard 10 sorts before 2 as text: the ids must follow the numbers
    for p in (root / "img_emb").iterdir():
        p.rename(p.with_name(p.name.replace("_2.npy", "_10.npy")))
    (root / "metadata" / "metadata_2.parquet").rename(root / "metadata" / "metadata_10.parquet")
    coll = Collection.open(root)
    assert coll.foreign and coll.kind == "image" and coll.dim == 16
    assert [sp.name for sp in coll.finished_shards()] == ["0", "1", "10"]
    keys, vecs = coll.read_all()
    assert keys[0] == "/data/0.jpg" and keys[-1] == "/data/249.jpg"
    np.testing.assert_array_equal(vecs, x.astype(np.float16).astype(np.float32))
    build_index(root, tmp_path / "idx", n_queries=10, progress=False)
    idx = load_index(tmp_path / "idx")
    assert idx.row(150)["image_path"] == "/data/150.jpg" and idx.row(150)["caption"] == "cap 150"


def test_foreign_folder_errors_name_the_file(tmp_path):
    x = clustered_vectors(40, 8, seed=0)
    root = _foreign(tmp_path / "a", [x[:20], x[20:]])
    (root / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="img_emb_1.npy: no matching .*metadata_1.parquet"):
        Collection.open(root)
    root = _foreign(tmp_path / "b", [x[:20], clustered_vectors(20, 12, seed=1)])
    with pytest.raises(ValueError, match="img_emb_1.npy: dim 12, earlier shards have 8"):
        Collection.open(root)
    root = _foreign(tmp_path / "c", [x])
    pq.write_table(pa.table({"image_path": ["/x.jpg"] * 3}), root / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match="metadata_0.parquet: 3 rows but img_emb_0.npy has 40"):
        Collection.open(root).read_all()
    (root / "img_emb" / "img_emb_0.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="img_emb_0.npy: not a readable .npy"):
        Collection.open(root)
    with pytest.raises(FileNotFoundError, match="text_emb"):
        Collection.open(_foreign(tmp_path / "d", [x]), "text")


def test_both_kinds_and_kind_mismatch(tmp_path):
    x = clustered_vectors(30, 8, seed=0)
    root = _foreign(tmp_path / "both", [x], text=True)
    assert Collection.open(root).kind == "image"
    t = Collection.open(root, "text")
    np.testing.assert_array_equal(t.read_all()[1], x[:, ::-1].astype(np.float16).astype(np.float32))
    ours = write_collection(tmp_path / "ours", x, shard_size=10)
    with pytest.raises(ValueError, match="holds image embeddings; text embeddings are needed"):
        Collection.open(ours, "text")


def test_legacy_path_column_and_missing_key(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "path": ["/old.jpg"], "caption": ["c"]}), tmp_path / "old.parquet")
    t = load_metadata(tmp_path / "old.parquet")
    assert t.column_names == ["key", "image_path", "caption"] and t.column("image_path")[0].as_py() == "/old.jpg"
    pq.write_table(pa.table({"caption": ["c", "d"]}), tmp_path / "nokey.parquet")
    assert load_metadata(tmp_path / "nokey.parquet", "7").column("key").to_pylist() == ["7:0", "7:1"]


def test_write_part_round_trip(tmp_path):
    x = clustered_vectors(12, 8, seed=0)
    write_part(tmp_path / "p", 0, [f"k{i}" for i in range(6)], image=x[:6], text=x[:6] * 0.5)
    write_part(tmp_path / "p", 1, [f"k{i}" for i in range(6, 12)], image=x[6:], text=x[6:] * 0.5)
    keys, vecs = Collection.open(tmp_path / "p").read_all()
    assert keys == [f"k{i}" for i in range(12)]
    np.testing.assert_array_equal(vecs, x.astype(np.float16).astype(np.float32))
    assert Collection.open(tmp_path / "p", "text").dim == 8
    with pytest.raises(ValueError, match="part 2: image embeddings of shape"):
        write_part(tmp_path / "p", 2, ["a"], image=x[:2])


def test_summary_rewritten_when_another_rank_finishes_meanwhile(tmp_path, monkeypatch):
    """Rank A reads the markers, rank B then finishes its last shard and writes the complete manifest,
    then A writes: A must look again, or its stale 'incomplete' manifest would win."""
    import clipforge.embeddings as store

    root = tmp_path / "emb"
    x = clustered_vectors(8, 4, seed=1)
    rows = [{"image_path": f"/d/{i}.jpg", "caption": f"c{i}"} for i in range(8)]
    store.write_shard(store.ShardPaths(root, "image", 0), x[:4], rows[:4], [])
    base = {"kind": "image", "num_shards": 2}
    real_write = store.write_json
    calls = []

    def write_then_other_rank_finishes(path, obj, *a, **k):
        real_write(path, obj, *a, **k)
        calls.append(obj["complete"])
        if len(calls) == 1:  # B's last shard lands after A has read the markers
            store.write_shard(store.ShardPaths(root, "image", 1), x[4:], rows[4:], [])

    monkeypatch.setattr(store, "write_json", write_then_other_rank_finishes)
    man = store.rebuild_summary(root, "image", base, expected_shards=2)
    assert calls == [False, True]
    assert man["complete"] and man["total"] == 8
    assert store.read_json(root / "manifest.json")["complete"] is True
