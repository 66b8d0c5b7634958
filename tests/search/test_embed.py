"""Embedding collections: layout, correctness, bad items, resume after a kill, ranks, texts, data specs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipforge.inference import embed_images, embed_texts
from clipforge.preprocess import load_image
from clipforge.search.embed import embed_collection
from clipforge.search.sources import ImageFolderSource, PairDataSource, TextFileSource, open_source
from clipforge.embeddings import Collection, ShardPaths, weights_sha256
from search.searchutil import make_image_folder, micro_model, write_webdataset


@pytest.fixture(scope="module")
def model():
    return micro_model()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    facts = make_image_folder(root)
    return root, facts


def _embed(model, root, out, **kw):
    kw.setdefault("shard_size", 4)
    kw.setdefault("progress", False)
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return embed_collection(model, ImageFolderSource(root), out, **kw)


def _all(out: Path) -> tuple[np.ndarray, list[dict]]:
    coll = Collection.open(out)
    embs, rows = [], []
    for sp in coll.finished_shards():
        embs.append(np.load(sp.emb))
        rows += pq.read_table(sp.metadata).to_pylist()
    return np.concatenate(embs), rows


def test_folder_listing_is_sorted_recursive_and_filtered(folder):
    root, facts = folder
    keys = [it.key for it in ImageFolderSource(root)]
    assert keys == sorted(keys)
    assert set(keys) == set(facts["sizes"]) | set(facts["bad"])  # no .md, no hidden file
    cap = {it.key: it.caption for it in ImageFolderSource(root)}
    assert cap["b/c/img_01.png"] == "a caption for image one"
    assert cap["a/img_00.jpg"] is None


def test_layout_and_contents(model, folder, tmp_path):
    root, facts = folder
    out = tmp_path / "emb"
    s = _embed(model, root, out)
    n_items = len(facts["sizes"]) + len(facts["bad"])
    assert s.num_shards == -(-n_items // 4) and s.complete and s.written == list(range(s.num_shards))
    assert s.embedded == len(facts["sizes"]) and s.skipped == 2
    for i in range(s.num_shards):
        sp = ShardPaths(out, "image", i)
        assert sp.emb == out / "img_emb" / f"img_emb_{i:05d}.npy"
        assert sp.metadata == out / "metadata" / f"metadata_{i:05d}.parquet"
        assert sp.is_finished()
        arr = np.load(sp.emb)
        assert arr.dtype == np.float16 and arr.shape[1] == model.config.embed_dim
        assert set(pq.read_table(sp.metadata).column_names) >= {"key", "image_path", "caption", "width", "height"}
    man = json.loads((out / "manifest.json").read_text())
    assert man["dim"] == model.config.embed_dim and man["dtype"] == "float16" and man["kind"] == "image"
    assert man["model"]["weights_sha256"] == weights_sha256(model)
    assert man["model"]["config"] == model.config.to_dict()
    assert [sh["count"] for sh in man["shards"]] == [len(np.load(ShardPaths(out, "image", i).emb))
                                                     for i in range(s.num_shards)]
    assert man["total"] == len(facts["sizes"]) and man["complete"]

    emb, rows = _all(out)
    assert [r["key"] for r in rows] == sorted(facts["sizes"])  # bad ones dropped, order kept
    for r in rows:
        assert (r["width"], r["height"]) == facts["sizes"][r["key"]]
        assert Path(r["image_path"]) == root / r["key"]
    # the stored vectors are the model's normalised embeddings of exactly those files
    ref = embed_images(model, [load_image(root / r["key"]) for r in rows]).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_bad_images_are_skipped_and_logged(model, folder, tmp_path):
    root, facts = folder
    out = tmp_path / "emb"
    s = _embed(model, root, out)
    assert s.total_skipped == 2
    log = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in log) == sorted(facts["bad"])
    for e in log:
        assert e["key"] in e["reason"] and e["shard"]  # the reason names the file
    assert json.loads((out / "manifest.json").read_text())["skipped"] == 2


def test_resume_redoes_partial_shards_and_skips_finished(model, folder, tmp_path):
    root, _ = folder
    out = tmp_path / "emb"
    first = _embed(model, root, out)
    n = first.num_shards
    assert n >= 4
    before = {i: (ShardPaths(out, "image", i).emb.stat().st_mtime_ns, ShardPaths(out, "image", i).emb.read_bytes())
              for i in range(n)}
    # kill simulation: shard 1 was being rewritten (garbage .npy, no marker yet), shard 2 lost its
    # metadata, shard 3 only got its marker removed
    s1, s2, s3 = (ShardPaths(out, "image", i) for i in (1, 2, 3))
    s1.marker.unlink()
    s1.emb.write_bytes(b"partial garbage")
    s2.metadata.unlink()
    s3.marker.unlink()
    again = _embed(model, root, out)
    assert again.written == [1, 2, 3]
    assert again.already_done == [i for i in range(n) if i not in (1, 2, 3)]
    for i in range(n):
        sp = ShardPaths(out, "image", i)
        assert sp.is_finished()
        assert sp.emb.read_bytes() == before[i][1]  # redone shards are identical to the originals
        if i not in (1, 2, 3):
            assert sp.emb.stat().st_mtime_ns == before[i][0]  # finished shards untouched
    assert again.complete and again.total == first.total
    # a third run does nothing
    third = _embed(model, root, out)
    assert third.written == [] and len(third.already_done) == n


def test_resume_refuses_other_weights(model, folder, tmp_path):
    root, _ = folder
    out = tmp_path / "emb"
    _embed(model, root, out)
    with pytest.raises(ValueError, match="different model weights"):
        _embed(micro_model(seed=1), root, out)
    with pytest.raises(ValueError, match="shard_size"):
        _embed(model, root, out, shard_size=5)


def test_ranks_split_shards_and_match_single_process(model, folder, tmp_path):
    root, _ = folder
    single = tmp_path / "single"
    _embed(model, root, single)
    multi = tmp_path / "multi"
    r1 = _embed(model, root, multi, rank=1, world_size=2)
    assert r1.written == [i for i in range(r1.num_shards) if i % 2 == 1] and not r1.complete
    r0 = _embed(model, root, multi, rank=0, world_size=2)
    assert r0.written == [i for i in range(r0.num_shards) if i % 2 == 0] and r0.complete
    a, ra = _all(single)
    b, rb = _all(multi)
    np.testing.assert_array_equal(a, b)
    assert ra == rb
    assert (single / "errors.jsonl").read_text() == (multi / "errors.jsonl").read_text()


def test_torchrun_env_is_read(model, folder, tmp_path, monkeypatch):
    root, _ = folder
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    s = embed_collection(model, ImageFolderSource(root), tmp_path / "e", shard_size=4, progress=False)
    assert s.written == [i for i in range(s.num_shards) if i % 3 == 1]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3"):
        embed_collection(model, ImageFolderSource(root), tmp_path / "e", shard_size=4, progress=False)


def test_text_collection(model, tmp_path):
    texts = ["a photo of a dog", "", "a red car parked outside", "   ", "two people on a beach", "sunset"]
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "temb"
    s = embed_collection(model, TextFileSource(f), out, shard_size=2, progress=False, rank=0, world_size=1)
    assert s.kind == "text" and s.embedded == 4 and s.skipped == 2 and s.complete
    assert (out / "text_emb" / "text_emb_00000.npy").is_file()
    emb, rows = _all(out)
    assert [r["key"] for r in rows] == ["line:1", "line:3", "line:5", "line:6"]
    kept = [t for t in texts if t.strip()]
    assert [r["caption"] for r in rows] == kept
    np.testing.assert_allclose(emb.astype(np.float32), embed_texts(model, kept).numpy(), atol=2e-3)
    log = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["key"] for e in log] == ["line:2", "line:4"]


def test_manifest_source_via_clipforge_data(model, folder, tmp_path):
    root, facts = folder
    good = sorted(facts["sizes"])[:5]
    lines = ["image\tcaption"] + [f"{root / k}\tcaption {i}" for i, k in enumerate(good)]
    lines.append(f"{root / 'does_not_exist.jpg'}\tmissing")
    lines.append(f"{root / 'broken.jpg'}\tbroken")
    man = tmp_path / "pairs.tsv"
    man.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "memb"
    s = embed_collection(model, open_source(data=str(man)), out, shard_size=3, progress=False, rank=0, world_size=1)
    assert s.embedded == 5 and s.skipped == 2
    _, rows = _all(out)
    assert [r["caption"] for r in rows] == [f"caption {i}" for i in range(5)]
    assert all(Path(r["image_path"]).is_file() for r in rows)
    reasons = {json.loads(x)["key"]: json.loads(x)["reason"] for x in (out / "errors.jsonl").read_text().splitlines()}
    assert "missing_file" in reasons[str(root / "does_not_exist.jpg")]
    assert "decode_error" in reasons[str(root / "broken.jpg")]
    # captions of the same manifest as a text collection
    tout = tmp_path / "mtext"
    t = embed_collection(model, open_source(texts=str(man)), tout, shard_size=4, progress=False, rank=0, world_size=1)
    assert t.kind == "text" and t.embedded == 7


def test_webdataset_shards(model, tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    write_webdataset(d / "part-000.tar", 5, start=0, corrupt=3)
    write_webdataset(d / "part-001.tar", 4, start=5)
    src = PairDataSource(str(d / "part-{000..001}.tar"))
    out = tmp_path / "wemb"
    s = embed_collection(model, src, out, shard_size=4, progress=False, rank=0, world_size=1)
    assert s.embedded == 8 and s.skipped == 1
    _, rows = _all(out)
    assert [r["key"] for r in rows] == [f"s{i:05d}" for i in range(9) if i != 3]
    assert rows[0]["member"] == "s00000.jpg" and rows[0]["image_path"].endswith("part-000.tar")
    assert rows[-1]["caption"] == "caption of sample 8"
    # resume works for streams too
    ShardPaths(out, "image", 1).marker.unlink()
    again = embed_collection(model, PairDataSource(str(d / "part-{000..001}.tar")), out, shard_size=4,
                             progress=False, rank=0, world_size=1)
    assert again.written == [1] and again.complete


def test_cli_embed(model, folder, tmp_path, capsys):
    from clipforge.checkpoints import save_model
    from clipforge.cli.main import main

    root, facts = folder
    ckpt = save_model(model, tmp_path / "micro.safetensors")
    out = tmp_path / "cli_emb"
    assert main(["embed", "--model", str(ckpt), "--images", str(root), "--out", str(out), "--shard-size", "5",
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == len(facts["sizes"]) and summary["total_skipped"] == 2 and summary["complete"]
    assert main(["embed", "--model", str(ckpt), "--images", str(root / "nope"), "--out", str(out)]) == 2  # parsing
    assert "argument --images: folder not found" in capsys.readouterr().err


def test_outputs_are_written_atomically_no_temp_files(model, folder, tmp_path):
    root, _ = folder
    out = tmp_path / "emb"
    _embed(model, root, out)
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    assert os.listdir(out / "done")
