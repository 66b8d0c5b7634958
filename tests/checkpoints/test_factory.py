"""The open_clip-style entry points: create_model_and_transforms, model-name aliases, get_tokenizer(name).
(tests/interop/test_openclip.py compares them against open_clip itself.)"""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.checkpoints import save_model
from clipforge.config import get_model_config

from conftest import micro_config


@pytest.mark.parametrize("oc_name, ours", [("ViT-B-32", "ViT-B/32"), ("ViT-B-32-quickgelu", "ViT-B/32"),
                                           ("RN50", "RN50"), ("RN50x4-quickgelu", "RN50x4"),
                                           ("ViT-L-14-336", "ViT-L/14@336px"), ("vit-l-14", "ViT-L/14")])
def test_open_clip_names_are_aliases_of_ours(oc_name, ours):
    assert get_model_config(oc_name) == get_model_config(ours)


def test_quickgelu_suffix_sets_the_activation_of_a_gelu_model():
    cfg = get_model_config("tiny-vit-quickgelu")
    assert get_model_config("tiny-vit").activation == "gelu"
    assert cfg.activation == "quick_gelu" and cfg.name == "tiny-vit-quickgelu"
    with pytest.raises(KeyError, match="unknown model 'ViT-B-33'"):
        get_model_config("ViT-B-33")


def test_create_model_and_transforms_random_and_from_a_checkpoint(tmp_path):
    model, train, val = clipforge.create_model_and_transforms("tiny-vit", seed=0)
    assert not model.training and model.config.name == "tiny-vit"
    assert train.train and not val.train and val.config == model.config.preprocess
    img = Image.fromarray((torch.rand(90, 120, 3) * 255).byte().numpy())
    assert val(img).shape == train(img, rng=random.Random(0)).shape == (3, 64, 64)

    path = save_model(model, tmp_path / "m.safetensors")
    loaded, _, val2 = clipforge.create_model_and_transforms("tiny-vit", pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert torch.equal(val(img), val2(img))
    # An open_clip local-dir folder, by name or through pretrained=, as open_clip accepts both spellings.
    clipforge.convert(path, tmp_path / "oc", "openclip")
    for args in (("local-dir:" + str(tmp_path / "oc"),), ("tiny-vit", "local-dir:" + str(tmp_path / "oc"))):
        m, _, _ = clipforge.create_model_and_transforms(*args)
        assert torch.equal(m.text.token_embedding.weight, model.text.token_embedding.weight)


def test_create_model_and_transforms_refuses_wrong_architecture_and_tags(tmp_path):
    path = save_model(clipforge.create_model(micro_config("vit")), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a tiny-vit checkpoint: embed_dim 32 != 256"):
        clipforge.create_model_and_transforms("tiny-vit", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        clipforge.create_model_and_transforms("ViT-B-32", pretrained="openai")


def test_activation_override_for_open_clips_gelu_names():
    model, _, _ = clipforge.create_model_and_transforms("tiny-vit-s", activation="quick_gelu", seed=0)
    assert model.config.activation == "quick_gelu"
    model, _, _ = clipforge.create_model_and_transforms("tiny-vit-s", force_quick_gelu=True, seed=0)
    assert model.config.activation == "quick_gelu"


def test_get_tokenizer_by_name_is_callable_like_open_clips(tmp_path):
    tok = clipforge.get_tokenizer("ViT-B-32")
    one, many = tok("a photo of a cat"), tok(["a photo of a cat", "two dogs"])
    assert one.dtype == torch.long and one.shape == (1, 77) and many.shape == (2, 77)
    assert torch.equal(many, clipforge.tokenize(["a photo of a cat", "two dogs"]))
    assert clipforge.get_tokenizer() is clipforge.get_tokenizer(77) is tok  # shared per context length
    assert clipforge.get_tokenizer("ViT-B-32", context_length=16)("a cat").shape == (1, 16)
    cfg = micro_config("vit")
    cfg.text.context_length = cfg.tokenizer.context_length = 24
    clipforge.convert(save_model(clipforge.create_model(cfg), tmp_path / "m.safetensors"), tmp_path / "oc", "openclip")
    assert clipforge.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")("a cat").shape == (1, 24)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        clipforge.get_tokenizer(f"local-dir:{tmp_path}")
