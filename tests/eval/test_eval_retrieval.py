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


def test_tie_rules_by_hand():
    # 2 images; caption c1 (image 0's) and c2 (image 1's) are the same sentence: identical scores.
    owner = [0, 0, 1]
    S = np.array([
        # c0    c1    c2
        [0.20, 0.50, 0.50],   # img0: best own c1 = 0.5 ties with c2 (image 1's) -> rank 0 (ties go to the query)
        [0.10, 0.30, 0.30],   # img1: own c2 = 0.3 ties with c1 -> rank 0
    ])
    i2t, t2i = retrieval_ranks(torch.tensor(S, dtype=torch.float32), torch.eye(3), owner)
    assert i2t.tolist() == [0, 0]
    # c0: own img0 0.2 > 0.1 -> 0; c1: own img0 0.5 > 0.3 -> 0; c2: own img1 0.3 < img0 0.5 -> 1
    assert t2i.tolist() == [0, 0, 1]
    m = recall_from_similarity(S, owner, ks=(1, 2), ties="query")
    assert m["text_retrieval_recall@1"] == 1.0 and m["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_tied_queries"] == 2 and m["image_retrieval_tied_queries"] == 0
    # CLIP_benchmark's rule: a top-1 holds one of the two tied captions, the one torch.topk returns
    # (implementation-defined); at K=2 both are in, so every image counts.
    cb = recall_from_similarity(S, owner, ks=(1, 2), ties="clip_benchmark")
    assert cb["text_retrieval_recall@2"] == 1.0
    top1 = torch.tensor(S, dtype=torch.float32).topk(1, dim=1).indices[:, 0].tolist()
    assert cb["text_retrieval_recall@1"] == np.mean([owner[j] == i for i, j in enumerate(top1)])
    assert cb["image_retrieval_recall@1"] == m["image_retrieval_recall@1"]   # no tie among images
    with pytest.raises(ValueError, match="tie rule"):
        recall_from_similarity(S, owner, ties="best")


def _duplicate_caption_features(seed):
    """Images whose own caption also belongs, word for word, to another image (identical text
    vectors), with positive scores that an elementwise sum rounds differently from a matmul."""
    rng = np.random.default_rng(seed)
    d, n_pairs = 512, 40
    img = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(2 * n_pairs, d)), dtype=torch.float32), dim=-1)
    base = torch.nn.functional.normalize(img[0::2] + img[1::2] + 0.05 * torch.tensor(
        rng.normal(size=(n_pairs, d)), dtype=torch.float32), dim=-1)
    txt = base.repeat_interleave(2, dim=0)          # caption 2m (image 2m) == caption 2m+1 (image 2m+1)
    owner = np.arange(2 * n_pairs)
    return img, txt, owner


def test_every_score_from_one_product():
    img, txt, owner = _duplicate_caption_features(0)
    # Precondition that made the old code wrong: summing elementwise rounds differently from the product.
    elementwise = (img[torch.as_tensor(owner)] * txt).sum(dim=1)
    product = (txt @ img.t())[torch.arange(len(owner)), torch.as_tensor(owner)]
    assert (elementwise != product).any()
    # Each image ties with its partner's identical caption; under "ties go to the query" every
    # image finds its own caption at rank 0, in the single product and in blocks alike.
    for block_elems in (1 << 24, 64, 7):
        i2t, _ = retrieval_ranks(img, txt, owner, block_elems=block_elems)
        assert (i2t == 0).all(), block_elems
        m = retrieval_metrics(img, txt, owner, ks=(1,), ties="query", block_elems=block_elems)
        assert m["text_retrieval_recall@1"] == 1.0 and m["text_retrieval_tied_queries"] == len(owner)
    # CLIP_benchmark's torch.topk keeps one caption of each tied pair: the recall is what topk says.
    cb = retrieval_metrics(img, txt, owner, ks=(1,))
    top1 = (img @ txt.t()).topk(1, dim=1).indices[:, 0].numpy()
    assert cb["text_retrieval_recall@1"] == (owner[top1] == owner).mean() < 1.0
