"""Image-caption selection: scores on hand-built similarities, the readers (JSONL, CLIP_benchmark's
SugarCREPE layout), records with CLIP_benchmark's keys, and the built-in minimal pairs."""

from __future__ import annotations

import json

import pytest
import torch

from clipforge.cli.main import main as cli_main
from clipforge.data.scene_pairs import SELECTION_TYPES, selection_groups
from clipforge.data.scenes import ScenesDataset, scene_captions, swap_positions
from clipforge.eval.records import CLIP_BENCHMARK_KEYS
from clipforge.eval.selection import (open_selection, read_selection_jsonl, run_image_caption_selection,
                                      selection_correct, selection_metrics)
from clipforge.eval.tasks import EvalContext


def test_hand_built_four_items_known_scores():
    sims = [
        torch.tensor([[0.9, 0.1], [0.2, 0.8]]),    # both images right, both captions right: group right
        torch.tensor([[0.9, 0.1], [0.8, 0.7]]),    # image 1 prefers caption 0: text wrong; each caption finds its image
        torch.tensor([[0.9, 0.8], [0.95, 0.96]]),  # each image finds its caption; caption 0 prefers image 1: image wrong
        torch.tensor([[0.2, 0.5, 0.1]]),           # one image, two negatives (SugarCREPE-like): a negative wins
    ]
    assert [selection_correct(s) for s in sims] == [(True, True), (False, True), (True, False), (False, True)]
    # Winoground's definitions on the 2x2 items agree with the argmax rule
    for s in sims[:3]:
        text = bool(s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0])
        image = bool(s[0, 0] > s[1, 0] and s[1, 1] > s[0, 1])
        assert selection_correct(s) == (text, image)
    overall, per_type = selection_metrics(sims, ["a", "a", "b", "b"])
    assert overall == {"image_acc": 0.75, "text_acc": 0.5, "acc": 0.25}
    assert per_type == {"a": {"image_acc": 1.0, "text_acc": 0.5, "acc": 0.5, "n": 2},
                        "b": {"image_acc": 0.5, "text_acc": 0.5, "acc": 0.0, "n": 2}}


def test_bad_similarity_shapes_refused():
    with pytest.raises(ValueError, match="images, captions"):
        selection_correct(torch.zeros(3))
    with pytest.raises(ValueError, match="no instances"):
        selection_metrics([])


def _write_images(kit, folder, classes):
    folder.mkdir(parents=True, exist_ok=True)
    for c in classes:
        kit.class_image(c).save(folder / f"{kit.CLASSES[c]}.png")


def test_jsonl_groups_types_and_oracle_scores(tmp_path, oracle_kit):
    kit = oracle_kit
    _write_images(kit, tmp_path / "img", range(4))
    z, v, p, c = kit.CLASSES[:4]
    lines = [
        # a Winoground-style group: two images, each other's caption is the negative
        {"image": f"img/{z}.png", "caption": f"a photo of a {z}", "negatives": [f"a photo of a {v}"], "group": 1,
         "type": "swap"},
        {"image": f"img/{v}.png", "caption": f"a photo of a {v}", "negatives": [f"a photo of a {z}"], "group": 1,
         "type": "swap"},
        # one image, its caption wrong for the oracle (so text fails; one image: image score 1)
        {"image": f"img/{p}.png", "caption": f"a photo of a {c}", "negatives": [f"a photo of a {p}"], "type": "count"},
        {"image": f"img/{c}.png", "caption": f"a {c}", "negatives": [f"a {p}", f"a {z}"], "type": "count"},
    ]
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    sset = read_selection_jsonl(f)
    assert [len(i.images) for i in sset.instances] == [2, 1, 1]
    assert sset.instances[0].captions == [f"a photo of a {z}", f"a photo of a {v}"]  # negatives deduplicated
    assert sset.instances[2].captions == [f"a {c}", f"a {p}", f"a {z}"]
    ctx = EvalContext(kit.OracleCLIP(), model_name="oracle", log=None)
    (rec,) = run_image_caption_selection(ctx, f)
    assert rec["metrics"] == pytest.approx({"image_acc": 1.0, "text_acc": 2 / 3, "acc": 2 / 3})
    assert rec["per_type"]["swap"] == {"image_acc": 1.0, "text_acc": 1.0, "acc": 1.0, "n": 1}
    assert rec["per_type"]["count"]["text_acc"] == 0.5
    assert rec["n"] == 3 and rec["skipped"] == 0


def test_jsonl_errors_name_line_and_key(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"image": "a.png", "negatives": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'caption'"):
        read_selection_jsonl(f)
    f.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="nothing to choose from"):
        read_selection_jsonl(f)
    f.write_text(json.dumps({"image": "a.png", "caption": "x", "negatives": "y", "group": 0, "type": "s"}) + "\n"
                 + json.dumps({"image": "b.png", "caption": "y", "negatives": [], "group": 0, "type": "t"}) + "\n")
    with pytest.raises(ValueError, match="mixes types"):
        read_selection_jsonl(f)
    with pytest.raises(FileNotFoundError):
        open_selection(tmp_path / "missing.jsonl")


def test_unreadable_image_skips_its_instance(tmp_path, oracle_kit):
    _write_images(oracle_kit, tmp_path, [0])
    z, v = oracle_kit.CLASSES[:2]
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"image": f"{z}.png", "caption": f"a {z}", "negatives": [f"a {v}"]}) + "\n"
                 + json.dumps({"image": "gone.png", "caption": f"a {v}", "negatives": [f"a {z}"]}) + "\n")
    (rec,) = run_image_caption_selection(EvalContext(oracle_kit.OracleCLIP(), log=None), f)
    assert rec["n"] == 1 and rec["skipped"] == 1 and "gone.png" in rec["skipped_examples"][0]
    assert rec["metrics"]["text_acc"] == 1.0


def test_clip_benchmark_sugar_crepe_layout_and_record_keys(tmp_path, oracle_kit):
    """CLIP_benchmark reads ``ROOT/<task>.json`` with images in ``ROOT/val2017``; we read the same
    layout and write its record keys (``dataset`` = its dataset name) with its metric names."""
    kit = oracle_kit
    _write_images(kit, tmp_path / "val2017", range(3))
    z, v, p = kit.CLASSES[:3]
    ann = {"0": {"filename": f"{z}.png", "caption": f"a {z} on grass", "negative_caption": f"a {v} on grass"},
           "7": {"filename": f"{v}.png", "caption": f"a {p} on grass", "negative_caption": f"a {v} on grass"},
           "12": {"filename": f"{p}.png", "caption": f"a {p}", "negative_caption": f"a {z}"}}
    (tmp_path / "swap_att.json").write_text(json.dumps(ann))
    (tmp_path / "replace_rel.json").write_text(json.dumps({"1": ann["0"]}))
    records = run_image_caption_selection(EvalContext(kit.OracleCLIP(), model_name="oracle", log=None), tmp_path)
    assert [r["dataset"] for r in records] == ["sugar_crepe/replace_rel", "sugar_crepe/swap_att"]
    for r in records:
        assert set(CLIP_BENCHMARK_KEYS) <= set(r)
        assert r["task"] == "image_caption_selection"
        assert set(r["metrics"]) == {"image_acc", "text_acc", "acc"}
    swap = records[1]
    assert swap["metrics"] == pytest.approx({"image_acc": 1.0, "text_acc": 2 / 3, "acc": 2 / 3})
    assert swap["n"] == 3
    (tmp_path / "swap_obj.json").write_text(json.dumps({"0": {"filename": "a.png", "caption": "x"}}))
    with pytest.raises(ValueError, match="negative_caption"):
        open_selection(tmp_path / "swap_obj.json")


def test_builtin_pairs_are_truthful_minimal_and_seeded():
    groups = selection_groups(n_per_type=20, seed=3)
    assert [g.type for g in groups] == [t for t in SELECTION_TYPES for _ in range(20)]
    for g in groups:
        for i in (0, 1):  # caption i is true of scene i (the generator's own captions) and false of the other
            assert g.captions[i] in scene_captions(g.specs[i])
            assert g.captions[i] not in scene_captions(g.specs[1 - i])
        if g.type in ("swap_att", "swap_obj"):  # the same words, bound differently
            assert sorted(g.captions[0].split()) == sorted(g.captions[1].split())
    assert [g.captions for g in selection_groups(20, seed=3)] == [g.captions for g in groups]
    assert [g.specs for g in selection_groups(20, seed=4)] != [g.specs for g in groups]


def test_builtin_pairs_are_not_training_scenes():
    train = ScenesDataset("train", n=3000, seed=0)
    seen = {tuple((o.colour, o.shape, o.x, o.y) for o in train.scene(i).objects) for i in range(3000)}
    for g in selection_groups(n_per_type=40, seed=0):
        for s in g.specs:
            assert tuple((o.colour, o.shape, o.x, o.y) for o in s.objects) not in seen


def test_swap_positions_flips_relation_captions():
    groups = [g for g in selection_groups(30, seed=1) if g.type == "replace_pos"]
    for g in groups:
        a = g.specs[0]
        b = swap_positions(a)
        assert b == g.specs[1] and swap_positions(b) == a
        assert not set(scene_captions(a, generic=False)) & set(scene_captions(b, generic=False))
    single = next(ScenesDataset("test", n=50).scene(i) for i in range(50) if ScenesDataset("test", n=50).scene(i).kind == "single")
    assert swap_positions(single) is None


def test_cli_builtin_writes_record(tmp_path, capsys):
    rc = cli_main(["eval", "image_caption_selection", "--model", "tiny-vit", "--random-init", "--dataset",
                   "builtin:scenes-selection?n_per_type=2&size=32", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    (path,) = tmp_path.glob("image_caption_selection__scenes-selection__*.json")
    rec = json.loads(path.read_text())
    assert rec["n"] == 10 and set(rec["per_type"]) == set(SELECTION_TYPES)
    assert "per negative type" in capsys.readouterr().out
    assert cli_main(["eval", "image_caption_selection", "--model", "tiny-vit", "--random-init", "--dataset",
                     "builtin:scenes-selection?bogus=1", "--out", str(tmp_path), "--no-progress"]) == 1
