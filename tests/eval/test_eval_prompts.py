"""Built-in template/class-name sets, custom files, and agreement with CLIP's published lists."""

from __future__ import annotations

import json

import pytest

from clipforge.eval import available_prompt_sets, load_classnames, load_templates
from clipforge.eval.prompts import builtin_set_info, match_by_name, match_prompt_set


def test_builtin_sets():
    sets = available_prompt_sets()
    assert sets["imagenet"] == {"classes": 1000, "templates": 80}
    assert sets["imagenet_top7"]["templates"] == 7
    for name, c in [("cifar10", 10), ("cifar100", 100), ("mnist", 10), ("stl10", 10), ("eurosat", 10),
                    ("food101", 101), ("pets", 37), ("flowers102", 102)]:
        assert sets[name]["classes"] == c, name
    assert load_templates("simple") == ["a photo of a {}."] == load_templates("photo")
    assert load_templates("none") == ["{}"]
    assert load_templates("satellite") == load_templates("eurosat")
    assert all(t.count("{}") == 1 for n in sets for t in load_templates(n) if sets[n]["templates"])
    assert load_classnames("imagenet")[0] == "tench" and load_classnames("cifar10")[0] == "airplane"
    assert load_classnames("fer2013")[3] == ["happy", "smiling"]


def test_match_prompt_set():
    assert match_prompt_set("cifar10_test") == "cifar10"
    assert match_prompt_set("cifar100_test") == "cifar100"
    assert match_prompt_set("/data/mnist_test.npz") == "mnist"
    assert match_prompt_set("imagenet_samples") == "imagenet"
    assert match_prompt_set("flickr8k") is None and match_prompt_set(None) is None


def test_custom_files(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my templates\na {} photo.\n\nitap of a {}.\n", encoding="utf-8")
    assert load_templates(str(f)) == ["a {} photo.", "itap of a {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a {} photo.\nno placeholder here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt: template 2 .*exactly once"):
        load_templates(str(bad))
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog | puppy\n", encoding="utf-8")
    assert load_classnames(str(names)) == ["cat", ["dog", "puppy"]]
    js = tmp_path / "names.json"
    js.write_text(json.dumps({"classes": ["a", ["b", "c"]]}), encoding="utf-8")
    assert load_classnames(str(js)) == ["a", ["b", "c"]]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_templates(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown template set"):
        load_templates("no-such-set")
    with pytest.raises(ValueError, match="unknown class-name set"):
        load_classnames("no-such-set")


def test_shipped_lists_match_clip_published_lists(shared_data):
    """Our packaged class names/templates equal CLIP's (checked against ../shared/data/clip_prompts)."""
    d = shared_data / "clip_prompts"
    assert load_classnames("imagenet") == (d / "imagenet_classnames.txt").read_text(encoding="utf-8").splitlines()
    assert load_templates("imagenet") == (d / "imagenet_templates.txt").read_text(encoding="utf-8").splitlines()
    assert load_templates("imagenet_top7") == (d / "imagenet_templates_top7.txt").read_text(encoding="utf-8").splitlines()
    ref = json.loads((d / "clip_prompts.json").read_text(encoding="utf-8"))
    from importlib import resources

    root = resources.files("clipforge") / "assets" / "zeroshot"
    checked = 0
    for p in root.iterdir():
        if not p.name.endswith(".json"):
            continue
        meta = json.loads(p.read_text(encoding="utf-8"))
        section = meta.get("prompts_md_section")
        if section is None:
            continue
        name = p.name[:-5]
        assert load_classnames(name) == ref[section]["classes"], name
        assert load_templates(name) == ref[section]["templates"], name
        checked += 1
    assert checked >= 8


def test_clip_benchmark_template_spelling(tmp_path):
    f = tmp_path / "zeroshot_classification_templates.txt"
    f.write_text("a photo of a {c}.\na blurry photo of the {c}.\n", encoding="utf-8")
    assert load_templates(str(f)) == ["a photo of a {}.", "a blurry photo of the {}."]
    assert load_templates(["itap of a {c}."]) == ["itap of a {}."]
    with pytest.raises(ValueError, match="exactly once"):
        load_templates(["{c} and {c}"])


def test_every_shipped_class_list_states_its_label_order():
    from importlib import resources

    root = resources.files("clipforge") / "assets" / "zeroshot"
    for p in root.iterdir():
        meta = json.loads(p.read_text(encoding="utf-8")) if p.name.endswith(".json") else {}
        if "classes" in meta:
            assert meta.get("label_order"), p.name
            if "label_names" in meta:
                assert len(meta["label_names"]) == len(meta["classes"]), p.name
    for name in ("pets", "eurosat"):
        assert builtin_set_info(name)["order_differs_from_clip_benchmark"] is True


# EuroSAT's folders (torchvision's ImageFolder order) and Oxford-IIIT Pet's file-name prefixes.
EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]


def test_match_by_name_reorders_a_differently_ordered_list():
    eurosat = load_classnames("eurosat")
    perm = match_by_name(EUROSAT_FOLDERS, eurosat, builtin_set_info("eurosat")["label_names"])
    got = [eurosat[c] for c in perm]
    assert got[:3] == ["annual crop land", "forest", "brushland or shrubland"]
    assert got[-1] == "lake or sea" and sorted(perm) == list(range(10))
    pets = load_classnames("pets")
    folders = sorted([p.replace(" ", "_") for p in pets], key=str.lower)   # torchvision's (case-insensitive) order
    perm = match_by_name(folders, pets)
    assert [pets[c].lower().replace(" ", "_") for c in perm] == [f.lower() for f in folders]
    assert perm != list(range(37))                # the orders really differ


def test_match_by_name_keeps_positions_when_names_cannot_tell():
    names = ["cat", "dog", "bird"]
    assert match_by_name(["0", "1", "2"], names) is None               # unnamed labels
    assert match_by_name(["n01", "n02", "n03"], names) is None         # another vocabulary (e.g. WordNet ids)
    assert match_by_name(["cat", "hound", "bird"], names) is None      # partial, at the same positions
    assert match_by_name(["Bird", "cat", "DOG"], names) == [2, 0, 1]
    with pytest.raises(ValueError, match=r"dataset class 0 \('dog'\) matches class 1"):
        match_by_name(["dog", "kitten", "bird"], names)
