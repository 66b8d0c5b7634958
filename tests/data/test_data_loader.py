"""The training loader: determinism, exact resume (map-style and streams), bad samples, workers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from data.datatestutil import (char_decode, char_tokenize, colour_of, image_bytes, make_shards, sample_members,
                               tiny_transform, write_tar)

from clipforge.config import PreprocessConfig
from PIL import Image

from clipforge.data import PairSource, Sample, ScenesDataset, make_pair_loader, open_pairs
from clipforge.preprocess import image_transform


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def scenes_loader(**kw):
    src = ScenesDataset("train", n=kw.pop("n", 40), image_size=32)
    kw.setdefault("batch_size", 8)
    return make_pair_loader(src, transform=kw.pop("transform", tiny_transform), tokenize=char_tokenize, **kw)


def test_map_style_batches_shapes_and_determinism():
    a, b = scenes_loader(seed=1), scenes_loader(seed=1)
    xa, xb = take(a, 3), take(b, 3)
    assert xa[0][0].shape == (8, 3, 4, 4) and xa[0][1].shape == (8, 128) and xa[0][1].dtype == torch.long
    assert same(xa, xb)
    assert not same(xa, take(scenes_loader(seed=2), 3))
    assert a.steps_per_epoch == 5 and a.epoch == 0


class IndexSource(PairSource):
    """Sample i has caption "s<i>" (and "t<i>" as a second caption)."""

    is_map_style = True

    def __init__(self, n):
        super().__init__()
        self.num_samples = n
        self.spec = f"index:{n}"

    def get(self, i):
        return Sample(key=str(i), image=Image.new("RGB", (4, 4), colour_of(i)), captions=[f"s{i}", f"t{i}"])


def test_map_style_epochs_cover_each_sample_once_and_reshuffle():
    loader = make_pair_loader(IndexSource(40), transform=tiny_transform, tokenize=char_tokenize, batch_size=8)
    epochs = [[t for _, ids in take(loader, 5) for t in char_decode(ids)] for _ in range(3)]
    assert loader.epoch == 3
    for texts in epochs:
        assert sorted(int(t[1:]) for t in texts) == list(range(40))
    assert epochs[0] != epochs[1]
    both = [{t for t in texts if int(t[1:]) < 10} for texts in epochs]
    assert any(a != b for a, b in zip(both, both[1:]))  # caption choice varies across epochs
    assert all(t[0] in "st" for t in epochs[0]) and {t[0] for e in epochs for t in e} == {"s", "t"}


def test_map_style_ranks_partition_each_epoch():
    seen = []
    for r in range(3):
        loader = make_pair_loader(IndexSource(31), transform=tiny_transform, tokenize=char_tokenize, batch_size=5,
                                  rank=r, world_size=3, seed=9)
        assert loader.steps_per_epoch == 2
        seen.append([int(t[1:]) for _, ids in take(loader, 2) for t in char_decode(ids)])
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == 30


@pytest.mark.parametrize("consumed", [0, 3, 5, 7])
def test_map_style_exact_resume(consumed):
    ref = scenes_loader(n=44, batch_size=8, seed=4)  # 5 batches/epoch, 4 samples dropped each epoch
    take(ref, consumed)
    state = json.loads(json.dumps(ref.state_dict()))  # must survive JSON (checkpoints)
    expected = take(ref, 6)
    resumed = scenes_loader(n=44, batch_size=8, seed=4)
    resumed.load_state_dict(state)
    assert resumed.epoch == consumed // 5
    assert same(take(resumed, 6), expected)


def test_map_style_state_is_rank_independent_and_checked():
    r0 = scenes_loader(seed=0, rank=0, world_size=2, batch_size=4)
    r1 = scenes_loader(seed=0, rank=1, world_size=2, batch_size=4)
    b0, b1 = take(r0, 5), take(r1, 5)
    t0 = {t for _, ids in b0 for t in char_decode(ids)}
    t1 = {t for _, ids in b1 for t in char_decode(ids)}
    assert t0 != t1
    fresh = scenes_loader(seed=0, rank=1, world_size=2, batch_size=4)
    fresh.load_state_dict(r0.state_dict())  # DDP: rank 0's checkpoint restores every rank
    assert same(take(fresh, 2), take(r1, 2))
    with pytest.raises(ValueError, match="batch_size: saved 4, loader has 8"):
        scenes_loader(seed=0).load_state_dict(r0.state_dict())
    with pytest.raises(ValueError, match="num_samples"):
        scenes_loader(seed=0, n=41, rank=1, world_size=2, batch_size=4).load_state_dict(r0.state_dict())


def test_caption_choice_and_augmentation_are_seeded():
    pre = image_transform(PreprocessConfig(image_size=16), train=True)
    a = scenes_loader(seed=3, transform=pre)
    b = scenes_loader(seed=3, transform=pre)
    random.seed(123)  # global RNG state must not matter
    xa = take(a, 2)
    random.seed(999)
    xb = take(b, 2)
    assert same(xa, xb)
    caps = [char_decode(ids) for _, ids in take(scenes_loader(seed=3, n=8, batch_size=8), 6)]
    assert len({tuple(sorted(c)) for c in caps}) > 1  # a different caption per epoch for the same scenes


def test_errors():
    src = ScenesDataset("train", n=10)
    with pytest.raises(ValueError, match="larger than the 10 samples per rank"):
        make_pair_loader(src, transform=tiny_transform, tokenize=char_tokenize, batch_size=16)
    with pytest.raises(ValueError, match="rank"):
        make_pair_loader(src, transform=tiny_transform, tokenize=char_tokenize, batch_size=2, rank=2, world_size=2)
    loader = make_pair_loader(src, transform=tiny_transform, tokenize=char_tokenize, batch_size=16, drop_last=False)
    assert next(loader)[0].shape[0] == 10


def test_map_style_bad_samples_are_replaced(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    lines = ["image,caption"]
    for i in range(24):
        if i % 6 == 1:
            lines.append(f"imgs/missing{i}.png,c{i}")
        elif i % 6 == 2:
            (d / f"{i}.png").write_bytes(b"garbage")
            lines.append(f"imgs/{i}.png,c{i}")
        else:
            (d / f"{i}.png").write_bytes(image_bytes(colour_of(i)))
            lines.append(f"imgs/{i}.png,c{i}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    src = open_pairs(str(tmp_path / "m.csv"))
    loader = make_pair_loader(src, transform=tiny_transform, tokenize=char_tokenize, batch_size=6, seed=0)
    batches = take(loader, 8)  # two epochs
    for _, ids in batches:
        caps = char_decode(ids)
        assert len(caps) == 6 and len(set(caps)) == 6  # full batches, no duplicate in a batch
        assert all(int(c[1:]) % 6 not in (1, 2) for c in caps)
    assert loader.stats.counts["missing_file"] >= 8 and loader.stats.counts["decode_error"] >= 8
    state = loader.state_dict()
    resumed = make_pair_loader(src, transform=tiny_transform, tokenize=char_tokenize, batch_size=6, seed=0)
    resumed.load_state_dict(state)
    assert resumed.stats.to_dict() == loader.stats.to_dict()
    assert same(take(resumed, 3), take(loader, 3))


def _stream_setup(tmp_path):
    """5 shards x 7 samples, with a corrupt image and an unpaired member."""
    make_shards(tmp_path, 5, 7)
    bad = (sample_members("0000500", "corrupt", img=b"nope") + [("0000501.txt", b"orphan caption")]
           + sample_members("0000502", "fine", img=image_bytes()))
    write_tar(tmp_path / "00005.tar", bad)
    return str(tmp_path / "{00000..00005}.tar")


def stream_loader(spec, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 5)
    return make_pair_loader(open_pairs(spec), transform=tiny_transform, tokenize=char_tokenize, **kw)


@pytest.mark.parametrize("consumed", [0, 2, 9, 13])
def test_stream_exact_resume(tmp_path, consumed):
    spec = _stream_setup(tmp_path)
    ref = stream_loader(spec, seed=7)
    take(ref, consumed)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = take(ref, 8)
    resumed = stream_loader(spec, seed=7)
    resumed.load_state_dict(state)
    assert same(take(resumed, 8), expected)
    assert resumed.stats.counts == ref.stats.counts and resumed.stats.total == ref.stats.total


def test_stream_epochs_and_stats(tmp_path):
    spec = _stream_setup(tmp_path)
    loader = stream_loader(spec, seed=0, shuffle_buffer=0)
    assert loader.steps_per_epoch is None
    texts = [t for _, ids in take(loader, 9) for t in char_decode(ids)]  # 36 good samples per epoch: 9 batches
    assert len(set(texts)) == 36 and loader.epoch == 0
    assert loader.stats.counts == {"decode_error": 1, "missing_image": 1}
    take(loader, 1)
    assert loader.epoch == 1 and loader.stats.total == 2
    nxt = [t for _, ids in take(loader, 8) for t in char_decode(ids)]
    assert set(nxt) <= set(texts) and loader.stats.total == 4  # second epoch counts the bad ones again


def test_stream_ranks_read_disjoint_data(tmp_path):
    make_shards(tmp_path, 4, 4)
    got = []
    for r in range(2):
        loader = stream_loader(str(tmp_path), seed=1, rank=r, world_size=2, batch_size=2, shuffle_buffer=0)
        got.append({t for _, ids in take(loader, 4) for t in char_decode(ids)})
    assert len(got[0]) == len(got[1]) == 8 and not got[0] & got[1]


def test_stream_state_mismatch(tmp_path):
    spec = _stream_setup(tmp_path)
    state = stream_loader(spec, seed=0).state_dict()
    with pytest.raises(ValueError, match="rank: saved 0, loader has 1"):
        stream_loader(spec, seed=0, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="for a 'stream' source"):
        scenes_loader().load_state_dict(state)


def test_workers_match_in_process_and_resume(tmp_path):
    """The worker-process path, once: map-style batches are identical to in-process ones, and a
    stream with 2 workers resumes exactly (skip counts travel back from the workers)."""
    inproc = take(scenes_loader(seed=5, n=48), 7)
    workers = scenes_loader(seed=5, n=48, num_workers=2)
    assert same(take(workers, 7), inproc)
    workers.close()

    spec = _stream_setup(tmp_path)
    ref = stream_loader(spec, seed=2, num_workers=2)
    take(ref, 5)
    state = ref.state_dict()
    expected = take(ref, 12)
    ref.close()
    assert ref.stats.total >= 2  # the bad members were read by some worker and counted here
    resumed = stream_loader(spec, seed=2, num_workers=2)
    resumed.load_state_dict(state)
    got = take(resumed, 12)
    resumed.close()
    assert same(got, expected)
