"""Manifest pair sources: formats, grouping, bad rows, errors."""

from __future__ import annotations

import json
import logging

import pytest
from data.datatestutil import image_bytes

from clipforge.data import ManifestSource, open_pairs


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.png").write_bytes(image_bytes((10 * i, 100, 200)))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return d


def test_csv_relative_paths_and_several_captions(tmp_path, image_dir):
    m = tmp_path / "pairs.csv"
    m.write_text('filepath,title\nimgs/0.png,"a cat, sitting"\nimgs/1.png,a dog\nimgs/0.png,a small cat\n'
                 'imgs/2.png,"[""two"", ""captions""]"\n', encoding="utf-8")
    src = open_pairs(str(m))
    assert isinstance(src, ManifestSource) and src.is_map_style
    assert len(src) == 3 and src.num_samples == 3
    s0 = src.get(0)
    assert s0.key == "imgs/0.png" and s0.captions == ["a cat, sitting", "a small cat"]
    assert s0.image.size == (12, 10) and s0.meta["path"].endswith("0.png")
    assert src.get(2).captions == ["two", "captions"]  # JSON list in a CSV cell


def test_tsv_unquoted_and_split_column(tmp_path, image_dir):
    m = tmp_path / "pairs.tsv"
    m.write_text('image\tsplit\tcaption\nimgs/0.png\ttrain\ta "quoted" word\nimgs/1.png\ttest\tother\n'
                 'imgs/3.png\ttrain\tthird\n', encoding="utf-8")
    src = open_pairs(str(m), split="train")
    assert [src.get(i).captions for i in range(len(src))] == [['a "quoted" word'], ["third"]]
    assert len(open_pairs(str(m), split="test")) == 1
    with pytest.raises(ValueError, match=r"pairs\.tsv.*split='val'.*train"):
        open_pairs(str(m), split="val")


def test_jsonl_list_captions_and_caption_key(tmp_path, image_dir):
    m = tmp_path / "pairs.jsonl"
    rows = [{"file": str(image_dir / "0.png"), "captions": ["one", " ", "two"], "alt": "x0"},
            {"file": "imgs/1.png", "captions": "three", "alt": "x1"}]
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    src = open_pairs(str(m))
    assert src.get(0).captions == ["one", "two"]  # absolute path kept, blank caption dropped
    assert src.get(1).captions == ["three"]
    src2 = open_pairs(str(m), caption_key="ALT")
    assert src2.get(1).captions == ["x1"]


def test_bad_rows_are_skipped_and_counted(tmp_path, image_dir, caplog):
    m = tmp_path / "pairs.csv"
    m.write_text("image,caption\nimgs/0.png,good zero\nimgs/missing.png,gone\nimgs/corrupt.jpg,broken\n"
                 "imgs/1.png,\nimgs/2.png,good two\n,no image\n", encoding="utf-8")
    src = open_pairs(str(m))
    assert len(src) == 6
    with caplog.at_level(logging.WARNING, logger="clipforge.data"):
        got = list(src.iter_samples())
    assert [s.captions[0] for s in got] == ["good zero", "good two"]
    assert src.stats.counts == {"missing_file": 1, "decode_error": 1, "empty_caption": 1, "missing_image": 1}
    assert src.stats.total == 4
    assert {e["key"] for e in src.stats.examples} >= {"imgs/missing.png", "imgs/corrupt.jpg", "imgs/1.png"}
    assert "imgs/missing.png" in caplog.text
    details = {e["reason"]: e["detail"] for e in src.stats.examples}
    assert details["empty_caption"] == "pairs.csv line 5: empty 'caption' cell"
    assert details["missing_image"] == "pairs.csv line 7: empty 'image' cell"
    d = src.stats.to_dict()
    assert d["total"] == 4 and d["counts"]["decode_error"] == 1


def test_iter_samples_partitions_cover_all(tmp_path, image_dir):
    m = tmp_path / "pairs.csv"
    m.write_text("image,caption\n" + "".join(f"imgs/{i}.png,c{i}\n" for i in range(4)), encoding="utf-8")
    src = open_pairs(str(m))
    parts = [[s.key for s in src.iter_samples(rank=r, world_size=2, worker_id=w, num_workers=2)]
             for r in range(2) for w in range(2)]
    flat = [k for p in parts for k in p]
    assert sorted(flat) == sorted(f"imgs/{i}.png" for i in range(4)) and len(set(flat)) == 4
    a = [s.key for s in src.iter_samples(shuffle=True, seed=1, epoch=0)]
    b = [s.key for s in src.iter_samples(shuffle=True, seed=1, epoch=0)]
    assert a == b and sorted(a) == sorted(flat)


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        open_pairs(str(tmp_path / "nope.csv"))
    m = tmp_path / "cols.csv"
    m.write_text("image,label\na.png,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cols\.csv.*caption.*\['image', 'label'\]"):
        open_pairs(str(m))
    m2 = tmp_path / "noimg.tsv"
    m2.write_text("url\tcaption\nx\ty\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"noimg\.tsv.*image.*\['url', 'caption'\]"):
        open_pairs(str(m2))
    j = tmp_path / "bad.jsonl"
    j.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": "b.png", "caption": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3"):
        open_pairs(str(j))
    j2 = tmp_path / "list.jsonl"
    j2.write_text('["not", "an object"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.jsonl: line 1: expected a JSON object"):
        open_pairs(str(j2))
    e = tmp_path / "empty.csv"
    e.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.csv"):
        open_pairs(str(e))
    with pytest.raises(ValueError, match="no image column 'pic'"):
        ManifestSource(m, image_key="pic")


# --------------------------------------------------------------------------- open_clip's CSV conventions
def test_open_clip_tab_separated_csv_is_sniffed(tmp_path, image_dir):
    """open_clip_train writes/reads tab-separated ``.csv`` files with ``filepath`` / ``title``."""
    m = tmp_path / "train.csv"
    m.write_text("filepath\ttitle\nimgs/0.png\ta cat, sitting\nimgs/1.png\ta dog; running\n", encoding="utf-8")
    src = open_pairs(str(m))
    assert (src.image_column, src.caption_column) == ("filepath", "title")
    assert [src.captions(i) for i in range(len(src))] == [["a cat, sitting"], ["a dog; running"]]
    assert src.get(1).meta["path"].endswith("1.png")
    m2 = tmp_path / "semi.csv"
    m2.write_text("image;caption\nimgs/2.png;x, y\n", encoding="utf-8")
    assert open_pairs(str(m2)).captions(0) == ["x, y"]


def test_explicit_separator_and_column_keys(tmp_path, image_dir):
    m = tmp_path / "own.csv"
    m.write_text("id|img_rel|alt_text|caption\n7|imgs/0.png|the alt|not this one\n", encoding="utf-8")
    src = open_pairs(str(m), csv_separator="|", image_key="img_rel", caption_key="alt_text")
    assert (src.image_column, src.caption_column) == ("img_rel", "alt_text") and src.captions(0) == ["the alt"]
    assert src.get(0).image.size == (12, 10)
    with pytest.raises(ValueError, match=r"own\.csv: no image column 'filepath'; columns found: \['id\|img_rel"):
        open_pairs(str(m), csv_separator=";", image_key="filepath")
    tsv = tmp_path / "t.csv"
    tsv.write_text("filepath\ttitle\nimgs/0.png\tok\n", encoding="utf-8")
    for sep in ("\\t", "tab", "\t"):  # as typed on a command line, or the character itself
        assert open_pairs(str(tsv), csv_separator=sep).captions(0) == ["ok"]
    with pytest.raises(ValueError, match="csv separator must be one character"):
        open_pairs(str(tsv), csv_separator="::")


def test_row_with_extra_fields_names_file_line_and_columns(tmp_path, image_dir):
    m = tmp_path / "bad.csv"
    m.write_text("filepath,title\nimgs/0.png,fine\nimgs/1.png,a cat, unquoted comma\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: 3 comma-separated fields but the header has 2 columns "
                                         r"\['filepath', 'title'\]; field 3 \(' unquoted comma'\) has no column"):
        open_pairs(str(m))


def test_train_config_and_cli_take_open_clip_csv_options(tmp_path, image_dir):
    from conftest import micro_config

    from clipforge.cli.main import main
    from clipforge.training import TrainConfig

    assert TrainConfig(csv_separator="\\t").csv_separator == "\t"
    with pytest.raises(ValueError, match="csv_separator: csv separator must be one character"):
        TrainConfig(csv_separator="ab")
    m = tmp_path / "oc.csv"
    m.write_text("fp;cap\n" + "".join(f"imgs/{i}.png;caption {i}\n" for i in range(4)), encoding="utf-8")
    cfg = tmp_path / "micro.json"
    cfg.write_text(micro_config("vit").to_json())
    out = tmp_path / "run"
    assert main(["train", "--model", str(cfg), "--data", str(m), "--csv-separator", ";", "--csv-img-key", "fp",
                 "--csv-caption-key", "cap", "--steps", "1", "--batch-size", "2", "--workers", "0",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["csv_separator"], saved["csv_img_key"], saved["csv_caption_key"]) == (";", "fp", "cap")
