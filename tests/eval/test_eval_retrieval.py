"""Recall@K with several captions per image: hand-computed cases and chunking invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipforge.eval import recall_from_similarity, retrieval_metrics, retrieval_ranks
from clipforge.eval.retrieval import embed_pairs


def test_hand_made_similarity_matrix():
    # 3 images, 6 captions: image 0 owns captions 0,1; image 1 owns 2,3; image 2 owns 4,5.
    owner = [0, 0, 1, 1, 2, 2]
    S = np.array([
        # c0    c1    c2    c3    c4    c5
        [0.10, 0.90, 0.95, 0.20, 0.30, 0.00],   # img0: best own caption c1 (0.90); c2 beats it -> rank 1
        [0.80, 0.70, 0.10, 0.60, 0.75, 0.50],   # img1: best own c3 (0.60); c0, c1, c4 beat it -> rank 3
        [0.20, 0.10, 0.30, 0.40, 0.90, 0.35],   # img2: best own c4 (0.90) -> rank 0
    ])
    m = recall_from_similarity(S, owner, ks=(1, 2, 3, 4))
    # image -> text ranks: [1, 3, 0]
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@3"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@4"] == pytest.approx(1.0)
    # text -> image (column-wise): c0: own img0 0.10 < 0.80, 0.20 -> rank 2; c1: 0.90 top -> 0;
    # c2: own img1 0.10 < 0.95, 0.30 -> 2; c3: own 0.60 < -, 0.60 vs 0.20, 0.40 -> 0;
    # c4: own img2 0.90 -> 0; c5: own 0.35 < 0.50 -> 1.
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 6)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 6)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    i2t, t2i = retrieval_ranks(torch.tensor(S, dtype=torch.float32), torch.eye(6), owner)
    assert i2t.tolist() == [1, 3, 0]
    assert t2i.tolist() == [2, 0, 2, 0, 0, 1]
    assert m["text_retrieval_median_rank"] == 2.0 and m["image_retrieval_median_rank"] == 1.5


def _brute_force(img, txt, owner, ks):
    S = img @ txt.T
    owner = np.asarray(owner)
    i2t = []
    for i in range(S.shape[0]):
        top = np.argsort(-S[i], kind="stable")
        i2t.append(min(np.flatnonzero(owner[top] == i)))
    t2i = [int(np.flatnonzero(np.argsort(-S[:, j], kind="stable") == owner[j])[0]) for j in range(S.shape[1])]
    i2t, t2i = np.array(i2t), np.array(t2i)
    return {k: ((i2t < k).mean(), (t2i < k).mean()) for k in ks}


@pytest.mark.parametrize("block_elems", [1, 7, 64, 1 << 20])
def test_chunked_matches_brute_force(block_elems):
    rng = np.random.default_rng(0)
    ni = 23
    owner = np.repeat(np.arange(ni), rng.integers(1, 6, ni))
    img = rng.normal(size=(ni, 8)).astype(np.float32)
    txt = (img[owner] + 1.5 * rng.normal(size=(len(owner), 8))).astype(np.float32)
    m = retrieval_metrics(img, txt, owner, ks=(1, 5, 10), block_elems=block_elems)
    ref = _brute_force(img, txt, owner, (1, 5, 10))
    for k, (r_i2t, r_t2i) in ref.items():
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(r_i2t)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(r_t2i)


def test_images_without_captions_are_not_queries():
    img = torch.eye(3)
    txt = torch.eye(3)[:2]
    i2t, t2i = retrieval_ranks(img, txt, [0, 1])
    assert i2t.tolist() == [0, 0, -1] and t2i.tolist() == [0, 0]
    m = retrieval_metrics(img, txt, [0, 1])
    assert m["text_retrieval_recall@1"] == 1.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="entries"):
        retrieval_ranks(torch.eye(3), torch.eye(3), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_ranks(torch.eye(3), torch.eye(3), [0, 1, 3])
    with pytest.raises(ValueError, match="equal D"):
        retrieval_ranks(torch.eye(3), torch.ones(3, 4), [0, 1, 2])


def test_embed_pairs_skips_unreadable(micro_vit):
    from PIL import Image

    good = Image.new("RGB", (40, 40), (200, 10, 10))
    samples = [(good, ["a red square", "red"]), (b"not an image", ["broken"]), (good, "one caption"), (good, [])]
    pf = embed_pairs(micro_vit, samples, batch_size=2)
    assert pf.skipped == 2 and len(pf.keys) == 2
    assert pf.text_to_image.tolist() == [0, 0, 1]
    assert pf.image_features.shape == (2, 32) and pf.text_features.shape == (3, 32)
    assert any("broken" in s or "1:" in s for s in pf.skipped_keys)


def test_builtin_scenes_default_to_the_test_split_in_evaluation():
    from clipforge.eval.datasets import open_pairs

    assert open_pairs("builtin:scenes?n=8").split == "test"
    assert open_pairs("builtin:scenes?n=8&split=val").split == "val"  # the spec's own choice wins
    assert open_pairs("builtin:scenes?n=8", split="train").split == "train"
