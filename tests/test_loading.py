"""load_for_inference: the one loader of eval, search, curation and the CLI."""

from __future__ import annotations

import pytest
import torch

from clipforge.checkpoints import save_model
from clipforge.loading import load_for_inference, model_label
from clipforge.models import create_model


def test_checkpoint_is_loaded_prepared_for_inference(tmp_path, micro_vit):
    ckpt = save_model(micro_vit, tmp_path / "m.safetensors")
    model, preprocess = load_for_inference(ckpt)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, 77))
    ids[:, 9] = 49407  # EOT
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), micro_vit.encode_image(images), atol=1e-4, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), micro_vit.encode_text(ids), atol=1e-4, rtol=0)
    assert preprocess.__class__.__name__ == "Preprocess"


def test_precision_casts_the_weights(tmp_path, micro_vit):
    model, _ = load_for_inference(save_model(micro_vit, tmp_path / "m.safetensors"), precision="bf16")
    assert torch.bfloat16 in {p.dtype for p in model.parameters()}
    with pytest.raises(ValueError, match="autocast precisions are for training"):
        load_for_inference(tmp_path / "m.safetensors", precision="amp_bf16")


@pytest.mark.parametrize("name", ["ViT-B/32", "vit-b-32", "tiny-vit"])
def test_architecture_name_without_random_init_is_refused(name):
    with pytest.raises(ValueError, match="architecture name, not a checkpoint.*--random-init"):
        load_for_inference(name)


def test_random_init_needs_an_architecture_and_is_seeded(tmp_path):
    with pytest.raises(ValueError, match="needs an architecture name.*tiny-vit"):
        load_for_inference(tmp_path / "missing.pt", random_init=True)
    a, _ = load_for_inference("tiny-vit", random_init=True, seed=3)
    b, _ = load_for_inference("tiny-vit", random_init=True, seed=3)
    c, _ = load_for_inference("tiny-vit", random_init=True, seed=4)
    assert torch.equal(a.visual.proj, b.visual.proj) and not torch.equal(a.visual.proj, c.visual.proj)
    assert torch.equal(a.visual.proj, create_model("tiny-vit", seed=3).visual.proj)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model checkpoint not found: .*nope.safetensors"):
        load_for_inference(tmp_path / "nope.safetensors")


def test_model_label():
    assert model_label("runs/x/final.safetensors") == "runs/x/final.safetensors"
    assert model_label("tiny-vit", random_init=True, seed=0) == "tiny-vit (random init, seed 0)"
    assert model_label("tiny-vit", random_init=True) == "tiny-vit (random init)"


def test_every_entry_point_gives_the_same_weights_with_its_documented_defaults(tmp_path, micro_vit):
    """clipforge.load (fast on), load(fast=False), create_model_and_transforms (plain) and
    load_for_inference (frozen) all read one checkpoint through clipforge.loading."""
    import clipforge
    from clipforge.fast import is_enabled

    ckpt = save_model(micro_vit, tmp_path / "m.safetensors")
    fast, _ = clipforge.load(ckpt)
    plain, _ = clipforge.load(ckpt, fast=False)
    factory, _, _ = clipforge.create_model_and_transforms("", pretrained=f"local-dir:{ckpt}")
    frozen, _ = load_for_inference(ckpt)
    assert is_enabled(fast) and not is_enabled(plain) and not is_enabled(factory) and is_enabled(frozen)
    assert all(p.requires_grad for m in (fast, plain, factory) for p in m.parameters())
    assert not any(m.training for m in (fast, plain, factory, frozen))
    ref = micro_vit.state_dict()
    for m in (fast, plain, factory):
        assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


def test_an_architecture_name_is_refused_the_same_way_everywhere(tmp_path):
    import clipforge
    from clipforge.loading import NotACheckpoint, checkpoint_path

    for call in (lambda: clipforge.load("ViT-B/32"), lambda: load_for_inference("ViT-B/32"),
                 lambda: clipforge.create_model_and_transforms("ViT-B-32", pretrained="ViT-B-32"),
                 lambda: checkpoint_path("vit-b-32")):
        with pytest.raises(NotACheckpoint, match="'(ViT-B/32|ViT-B-32|vit-b-32)' is an architecture name.*never downloads"):
            call()
    assert issubclass(NotACheckpoint, FileNotFoundError) and issubclass(NotACheckpoint, ValueError)
    with pytest.raises(FileNotFoundError, match="model checkpoint not found: .*gone.pt"):
        checkpoint_path(tmp_path / "gone.pt")


def test_checkpoints_load_is_a_deprecated_alias_that_warns_once(tmp_path, micro_vit):
    import warnings

    import clipforge
    import clipforge.checkpoints as storage
    from clipforge.utils import deprecation

    deprecation._warned.discard("clipforge.checkpoints.load")  # another test may have asked first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = storage.load, storage.load
    assert first is second is clipforge.load
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        "clipforge.checkpoints.load is deprecated; use clipforge.loading.load"]
