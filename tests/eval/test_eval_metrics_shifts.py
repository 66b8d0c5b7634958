"""Classification metrics by hand, and the deterministic image shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.eval import classification_metrics, confusion_matrix, mean_per_class_recall, topk_accuracy
from clipforge.eval.metrics import chunked_topk, metrics_from_topk
from clipforge.eval.shifts import SHIFTS, Shift, parse_shifts


def test_topk_and_per_class_recall_by_hand():
    scores = torch.tensor([[0.9, 0.05, 0.05],   # true 0: pred 0
                           [0.2, 0.5, 0.3],     # true 2: pred 1, top-2 hit
                           [0.1, 0.2, 0.7],     # true 2: pred 2
                           [0.6, 0.3, 0.1],     # true 1: pred 0, top-2 hit
                           [0.3, 0.1, 0.6]])    # true 1: pred 2, top-2 miss
    y = [0, 2, 2, 1, 1]
    acc = topk_accuracy(scores, y, (1, 2, 5))
    assert acc[1] == pytest.approx(2 / 5) and acc[2] == pytest.approx(4 / 5) and acc[5] == 1.0
    pred = scores.argmax(1).numpy()
    cm = confusion_matrix(pred, y, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 1]]
    # recalls: class0 1/1, class1 0/2, class2 1/2 -> mean 0.5
    assert mean_per_class_recall(pred, y, 3) == pytest.approx(0.5)
    m = classification_metrics(scores, y)
    # acc5 of 3 classes would be trivially 1: NaN, as CLIP_benchmark reports it
    assert m == pytest.approx({"acc1": 0.4, "acc5": float("nan"), "mean_per_class_recall": 0.5}, nan_ok=True)
    top, conf = chunked_topk(scores.numpy(), torch.eye(3), k=5, chunk=2)
    assert metrics_from_topk(top, y, 3) == pytest.approx(m, nan_ok=True)
    assert np.all((conf > 0) & (conf <= 1))


def test_absent_classes_do_not_count():
    assert mean_per_class_recall([0, 0, 1], [0, 0, 1], 5) == 1.0


def _photo(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    a[10:30, 10:30] = [250, 30, 30]
    return Image.fromarray(a, "RGB")


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shift_is_deterministic_and_changes_image(name):
    img = _photo()
    sh = Shift.parse(name, seed=3)
    a, b = sh(img, 5), sh(img, 5)
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(img))


def test_noise_depends_on_index_and_seed():
    img = _photo()
    n = Shift.parse("noise")
    assert not np.array_equal(np.asarray(n(img, 1)), np.asarray(n(img, 2)))
    assert not np.array_equal(np.asarray(Shift("noise", None, 0)(img, 1)), np.asarray(Shift("noise", None, 1)(img, 1)))


def test_shift_semantics():
    img = _photo()
    g = np.asarray(Shift.parse("grayscale")(img))
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    inv = np.asarray(Shift.parse("invert")(img)).astype(int)
    assert np.array_equal(inv, 255 - np.asarray(img).astype(int))
    mild, strong = Shift.parse("blur:0.5")(img), Shift.parse("blur:4")(img)
    diff = lambda x: np.abs(np.asarray(x).astype(int) - np.asarray(img).astype(int)).mean()
    assert diff(strong) > diff(mild)


def test_parse_shifts():
    assert [s.label for s in parse_shifts("grayscale, blur:2")] == ["grayscale", "blur:2"]
    assert len(parse_shifts("all")) == len(SHIFTS)
    assert parse_shifts(["gray"])[0].name == "grayscale"
    with pytest.raises(ValueError, match="unknown shift"):
        parse_shifts("fog")
    with pytest.raises(ValueError, match="not a number"):
        parse_shifts("blur:x")
