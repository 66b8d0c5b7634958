"""WebDataset shard sources: img2dataset layout, bad members, shard patterns, partitioning."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
from data.datatestutil import image_bytes, make_shards, sample_members, write_tar

from clipforge.data import ShardSource, expand_braces, open_pairs, resolve_shards
from clipforge.data.shards import read_shard


def _keys(samples):
    return [s.key for s in samples]


def test_brace_expansion():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{8..10}") == ["x8", "x9", "x10"]
    assert expand_braces("{a,b{0..1}}z") == ["az", "b0z", "b1z"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("lit{x}.tar") == ["lit{x}.tar"]


def test_shard_patterns(tmp_path):
    paths = make_shards(tmp_path / "a", 4, 2)
    make_shards(tmp_path / "b", 2, 2)
    d = tmp_path / "a"
    assert resolve_shards(str(d / "{00000..00003}.tar")) == paths
    assert resolve_shards(str(d)) == paths                            # directory
    assert resolve_shards(str(d / "*.tar")) == paths                  # glob
    both = resolve_shards(f"{d}/{{00000..00001}}.tar::{tmp_path}/b/{{00000,00001}}.tar")
    assert len(both) == 4 and both[:2] == paths[:2]
    assert resolve_shards(f"{paths[0]},{paths[1]},{paths[0]}") == paths[:2]  # comma list, deduplicated
    with pytest.raises(FileNotFoundError, match=r"no shard file matches .*\{00010\.\.00012\}"):
        resolve_shards(str(d / "{00010..00012}.tar"))
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        resolve_shards(str(d / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="shard not found"):
        open_pairs(str(d / "missing.tar"))
    with pytest.raises(ValueError, match="empty shard list"):
        resolve_shards(" , :: ")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards in directory"):
        open_pairs(str(tmp_path / "empty"))


def test_partial_brace_pattern_warns(tmp_path, caplog):
    paths = make_shards(tmp_path, 2, 1)
    with caplog.at_level(logging.WARNING, logger="clipforge.data"):
        got = resolve_shards(str(tmp_path / "{00000..00003}.tar"))
    assert got == paths and "2 of 4 shards" in caplog.text


def test_reads_img2dataset_layout(tmp_path):
    make_shards(tmp_path, 3, 4)
    src = open_pairs(str(tmp_path / "{00000..00002}.tar"))
    assert isinstance(src, ShardSource) and not src.is_map_style and src.num_samples is None
    samples = list(src.iter_samples(shuffle=False))
    assert _keys(samples) == [f"{s:05d}{i:04d}" for s in range(3) for i in range(4)]
    assert all(s.captions == [f"caption {s.key}"] for s in samples)
    assert samples[0].image.size == (12, 10) and samples[0].meta["shard"].endswith("00000.tar")
    assert samples[0].meta["json"]["status"] == "success"
    assert src.stats.total == 0
    with pytest.raises(TypeError):
        len(src)


def test_json_captions_caption_key_and_stats_count(tmp_path):
    img = image_bytes()
    members = (sample_members("k0", "from json", img=img, as_json=True)
               + sample_members("k1", "from txt", img=img, extra_json={"caption": "json loses", "alt": "alt text"})
               + sample_members("k2", ["first", "second"], img=img, ext="webp", as_json=True))
    members = [(n, d) for n, d in members]
    write_tar(tmp_path / "00000.tar", members)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 3, "failed_to_download": 1}))
    src = open_pairs(str(tmp_path / "00000.tar"))
    assert src.num_samples == 3
    caps = {s.key: s.captions for s in src.iter_samples()}
    assert caps == {"k0": ["from json"], "k1": ["from txt"], "k2": ["first", "second"]}
    alt = {s.key: s.captions for s in open_pairs(str(tmp_path / "00000.tar"), caption_key="alt").iter_samples()}
    assert alt == {"k1": ["alt text"]}


def test_bad_members_skipped_and_counted(tmp_path, caplog):
    good = image_bytes()
    members = (sample_members("a", "good a", img=good)
               + sample_members("b", "corrupt image", img=b"\x89PNG\r\n\x1a\n broken")
               + [("c.txt", b"caption without image")]
               + [("d.jpg", good)]                                     # image without caption
               + sample_members("e", "   ", img=good)                  # empty caption
               + [("f.jpg", good), ("f.json", b"{not json")]           # undecodable json, no txt
               + [("g.jpg", good), ("g.json", b'{"url": "x"}')]        # json without caption field
               + sample_members("h", "good h", img=good))
    write_tar(tmp_path / "s.tar", members)
    src = open_pairs(str(tmp_path / "s.tar"))
    with caplog.at_level(logging.WARNING, logger="clipforge.data"):
        got = list(src.iter_samples())
    assert _keys(got) == ["a", "h"]
    assert src.stats.counts == {"decode_error": 1, "missing_image": 1, "missing_caption": 2, "empty_caption": 1,
                                "bad_json": 1}
    assert src.stats.total == 6 and len(src.stats.examples) == 6
    assert "skipping sample b" in caplog.text


def test_truncated_shard_keeps_earlier_samples(tmp_path):
    paths = make_shards(tmp_path, 2, 6)
    data = open(paths[0], "rb").read()
    open(paths[0], "wb").write(data[: len(data) // 2 + 100])
    src = open_pairs(str(tmp_path))
    got = _keys(src.iter_samples(shuffle=False))
    assert src.stats.counts.get("corrupt_shard") == 1
    assert 1 <= sum(k.startswith("00000") for k in got) < 6          # samples before the damage kept
    assert [k for k in got if k.startswith("00001")] == [f"00001{i:04d}" for i in range(6)]


def test_streams_member_by_member(tmp_path):
    big = [m for i in range(60) for m in sample_members(f"{i:04d}", f"c{i}", img=bytes(range(256)) * 64)]
    path = write_tar(tmp_path / "big.tar", big)
    fh = open(path, "rb")
    it = read_shard(str(path), {"jpg", "txt"}, fileobj=fh)
    first = next(it)
    assert first.key == "0000" and set(first.files) == {"jpg", "txt", "json"}
    assert first.files["json"] is None  # not wanted: only noted
    fh.close()
    every = next(read_shard(str(path), None))  # wanted=None reads every member
    assert all(isinstance(v, bytes) for v in every.files.values()) and set(every.files) == {"jpg", "txt", "json"}
    fh = open(path, "rb")
    next(read_shard(str(path), {"jpg"}, fileobj=fh))
    assert fh.tell() < path.stat().st_size / 10  # only the first samples were read
    fh.close()


def test_rank_worker_partition_disjoint_and_covering(tmp_path):
    make_shards(tmp_path, 8, 3)
    src = open_pairs(str(tmp_path))
    all_keys = {f"{s:05d}{i:04d}" for s in range(8) for i in range(3)}
    for epoch in (0, 1):
        parts = [_keys(src.iter_samples(rank=r, world_size=2, worker_id=w, num_workers=2, epoch=epoch, seed=3))
                 for r in range(2) for w in range(2)]
        flat = [k for p in parts for k in p]
        assert len(flat) == len(set(flat)) == 24 and set(flat) == all_keys
        assert all(len(p) == 6 for p in parts)
    order0 = src.epoch_order(0, seed=3)
    assert order0 == src.epoch_order(0, seed=3) and order0 != src.epoch_order(1, seed=3)
    assert sorted(order0) == sorted(src.shards)


def test_starved_rank_warns_and_resamples(tmp_path, caplog):
    make_shards(tmp_path, 2, 3)
    src = open_pairs(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="clipforge.data"):
        got = _keys(src.iter_samples(rank=3, world_size=4))
    assert "rank 3 worker 0 gets no shard" in caplog.text
    assert len(got) == 3 and len({k[:5] for k in got}) == 1  # one whole shard drawn


def test_resampled_is_endless_and_deterministic(tmp_path):
    make_shards(tmp_path, 3, 2)
    src = open_pairs(str(tmp_path))
    a = _keys(itertools.islice(src.iter_samples(resampled=True, seed=5), 30))
    b = _keys(itertools.islice(src.iter_samples(resampled=True, seed=5), 30))
    c = _keys(itertools.islice(src.iter_samples(resampled=True, seed=6), 30))
    assert len(a) == 30 and a == b and a != c
    assert len(set(a)) <= 6 and len(set(a)) < 30


def test_all_shards_empty_is_an_error_not_a_hang(tmp_path):
    write_tar(tmp_path / "e.tar", [])
    src = open_pairs(str(tmp_path / "e.tar"))
    with pytest.raises(RuntimeError, match="no sample could be read"):
        list(src.iter_samples())


def test_tar_member_key_with_directories(tmp_path):
    img = image_bytes()
    members = [("sub/x.1.jpg", img), ("sub/x.1.txt", b"dotted"), (".hidden", b""), ("noext", b"")]
    write_tar(tmp_path / "d.tar", members)
    got = list(open_pairs(str(tmp_path / "d.tar")).iter_samples())
    assert [(s.key, s.captions) for s in got] == []  # ext "1.jpg" is not an image ext: skipped
    members = [("sub/x1.jpg", img), ("sub/x1.txt", b"nested")]
    write_tar(tmp_path / "n.tar", members)
    got = list(open_pairs(str(tmp_path / "n.tar")).iter_samples())
    assert [(s.key, s.captions) for s in got] == [("sub/x1", ["nested"])]


@pytest.mark.parametrize("ext,fmt", [("gif", "GIF"), ("bmp", "BMP"), ("tif", "TIFF"), ("tiff", "TIFF"),
                                     ("webp", "WEBP")])
def test_members_of_other_pillow_formats_are_images(tmp_path, ext, fmt):
    """A .gif (.bmp, .tif...) member is the same valid image it is in a folder, not 'missing_image'."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (14, 9), (200, 30, 30)).save(buf, format=fmt)
    tar = write_tar(tmp_path / "s.tar", [*sample_members("a", "a red thing", img=buf.getvalue(), ext=ext),
                                         *sample_members("b", "a jpeg", img=image_bytes(fmt="JPEG"))])
    src = ShardSource(str(tar))
    samples = list(src.iter_samples())
    assert _keys(samples) == ["a", "b"] and src.stats.total == 0
    assert samples[0].image.size == (14, 9)
    assert samples[0].image.convert("RGB").getpixel((3, 3))[0] > 150
