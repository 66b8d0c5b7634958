"""Labelled datasets: image folders, npz, manifests, cls shards, builtin scene tasks, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data.datatestutil import image_bytes, write_tar

from clipforge.data import LabelledDataset, open_labelled
from clipforge.preprocess import ImageLoadError


def test_image_folder(tmp_path):
    root = tmp_path / "pets"
    for k, cls in enumerate(["golden_retriever", "cat", "zebra"]):
        d = root / "test" / cls
        d.mkdir(parents=True)
        for i in range(k + 1):
            (d / f"{i}.png").write_bytes(image_bytes((50 * k, 0, 0)))
        (d / "notes.txt").write_text("not an image")
    (root / "test" / "zebra" / "broken.jpg").write_bytes(b"xx")
    ds = open_labelled(str(root), split="test")
    assert isinstance(ds, LabelledDataset) and ds.name == "test"
    assert ds.classnames == ["cat", "golden retriever", "zebra"]
    assert len(ds) == 7 and ds.labels.tolist() == [0, 0, 1, 2, 2, 2, 2]
    assert ds[0].size == (12, 10) and ds[0].getpixel((0, 0)) == (50, 0, 0)
    assert ds.keys[6] == "zebra/broken.jpg"
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        ds[6]
    with pytest.raises(IndexError):
        ds[7]
    with pytest.raises(FileNotFoundError, match="no 'train' subfolder"):
        open_labelled(str(root), split="train")
    names = tmp_path / "names.txt"
    names.write_text("a cat\na dog\na zebra\n")
    assert open_labelled(str(root / "test"), classnames=str(names)).classnames == ["a cat", "a dog", "a zebra"]


def test_npz_and_classnames_length_error(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "digits.npz"
    np.savez(p, images=rng.integers(0, 255, (6, 5, 7), dtype=np.uint8), labels=np.array([0, 1, 2, 2, 1, 0]))
    ds = open_labelled(str(p))
    assert len(ds) == 6 and ds.classnames == ["0", "1", "2"] and ds[1].mode == "L" and ds[1].size == (7, 5)
    assert np.array_equal(np.asarray(ds[1]), np.load(p)["images"][1])
    bad = tmp_path / "names.txt"
    bad.write_text("zero\none\n")
    with pytest.raises(ValueError, match=r"names\.txt has 2 names but .*digits\.npz has 3 classes"):
        open_labelled(str(p), classnames=str(bad))
    with pytest.raises(ValueError, match="classnames list has 4 names"):
        open_labelled(str(p), classnames=["a", "b", "c", "d"])
    assert open_labelled(str(p), classnames=["a", "b", "c"]).classnames == ["a", "b", "c"]
    q = tmp_path / "rgb.npz"
    np.savez(q, images=np.zeros((3, 4, 4, 3), np.uint8), labels=np.array([0, 3, 1]),
             class_names=np.array(["w", "x", "y", "z"]))
    ds = open_labelled(str(q))
    assert ds.classnames == ["w", "x", "y", "z"] and ds[0].mode == "RGB"
    r = tmp_path / "float.npz"
    np.savez(r, images=np.zeros((2, 4, 4, 3), np.float32), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"float\.npz.*uint8.*float32"):
        open_labelled(str(r))
    s = tmp_path / "nolabels.npz"
    np.savez(s, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"missing array\(s\) \['labels'\]"):
        open_labelled(str(s))


def test_manifest_int_and_name_labels(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(image_bytes((i, i, i)))
    m = tmp_path / "labels.csv"
    m.write_text("filepath,label,classname\n0.png,1,dog\n1.png,0,cat\n2.png,1,dog\n")
    ds = open_labelled(str(m))
    assert ds.labels.tolist() == [1, 0, 1] and ds.classnames == ["cat", "dog"] and ds[2].getpixel((0, 0)) == (2, 2, 2)
    j = tmp_path / "labels.jsonl"
    j.write_text("\n".join(json.dumps({"image": f"{i}.png", "class": c}) for i, c in enumerate(["b", "a", "c", "a"])))
    ds = open_labelled(str(j))
    assert ds.classnames == ["a", "b", "c"] and ds.labels.tolist() == [1, 0, 2, 0]
    ds = open_labelled(str(j), classnames=["c", "b", "a", "d"])
    assert ds.labels.tolist() == [1, 2, 0, 2]
    with pytest.raises(ValueError, match=r"labels\.jsonl: line 3: label 'c' is not one of"):
        open_labelled(str(j), classnames=["a", "b"])
    n = tmp_path / "nolabel.csv"
    n.write_text("image,caption\n0.png,x\n")
    with pytest.raises(ValueError, match=r"nolabel\.csv: no label column.*\['image', 'caption'\]"):
        open_labelled(str(n))


def test_cls_shards(tmp_path):
    members = []
    for i in range(5):
        members += [(f"s{i}.jpg", image_bytes((i * 40, 0, 0), fmt="JPEG")), (f"s{i}.cls", f"{i % 3}\n".encode())]
    members += [("nolabel.jpg", image_bytes())]
    write_tar(tmp_path / "wds" / "test" / "0.tar", members[:6])
    write_tar(tmp_path / "wds" / "test" / "1.tar", members[6:])
    (tmp_path / "wds" / "classnames.txt").write_text("apple\nbanana\ncherry\n")
    ds = open_labelled(str(tmp_path / "wds" / "test" / "{0..1}.tar"))
    assert len(ds) == 5 and ds.labels.tolist() == [0, 1, 2, 0, 1]
    assert ds.classnames == ["apple", "banana", "cherry"]  # CLIP_benchmark layout: classnames.txt next to split
    assert abs(ds[3].getpixel((5, 5))[0] - 120) < 8 and ds.keys[3] == "1.tar:s3.jpg"


def test_builtin_scene_task():
    ds = open_labelled("builtin:scenes-counting?n_per_class=4&size=32")
    assert ds.name == "scenes-counting" and len(ds) == 12 and ds.num_classes == 3
    assert ds.templates == ["a picture of {}."] and ds[0].size == (32, 32)
    with pytest.raises(ValueError, match="unknown scene task"):
        open_labelled("builtin:scenes-colour")


def test_real_npz_data(shared_data):
    cifar = open_labelled(str(shared_data / "cifar10_test" / "cifar10_test.npz"))
    assert len(cifar) == 10000 and cifar.classnames[0] == "airplane" and cifar[0].size == (32, 32)
    assert np.array_equal(np.bincount(cifar.labels), np.full(10, 1000))
    mnist = open_labelled(str(shared_data / "mnist_test" / "mnist_test.npz"))
    assert mnist.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9] and mnist[0].mode == "L"
