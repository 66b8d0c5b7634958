"""Zero-shot heads: correctness with an oracle model, ensembling, length-sorted batching, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.eval import ZeroShotClassifier, build_zeroshot_weights
from clipforge.eval.prompts import load_templates
from clipforge.eval.zeroshot import embed_texts_length_sorted, prompts_for
from clipforge.inference import embed_texts
from clipforge.preprocess import image_transform


@pytest.fixture
def oracle_data(oracle_kit):
    labels = np.arange(48) % len(oracle_kit.CLASSES)
    images = [oracle_kit.class_image(int(c), noise=1, seed=i) for i, c in enumerate(labels)]
    return images, labels


@pytest.mark.parametrize("templates", ["imagenet", "simple", "none", "cifar10"])
def test_oracle_zero_shot_is_perfect(tmp_path, oracle_kit, oracle_data, templates):
    images, labels = oracle_data
    clf = ZeroShotClassifier(oracle_kit.OracleCLIP(), oracle_kit.CLASSES, templates, cache_dir=tmp_path)
    probs = clf.predict_proba(images)
    assert probs.shape == (len(images), len(oracle_kit.CLASSES))
    assert torch.allclose(probs.sum(1), torch.ones(len(images)), atol=1e-5)
    assert (clf.predict(images).numpy() == labels).all()


def test_oracle_detects_class_order_mixups(tmp_path, oracle_kit, oracle_data):
    """The same pipeline with the class list rotated must get every image wrong."""
    images, labels = oracle_data
    rotated = oracle_kit.CLASSES[1:] + oracle_kit.CLASSES[:1]
    clf = ZeroShotClassifier(oracle_kit.OracleCLIP(), rotated, "imagenet", cache_dir=tmp_path)
    pred = clf.predict(images).numpy()
    assert (pred == labels).mean() == 0.0
    assert (np.asarray(rotated)[pred] == np.asarray(oracle_kit.CLASSES)[labels]).all()


def test_predict_accepts_tensors_and_features(tmp_path, oracle_kit, oracle_data):
    images, labels = oracle_data
    clf = ZeroShotClassifier(oracle_kit.OracleCLIP(), oracle_kit.CLASSES, "simple", cache_dir=tmp_path)
    pre = image_transform(clf.model.config.preprocess)
    batch = torch.stack([pre(im) for im in images])
    feats = clf.image_features(images)
    p_img = clf.predict_proba(images)
    assert torch.allclose(p_img, clf.predict_proba(batch), atol=1e-6)
    assert torch.allclose(p_img, clf.predict_proba(list(batch)), atol=1e-6)
    assert torch.allclose(p_img, clf.predict_proba(feats.numpy()), atol=1e-6)
    assert torch.allclose(clf.logits(feats), clf.logit_scale * feats @ clf.weights.t())
    with pytest.raises(ValueError, match="dim"):
        clf.predict_proba(torch.zeros(3, 5))


def test_ensemble_is_mean_of_normalised_prompt_embeddings(micro_vit, tmp_path):
    names = ["cat", "small dog", ["car", "automobile"]]
    templates = load_templates("cifar10")[:5]
    w = build_zeroshot_weights(micro_vit, names, templates, batch_size=4)
    for c, cn in enumerate(names):
        syn = [cn] if isinstance(cn, str) else cn
        texts = [t.replace("{}", s) for s in syn for t in templates]
        e = embed_texts(micro_vit, texts)                      # unit rows
        expect = F.normalize(e.mean(0), dim=0)
        assert torch.allclose(w[c], expect, atol=1e-5), c
    assert torch.allclose(w.norm(dim=1), torch.ones(3), atol=1e-5)


def test_length_sorted_batching_restores_order(micro_vit):
    texts = ["a", "a photo of a very very long and winding description of a cat on a mat", "dog",
             "two words", "a photo of the small dog.", "x y z w v u t s"] * 3
    sorted_emb = embed_texts_length_sorted(micro_vit, texts, batch_size=4)
    plain = torch.cat([embed_texts(micro_vit, [t]) for t in texts])
    assert torch.allclose(sorted_emb, plain, atol=1e-5)


def test_prompts_for_counts_synonyms():
    texts, owner = prompts_for(["a", ["b", "c"]], ["x {}", "{} y"])
    assert texts == ["x a", "a y", "x b", "b y", "x c", "c y"]
    assert owner == [0, 0, 1, 1, 1, 1]


def test_cache_hit_skips_text_tower(micro_vit, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = micro_vit.text.forward

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(micro_vit.text, "forward", counting)
    names, templates = ["cat", "dog", "bird"], "cifar10"
    first = ZeroShotClassifier(micro_vit, names, templates, cache_dir=tmp_path, batch_size=16)
    assert not first.cache_hit and calls["n"] > 0
    n_first = calls["n"]
    second = ZeroShotClassifier(micro_vit, names, templates, cache_dir=tmp_path, batch_size=16)
    assert second.cache_hit and calls["n"] == n_first          # text tower not called at all
    assert torch.equal(first.weights, second.weights)
    # Different templates or changed text-tower weights must miss the cache.
    ZeroShotClassifier(micro_vit, names, "simple", cache_dir=tmp_path)
    assert calls["n"] > n_first
    n_before = calls["n"]
    with torch.no_grad():
        micro_vit.text.text_projection.add_(0.05 * torch.randn_like(micro_vit.text.text_projection))
    third = ZeroShotClassifier(micro_vit, names, templates, cache_dir=tmp_path, batch_size=16)
    assert not third.cache_hit and calls["n"] > n_before
    assert not torch.allclose(third.weights, first.weights)
    # use_cache=False never reads the cache
    fourth = ZeroShotClassifier(micro_vit, names, templates, cache_dir=tmp_path, use_cache=False)
    assert not fourth.cache_hit


def test_image_tower_changes_do_not_invalidate_head(micro_vit, tmp_path):
    ZeroShotClassifier(micro_vit, ["a", "b"], "simple", cache_dir=tmp_path)
    with torch.no_grad():
        next(micro_vit.visual.parameters()).add_(1.0)
    assert ZeroShotClassifier(micro_vit, ["a", "b"], "simple", cache_dir=tmp_path).cache_hit


def test_corrupt_cache_entry_is_rebuilt(micro_vit, tmp_path):
    clf = ZeroShotClassifier(micro_vit, ["a", "b"], "simple", cache_dir=tmp_path)
    clf.cache_path.write_bytes(b"garbage")
    again = ZeroShotClassifier(micro_vit, ["a", "b"], "simple", cache_dir=tmp_path)
    assert not again.cache_hit and torch.allclose(again.weights, clf.weights)


def test_save_load_roundtrip(micro_vit, micro_rn, tmp_path):
    clf = ZeroShotClassifier(micro_vit, ["cat", ["dog", "puppy"]], "cifar10", cache_dir=tmp_path)
    path = tmp_path / "head.safetensors"
    clf.save(path)
    back = ZeroShotClassifier.load(path, micro_vit)
    assert torch.equal(back.weights, clf.weights)
    assert back.classnames == ["cat", ["dog", "puppy"]] and back.templates == clf.templates
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(back.predict_proba(x), clf.predict_proba(x))
    with pytest.raises(ValueError, match="different text tower"):
        ZeroShotClassifier.load(path, micro_rn)
    assert ZeroShotClassifier.load(path, micro_rn, strict=False).num_classes == 2
    with pytest.raises(FileNotFoundError):
        ZeroShotClassifier.load(tmp_path / "missing.safetensors", micro_vit)
