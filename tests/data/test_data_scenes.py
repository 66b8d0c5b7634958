"""builtin:scenes: determinism, the compositional hold-out, captions, tasks and retrieval set."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from clipforge.data import (ALL_COMBOS, HELDOUT_COMBOS, TRAIN_COMBOS, ClassificationTask, ScenesDataset, open_pairs,
                            scene_retrieval_set, scene_tasks)
from clipforge.data.scenes import COLOURS, SHAPES, SIZES, plural, scene_captions

HELDOUT_RE = re.compile(r"\b(" + "|".join(f"{c} {s}|{c} {plural(s)}" for c, s in HELDOUT_COMBOS) + r")\b")


def test_open_pairs_builtin_scenes():
    src = open_pairs("builtin:scenes?n=30&size=48", split="val", seed=2)
    assert isinstance(src, ScenesDataset) and src.is_map_style and len(src) == 30 and src.num_samples == 30
    assert (src.split, src.seed, src.image_size) == ("val", 2, 48)
    s = src.get(3)
    assert s.image.size == (48, 48) and s.image.mode == "RGB" and s.key == "scenes/val/2/3"
    assert all(isinstance(c, str) and c.strip() for c in s.captions) and len(s.captions) >= 4
    assert len(open_pairs("builtin:scenes")) == 20000
    with pytest.raises(ValueError, match="unknown option"):
        open_pairs("builtin:scenes?count=3")
    with pytest.raises(ValueError, match="split must be one of"):
        open_pairs("builtin:scenes", split="dev")
    with pytest.raises(ValueError, match="unknown builtin"):
        open_pairs("builtin:cifar")
    with pytest.raises(IndexError):
        src.get(30)


def test_deterministic_by_seed_split_index():
    a, b = ScenesDataset("train", 50, seed=1), ScenesDataset("train", 50, seed=1)
    for i in (0, 7, 49):
        sa, sb = a.get(i), b.get(i)
        assert sa.captions == sb.captions and np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
    c = ScenesDataset("train", 50, seed=2)
    v = ScenesDataset("val", 50, seed=1)
    assert [a.scene(i) for i in range(10)] != [c.scene(i) for i in range(10)]
    assert [a.scene(i) for i in range(10)] != [v.scene(i) for i in range(10)]
    assert not np.array_equal(np.asarray(a.get(0).image), np.asarray(a.get(1).image))


def test_heldout_combos_never_in_train():
    assert len(HELDOUT_COMBOS) == 8 and len(ALL_COMBOS) == 42
    assert 0.15 <= len(HELDOUT_COMBOS) / len(ALL_COMBOS) <= 0.25
    # each colour and each shape is still seen in training with other partners
    assert {c for c, _ in TRAIN_COMBOS} == set(COLOURS) and {s for _, s in TRAIN_COMBOS} == set(SHAPES)
    ds = ScenesDataset("train", 20000, seed=0)  # the whole default train set
    seen_combos, kinds = Counter(), Counter()
    for i in range(20000):
        spec = ds.scene(i)
        assert not spec.combos() & set(HELDOUT_COMBOS), (i, spec)
        for cap in scene_captions(spec):
            assert not HELDOUT_RE.search(cap), (i, cap)
        seen_combos.update(spec.combos())
        kinds[spec.kind] += 1
    assert set(seen_combos) == set(TRAIN_COMBOS)
    assert set(kinds) == {"single", "relation", "count", "trio"}
    test = ScenesDataset("test", 1500, seed=0)
    assert set(HELDOUT_COMBOS) <= {c for i in range(1500) for c in test.scene(i).combos()}


def test_scene_geometry_matches_captions():
    ds = ScenesDataset("train", 600, seed=3)
    for i in range(600):
        spec = ds.scene(i)
        objs = spec.objects
        for o in objs:
            r = SIZES[o.size] / 2
            assert r - 0.02 <= o.x <= 1 - r + 0.02 and r - 0.02 <= o.y <= 1 - r + 0.02
        for a_i in range(len(objs)):
            for b_i in range(a_i + 1, len(objs)):
                a, b = objs[a_i], objs[b_i]
                gap = max(abs(a.x - b.x), abs(a.y - b.y))
                assert gap >= (SIZES[a.size] + SIZES[b.size]) / 2 - 0.02, (i, spec)  # no overlap
        caps = " | ".join(scene_captions(spec))
        if spec.kind == "relation":
            a, b = objs
            if spec.relation == "left":
                assert b.x - a.x > 0.3 and abs(a.y - b.y) < 0.1 and f"a {a.name} to the left of a {b.name}" in caps
                assert f"the {a.name} is on the left" in caps and f"the {b.name} is on the right" in caps
            else:
                assert b.y - a.y > 0.3 and abs(a.x - b.x) < 0.1 and f"a {a.name} above a {b.name}" in caps
                assert f"the {a.name} is at the top" in caps and f"the {b.name} is at the bottom" in caps
        elif spec.kind == "count":
            assert len({(o.colour, o.shape, o.size) for o in objs}) == 1 and len(objs) in (2, 3)
            assert ("two " if len(objs) == 2 else "three ") + f"{objs[0].colour} {plural(objs[0].shape)}" in caps
        elif spec.kind == "single":
            assert f"a {objs[0].size} {objs[0].name}" in caps and f"on a {spec.background} background" in caps


def test_objects_are_drawn_in_their_colour():
    ds = ScenesDataset("val", 40, seed=0, image_size=64)
    for i in range(40):
        spec = ds.scene(i)
        img = np.asarray(ds.get(i).image).astype(int)
        for o in spec.objects:
            cx, cy = int(o.x * 64), int(o.y * 64)
            if o.shape in ("circle", "square", "cross", "diamond", "star"):  # centre pixel is inside
                dist = np.abs(img[cy, cx] - np.array(COLOURS[o.colour])).max()
                assert dist <= 40, (i, o, img[cy, cx])


def test_scene_tasks():
    tasks = scene_tasks(seed=0, n_per_class=6, image_size=32)
    assert set(tasks) == {"heldout_colour_shape", "counting", "position", "relation", "seen_colour_shape"}
    for name, t in tasks.items():
        assert isinstance(t, ClassificationTask) and t.name == name
        k = len(t.classnames)
        assert len(t.images) == len(t.labels) == 6 * k and t.chance == pytest.approx(1 / k)
        assert np.array_equal(np.bincount(t.labels, minlength=k), np.full(k, 6))
        assert all(im.size == (32, 32) for im in t.images) and all("{}" in tp for tp in t.templates)
    held = tasks["heldout_colour_shape"]
    assert held.classnames == [f"{c} {s}" for c, s in HELDOUT_COMBOS]
    for spec, lab in zip(held.specs, held.labels):
        assert len(spec.objects) == 1 and spec.objects[0].name == held.classnames[lab]
    assert not set(tasks["seen_colour_shape"].classnames) & set(held.classnames)
    cnt = tasks["counting"]
    assert [len(s.objects) for s in cnt.specs] == [lab + 1 for lab in cnt.labels]
    # prompts are phrased exactly like training captions
    train_caps = {c for i in range(3000) for c in scene_captions(ScenesDataset("train", 3000).scene(i))}
    assert {cnt.templates[0].format(c) for c in cnt.classnames} <= train_caps
    pos = tasks["position"]
    assert pos.specs == tasks["relation"].specs and np.array_equal(pos.labels, tasks["relation"].labels)
    for spec, lab in zip(pos.specs, pos.labels):
        red, blue = spec.objects if spec.objects[0].colour == "red" else spec.objects[::-1]
        dx, dy = blue.x - red.x, blue.y - red.y
        expect = {0: dx > 0.3, 1: dx < -0.3, 2: dy > 0.3, 3: dy < -0.3}[int(lab)]
        assert expect, (lab, spec)
    assert [pos.templates[0].format(c) for c in pos.classnames][::3] == ["the red circle is on the left",
                                                                         "the red circle is at the bottom"]
    rel = tasks["relation"]
    assert rel.templates[0].format(rel.classnames[1]) == "a red circle to the right of a blue square"
    # every prompt of these tasks is also a training caption
    for t in (cnt, pos, rel):
        prompts = {tp.format(c) for tp in t.templates for c in t.classnames}
        assert prompts <= train_caps, prompts - train_caps
    again = scene_tasks(seed=0, n_per_class=6, image_size=32, names=["counting"])
    assert list(again) == ["counting"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again["counting"].images, cnt.images))
    with pytest.raises(ValueError, match="unknown scene task"):
        scene_tasks(names=["colour"])


def test_scene_retrieval_set():
    images, captions = scene_retrieval_set(n=120, seed=0, image_size=32)
    assert len(images) == len(captions) == 120 and images[0].size == (32, 32)
    flat = [c for caps in captions for c in caps]
    assert len(flat) == len(set(flat))  # each caption has exactly one matching image
    assert all(caps for caps in captions)
    again = scene_retrieval_set(n=120, seed=0, image_size=32)
    assert again[1] == captions


def test_relation_scenes_include_hard_negatives():
    """The position task's pair appears in training in all four arrangements (so the relation,
    not just the objects, separates such scenes within a batch)."""
    from clipforge.data.scenes import POSITION_PAIR

    ds = ScenesDataset("train", 3000, seed=0)
    arrangements = Counter()
    for i in range(3000):
        spec = ds.scene(i)
        if spec.kind == "relation" and {(o.colour, o.shape) for o in spec.objects} == set(POSITION_PAIR):
            arrangements[(spec.objects[0].name, spec.relation)] += 1
    assert len(arrangements) == 4 and min(arrangements.values()) >= 5
