"""img2dataset's shard layout, against img2dataset's own writer code (1.47: ``writer.py`` +
``logger.write_stats``): its shards are read (and counted from their side files), and our
ShardWriter writes the same members, parquet schema and ``_stats.json`` keys.

img2dataset's package ``__init__`` pulls in its whole downloader (fire, wandb, requests ...), so
its ``writer`` and ``logger`` modules are loaded from their files (wandb stubbed: ``write_stats``
does not use it). Needs ``pip install --no-deps img2dataset webdataset`` plus pyarrow and fsspec.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
import types
from pathlib import Path

import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("fsspec")
pytest.importorskip("webdataset")


def _i2d_module(name: str):
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("img2dataset is not installed (pip install --no-deps img2dataset webdataset)")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{name}.py"
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    mod_spec = importlib.util.spec_from_file_location(f"_i2d_{name}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _jpeg(colour, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _i2d_schema():
    """The schema img2dataset's downloader gives its writers (input columns url, caption)."""
    return (pa.schema([pa.field("url", pa.string()), pa.field("caption", pa.string())])
            .append(pa.field("key", pa.string())).append(pa.field("status", pa.string()))
            .append(pa.field("error_message", pa.string())).append(pa.field("width", pa.int32()))
            .append(pa.field("height", pa.int32())).append(pa.field("original_width", pa.int32()))
            .append(pa.field("original_height", pa.int32())))


def _write_with_img2dataset(folder: Path) -> None:
    writer, logger = _i2d_module("writer"), _i2d_module("logger")
    w = writer.WebDatasetSampleWriter(0, str(folder), True, 5, _i2d_schema(), "jpg")
    samples = [("000000000", "a red square", (200, 0, 0), None), ("000000001", "lost", None, "HTTP 404"),
               ("000000002", "a blue square", (0, 0, 200), None)]
    status = logger.CappedCounter()
    for key, caption, colour, err in samples:
        meta = {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key,
                "status": "failed_to_download" if err else "success", "error_message": err,
                "width": None if err else 20, "height": None if err else 16,
                "original_width": None if err else 40, "original_height": None if err else 32}
        status.increment(err or "success")
        w.write(None if err else _jpeg(colour), key, caption, meta)
    w.close()
    logger.write_stats(str(folder), 0, 3, 2, 1, 0, 100.0, 101.5, status, 5)


def test_shards_written_by_img2dataset_are_read_and_counted(tmp_path):
    from clipforge.data import open_pairs

    _write_with_img2dataset(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    src = open_pairs(str(tmp_path))
    assert src.num_samples == 2  # _stats.json: successes
    samples = list(src.iter_samples(shuffle=False))
    assert [(s.key, s.captions) for s in samples] == [("000000000", ["a red square"]),
                                                      ("000000002", ["a blue square"])]
    assert samples[0].meta["json"]["original_width"] == 40
    (tmp_path / "00000_stats.json").unlink()
    assert open_pairs(str(tmp_path)).num_samples == 2  # the parquet's success rows


def test_our_writer_matches_img2dataset_layout(tmp_path):
    from clipforge.curation.writer import ShardWriter
    from clipforge.data.shards import read_shard

    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    _write_with_img2dataset(theirs)
    with ShardWriter(ours / "00000.tar", write_stats=True) as w:  # copy their samples, as curation does
        for rec in read_shard(str(theirs / "00000.tar"), None):
            w.write(rec.key, rec.files)
    with tarfile.open(theirs / "00000.tar") as a, tarfile.open(ours / "00000.tar") as b:
        assert a.getnames() == b.getnames()
        assert all(a.extractfile(m).read() == b.extractfile(n).read() for m, n in zip(a, b))
    t_theirs, t_ours = pq.read_table(theirs / "00000.parquet"), pq.read_table(ours / "00000.parquet")
    assert t_ours.schema.equals(t_theirs.schema)
    success = [r for r in t_theirs.to_pylist() if r["status"] == "success"]
    assert t_ours.to_pylist() == success  # they also list failed downloads, which have no tar members
    s_theirs = json.loads((theirs / "00000_stats.json").read_text())
    s_ours = json.loads((ours / "00000_stats.json").read_text())
    assert list(s_ours) == list(s_theirs)
    assert (s_ours["count"], s_ours["successes"], s_ours["status_dict"]) == (2, 2, {"success": 2})
