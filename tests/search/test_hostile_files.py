"""Hostile entries in image folders: a FIFO named ``x.jpg`` (opening it would block forever), a
file name that is not valid UTF-8, and a symlink loop (``sub/loop -> ..``), through the folder
walker, ``load_image``, ``embed_collection``, labelled folders and ``clipforge embed``."""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from clipforge.checkpoints import save_model
from clipforge.cli.main import main
from clipforge.data import SkipStats, open_labelled
from clipforge.data.files import walk_files
from clipforge.embeddings import load_metadata
from clipforge.preprocess import ImageLoadError, load_image
from clipforge.search.embed import embed_collection
from clipforge.search.sources import ImageFolderSource
from clipforge.utils import fs_name, text_name
from search.searchutil import micro_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="FIFOs and non-UTF-8 names: Linux semantics")

BAD = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8, surrogate-escaped by Python


@pytest.fixture
def no_hang():
    """Turn a hang (a FIFO opened for reading) into a test failure instead of a stuck suite."""
    def boom(*_):
        raise TimeoutError("blocked: something opened the FIFO")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def hostile_folder(root, broken_bad_name: bool = False):
    """3 good images (one in sub/), a non-UTF-8 name, a FIFO ``x.jpg``, a loop ``sub/loop -> ..``."""
    (root / "sub").mkdir(parents=True)
    for i, rel in enumerate(["a.jpg", "b.png", "sub/c.jpg"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / rel)
    bad = os.path.join(os.fsencode(root), os.fsencode(BAD))
    if broken_bad_name:
        with open(bad, "wb") as f:
            f.write(b"not an image")
    else:
        Image.new("RGB", (20, 20), (200, 10, 10)).save(bad, format="JPEG")
    os.mkfifo(root / "x.jpg")
    os.symlink("..", root / "sub" / "loop")
    return root


def test_walker_skips_fifo_follows_each_directory_once_keeps_bytes_names(tmp_path, no_hang):
    root = hostile_folder(tmp_path / "p")
    stats = SkipStats(log_first=0)
    files = walk_files(root, {".jpg", ".png"}, stats)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == ["a.jpg", "b.png", BAD, "sub/c.jpg"]  # not 3 + 120 through sub/loop/sub/loop/...
    assert stats.counts == {"not_regular_file": 1, "directory_seen": 1}
    assert {"key": "x.jpg", "reason": "not_regular_file", "detail": "fifo"} in stats.examples
    # a symlinked directory outside the tree is walked (once), a second link to it is not
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "o.png")
    os.symlink(tmp_path / "outside", root / "l1")
    os.symlink(tmp_path / "outside", root / "l2")
    rel = [p.relative_to(root).as_posix() for p in walk_files(root, {".jpg", ".png"})]
    assert rel == ["a.jpg", "b.png", BAD, "l1/o.png", "sub/c.jpg"]


def test_text_name_round_trips_bytes_names():
    assert text_name("plain/名前.jpg") == "plain/名前.jpg"
    assert text_name(BAD) == "caf\\xe9.jpg"
    text_name(BAD).encode("utf-8")  # storable
    assert fs_name(text_name(BAD)) == BAD
    assert os.fsencode(fs_name(text_name(BAD))) == b"caf\xe9.jpg"
    assert fs_name("literal \\xc3\\xa9 is valid UTF-8") == "literal \\xc3\\xa9 is valid UTF-8"


def test_load_image_refuses_a_fifo_without_blocking(tmp_path, no_hang):
    os.mkfifo(tmp_path / "x.jpg")
    with pytest.raises(ImageLoadError, match=r"x\.jpg: a FIFO, not a regular file"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(ImageLoadError, match="a directory"):
        load_image(tmp_path)


def test_load_image_names_a_bytes_file_printably(tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(path, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ImageLoadError) as e:
        load_image(os.fsdecode(path))
    msg = str(e.value)
    assert "caf\\xe9.jpg" in msg
    msg.encode("utf-8")  # printable on any stdout


def test_embed_collection_end_to_end(tmp_path, no_hang):
    root = hostile_folder(tmp_path / "p", broken_bad_name=True)
    os.symlink(root / "a.jpg", root / "dangling.jpg")
    (root / "a.jpg").rename(root / "a2.jpg")  # dangling.jpg now points nowhere
    src = ImageFolderSource(root)
    s = embed_collection(micro_model(), src, tmp_path / "emb", shard_size=10, progress=False, workers=0,
                         rank=0, world_size=1)
    assert (s.embedded, s.skipped) == (3, 1)
    assert s.data_skips["counts"] == {"broken_link": 1, "directory_seen": 1, "not_regular_file": 1}
    meta = load_metadata(tmp_path / "emb" / "metadata" / "metadata_00000.parquet")
    assert meta.column("key").to_pylist() == ["a2.jpg", "b.png", "sub/c.jpg"]
    errors = [json.loads(line) for line in (tmp_path / "emb" / "errors.jsonl").read_text("utf-8").splitlines()]
    assert [e["key"] for e in errors] == ["caf\\xe9.jpg"]
    assert "caf\\xe9.jpg" in errors[0]["reason"]


def test_bytes_name_stored_losslessly_in_parquet(tmp_path):
    root = hostile_folder(tmp_path / "p")
    embed_collection(micro_model(), ImageFolderSource(root), tmp_path / "emb", shard_size=10, progress=False,
                     workers=2, rank=0, world_size=1)
    rows = load_metadata(tmp_path / "emb" / "metadata" / "metadata_00000.parquet").to_pylist()
    row = next(r for r in rows if r["key"] == "caf\\xe9.jpg")
    # the stored text leads back to the very file: the index/thumbnails can reopen it
    assert os.fsencode(fs_name(row["image_path"])) == os.path.join(os.fsencode(root.resolve()), b"caf\xe9.jpg")
    assert load_image(fs_name(row["image_path"])).size == (20, 20)


def test_labelled_folder_skips_fifo_and_loop(tmp_path, no_hang):
    root = tmp_path / "ds"
    hostile_folder(root / "cat")
    Image.new("RGB", (16, 16)).save(root / "cat" / "sub" / "d.png")
    (root / "dog").mkdir()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "dog" / "e.png")
    ds = open_labelled(str(root))
    assert list(ds.labels) == [0, 0, 0, 0, 0, 1]
    assert ds.keys[2] == "cat/caf\\xe9.jpg"
    assert ds[2].size == (20, 20)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_model(micro_model(), tmp_path_factory.mktemp("m") / "micro.safetensors")


def test_cli_embed_hostile_folder(tmp_path, ckpt, capsys, no_hang):
    root = hostile_folder(tmp_path / "p")
    code = main(["embed", "--model", str(ckpt), "--images", str(root), "--out", str(tmp_path / "emb"),
                 "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert (summary["embedded"], summary["skipped"]) == (4, 0)
    assert summary["data_skips"]["counts"] == {"directory_seen": 1, "not_regular_file": 1}
    assert code == 0
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    keys = sorted(r["key"] for r in load_metadata(tmp_path / "emb" / "metadata" / "metadata_00000.parquet").to_pylist())
    assert keys == ["a.jpg", "b.png", "caf\\xe9.jpg", "sub/c.jpg"]


def test_thumbnail_of_a_bytes_name_is_served(tmp_path):
    """The index stores a non-UTF-8 file name as ``\\xNN`` text; the thumbnail must reopen the file."""
    from fastapi.testclient import TestClient

    from clipforge.search.index import build_index
    from clipforge.search.service import create_app

    root = hostile_folder(tmp_path / "p")
    os.unlink(root / "x.jpg")  # the FIFO and the loop are not this test's subject
    model = micro_model()
    embed_collection(model, ImageFolderSource(root), tmp_path / "emb", shard_size=10, progress=False, workers=0,
                     rank=0, world_size=1)
    build_index(tmp_path / "emb", tmp_path / "idx")
    client = TestClient(create_app(tmp_path / "idx", model), raise_server_exceptions=False)
    n = client.get("/health").json()["items"]
    ids = [i for i in range(n) if client.get(f"/items/{i}").json().get("key") == "caf\\xe9.jpg"]
    assert len(ids) == 1
    r = client.get(f"/items/{ids[0]}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
