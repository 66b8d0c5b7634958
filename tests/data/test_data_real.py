"""Integration on real photos: Flickr8k re-packed as img2dataset shards, read by the loader with
the real tokenizer and training transform; plus SkipStats bookkeeping."""

from __future__ import annotations

import csv
import json
import tarfile

import torch
from data.datatestutil import write_tar

from clipforge.config import PreprocessConfig
from clipforge.data import SkipStats, make_pair_loader, open_pairs
from clipforge.preprocess import image_transform
from clipforge.tokenizer import tokenize


def test_flickr8k_as_shards(shared_data, tmp_path):
    fl = shared_data / "flickr8k"
    caps: dict[str, list[str]] = {}
    with open(fl / "captions.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == "test":
                caps.setdefault(row["image"], []).append(row["caption"])
    with tarfile.open(fl / "images_128_test.tar") as tf:
        members = [m for m in tf.getmembers()][:24]
        data = {m.name: tf.extractfile(m).read() for m in members}
    names = list(data)
    for s in range(2):
        out = []
        for k, name in enumerate(names[s * 12:(s + 1) * 12]):
            key = f"{s:05d}{k:04d}"
            meta = json.dumps({"caption": caps[name], "url": name}).encode()
            out += [(f"{key}.jpg", data[name]), (f"{key}.json", meta)]
        write_tar(tmp_path / f"{s:05d}.tar", out)
    src = open_pairs(str(tmp_path / "{00000..00001}.tar"))
    samples = list(src.iter_samples(shuffle=False))
    assert len(samples) == 24 and all(len(s.captions) == 5 for s in samples)
    assert samples[0].image.size == (128, 128) and samples[0].meta["json"]["url"] == names[0]
    loader = make_pair_loader(src, transform=image_transform(PreprocessConfig(image_size=64), train=True),
                              tokenize=lambda t: tokenize(t, truncate=True), batch_size=8, seed=0)
    images, ids = next(loader)
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32 and ids.shape == (8, 77)
    assert (ids[:, 0] == 49406).all() and loader.stats.total == 0


def test_skip_stats_merge_and_dict():
    a, b = SkipStats(max_examples=3), SkipStats()
    a.add("missing_file", "x")
    b.add("missing_file", "y")
    b.add("decode_error", "z", "bad bytes")
    a.merge(b).merge({"counts": {"empty_caption": 2}, "examples": [{"key": "w", "reason": "empty_caption"}]})
    assert a.counts == {"missing_file": 2, "decode_error": 1, "empty_caption": 2} and a.total == 5
    assert [e["key"] for e in a.examples] == ["x", "y", "z"]  # capped at max_examples
    d = a.to_dict()
    assert d["total"] == 5 and SkipStats.from_dict(d).counts == a.counts
    assert "total=5" in repr(a)
