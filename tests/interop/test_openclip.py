"""clipforge <-> open_clip, both ways, against open_clip itself (issue 11, item 1).

- ``clipforge convert --to openclip DIR`` writes what ``open_clip.create_model_and_transforms("local-dir:DIR")``
  loads (config, preprocessing and the weights: embeddings equal within 1e-5);
- models open_clip users save (state dict ``.pt``/``.bin``/``.safetensors``, an ``epoch_N.pt`` training
  checkpoint, a ``local-dir`` folder written by open_clip's own ``save_config_for_hf``) load in clipforge
  with the same embeddings;
- ``clipforge.get_tokenizer(name)`` gives open_clip's ids; our transforms equal open_clip's (torchvision)
  on real photos.

Run with ``/opt/refenv/bin/python -m pytest tests/interop/test_openclip.py`` (skips where open_clip is absent).
"""

from __future__ import annotations

import csv
import json
import random
import tarfile

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("torchvision")

import clipforge  # noqa: E402
from clipforge.checkpoints import save_model  # noqa: E402
from clipforge.cli.main import main as cli_main  # noqa: E402
from clipforge.preprocess import load_image  # noqa: E402
from open_clip.push_to_hf_hub import save_config_for_hf  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import micro_config  # noqa: E402

ATOL = 1e-5
TEXTS = ["a photo of a cat", "Two dogs play on the grass.", "an ÉLÉPHANT in the zoo!!", "C'est déjà l'été",
         "&amp; html &lt;b&gt;", "日本語のテキスト", "numbers 12345 and 3.14", "  spaced\tout\n", ""]


def _inputs(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, size, size, generator=g), clipforge.tokenize(TEXTS[:3])


def _max_diffs(oc_model, cf_model, size: int) -> tuple[float, float]:
    images, ids = _inputs(size)
    oc_model.eval()
    with torch.no_grad():
        di = (oc_model.encode_image(images) - cf_model.encode_image(images)).abs().max().item()
        dt = (oc_model.encode_text(ids) - cf_model.encode_text(ids)).abs().max().item()
    return di, dt


def _oc_preprocess_matches(oc_model, cfg) -> None:
    pp = oc_model.visual.preprocess_cfg
    assert tuple(pp["mean"]) == cfg.preprocess.mean and tuple(pp["std"]) == cfg.preprocess.std
    assert pp["interpolation"] == cfg.preprocess.interpolation and pp["resize_mode"] == cfg.preprocess.resize_mode
    size = pp["size"]
    assert (size, size) if isinstance(size, int) else tuple(size) == (cfg.preprocess.image_size,) * 2


# --- clipforge -> open_clip ------------------------------------------------------------------------


@pytest.mark.parametrize("kind, act", [("vit", "gelu"), ("vit", "quick_gelu"), ("resnet", "quick_gelu"),
                                       ("resnet", "gelu")])
def test_converted_folder_loads_in_open_clip_local_dir(tmp_path, capsys, kind, act):
    cfg = micro_config(kind, activation=act)
    cfg.preprocess.mean, cfg.preprocess.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # must travel, not default
    model = clipforge.create_model(cfg, seed=1).eval()
    src = save_model(model, tmp_path / "src.safetensors")
    assert cli_main(["convert", str(src), str(tmp_path / "oc"), "--to", "openclip"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    oc_model, oc_train, oc_val = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    _oc_preprocess_matches(oc_model, cfg)
    di, dt = _max_diffs(oc_model, model, cfg.vision.image_size)
    print(f"clipforge -> open_clip local-dir ({kind}, {act}): image {di:.2e}, text {dt:.2e}")
    assert di <= ATOL and dt <= ATOL
    assert torch.equal(oc_model.logit_scale.detach(), model.logit_scale.detach())
    # open_clip's tokenizer for the folder uses the context length the folder records.
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    assert torch.equal(tok(TEXTS), clipforge.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(TEXTS))


def test_random_weights_would_have_been_caught(tmp_path):
    """The check above is not vacuous: the same architecture with open_clip's random init differs."""
    model = clipforge.create_model(micro_config("vit", activation="gelu"), seed=1).eval()
    clipforge.convert(save_model(model, tmp_path / "s.safetensors"), tmp_path / "oc", "openclip")
    (tmp_path / "oc" / "open_clip_model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
    assert min(_max_diffs(oc_model, model, 32)) > 1e-2


@pytest.mark.slow  # ~600 MB written and read back; ~15 s
def test_vit_b32_shaped_round_trip_through_open_clip(tmp_path):
    model = clipforge.create_model("ViT-B/32", seed=0).eval()
    clipforge.convert(save_model(model, tmp_path / "src.safetensors"), tmp_path / "oc", "openclip")
    oc_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    di, dt = _max_diffs(oc_model, model, 224)
    print(f"ViT-B/32 clipforge -> open_clip: image {di:.2e}, text {dt:.2e}")
    assert di <= ATOL and dt <= ATOL
    # ... and our own reader takes the folder back as the same named architecture.
    back, info = clipforge.load_model(tmp_path / "oc", return_info=True)
    assert info.format == "openclip" and back.config.name == "ViT-B/32"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


# --- open_clip -> clipforge ------------------------------------------------------------------------


def _oc_model_cfg(act: str, head_width: int = 32) -> dict:
    return {"embed_dim": 32, "quick_gelu": act == "quick_gelu",
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": head_width},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 64 // head_width,
                         "layers": 2}}


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_open_clip_local_dir_written_by_open_clip_loads_in_clipforge(tmp_path, act):
    torch.manual_seed(5)
    model_cfg = _oc_model_cfg(act)
    oc_model = open_clip.CLIP(**model_cfg).eval()
    open_clip.model.set_model_preprocess_cfg(oc_model, {"size": 32, "mode": "RGB", "mean": (0.5, 0.5, 0.5),
                                                        "std": (0.25, 0.25, 0.25), "interpolation": "bilinear",
                                                        "resize_mode": "squash"})
    folder = tmp_path / "hub"
    folder.mkdir()
    # What open_clip's save_for_hf writes (minus the tokenizer files): both weight files + its config.
    save_file(oc_model.state_dict(), str(folder / "open_clip_model.safetensors"))
    torch.save(oc_model.state_dict(), folder / "open_clip_pytorch_model.bin")
    save_config_for_hf(oc_model, folder / "open_clip_config.json", model_config=model_cfg)
    model, _, val = clipforge.create_model_and_transforms(f"local-dir:{folder}")
    for m in (model, clipforge.load(folder)[0]):
        assert m.config.activation == act
        di, dt = _max_diffs(oc_model, m, 32)
        assert di <= ATOL and dt <= ATOL
    assert val.config.interpolation == "bilinear" and val.config.resize_mode == "squash"
    assert val.config.mean == (0.5, 0.5, 0.5) and val.config.std == (0.25, 0.25, 0.25)
    (folder / "open_clip_model.safetensors").unlink()  # open_clip falls back to the .bin; so do we
    di, dt = _max_diffs(oc_model, clipforge.load_model(folder), 32)
    assert di <= ATOL and dt <= ATOL


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors", "epoch"])
def test_open_clip_state_dict_files_load_in_clipforge(tmp_path, suffix):
    torch.manual_seed(6)
    # Bare weights cannot tell head counts either: width // 64 is assumed, as in every released model.
    oc_model = open_clip.CLIP(**_oc_model_cfg("gelu", head_width=64)).eval()
    sd = oc_model.state_dict()
    if suffix == ".safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif suffix == "epoch":  # open_clip_train's checkpoint: DDP prefix, epoch, name, optimizer
        path = tmp_path / "epoch_2.pt"
        torch.save({"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                    "optimizer": {"state": {}, "param_groups": []}}, path)
    else:
        path = tmp_path / f"w{suffix}"
        torch.save(sd, path)
    # A bare state dict cannot say it is GELU (open_clip takes that from the model name): we say so.
    model, info = clipforge.load_model(path, return_info=True)
    assert info.assumed == ("activation", "heads") and model.config.activation == "quick_gelu"
    model, info = clipforge.load_model(path, activation="gelu", return_info=True)
    di, dt = _max_diffs(oc_model, model, 32)
    assert di <= ATOL and dt <= ATOL
    if suffix == "epoch":
        assert info.extras["epoch"] == 2


@pytest.mark.parametrize("oc_name, activation", [
    pytest.param("ViT-B-32", "gelu", marks=pytest.mark.slow),  # ~30 s each on 2 busy cores
    pytest.param("ViT-B-32-quickgelu", None, marks=pytest.mark.slow),
    ("RN50-quickgelu", None)])
def test_named_open_clip_models_through_create_model_and_transforms(tmp_path, oc_name, activation):
    torch.manual_seed(7)
    oc_model = open_clip.create_model(oc_name).eval()
    torch.save(oc_model.state_dict(), tmp_path / "w.pt")
    # The name is checked against the weights' architecture (a mismatch raises), as open_clip's strict load.
    model, train, val = clipforge.create_model_and_transforms(oc_name, pretrained=str(tmp_path / "w.pt"),
                                                              activation=activation)
    assert model.config.activation == ("quick_gelu" if "quickgelu" in oc_name else "gelu")
    di, dt = _max_diffs(oc_model, model, 224)
    print(f"open_clip {oc_name} -> clipforge: image {di:.2e}, text {dt:.2e}")
    assert di <= ATOL and dt <= ATOL
    _oc_preprocess_matches(oc_model, model.config)


# --- tokenizer and transforms ----------------------------------------------------------------------


def test_get_tokenizer_by_name_equals_open_clips(shared_data):
    rows = list(csv.DictReader(open(shared_data / "flickr8k" / "captions.tsv", encoding="utf-8"),
                               delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = TEXTS + [r["caption"] for r in rows[::97][:400]]
    for name in ("ViT-B-32", "RN50", "ViT-L-14-336"):
        ours, theirs = clipforge.get_tokenizer(name), open_clip.get_tokenizer(name)
        assert torch.equal(ours(texts), theirs(texts)), name
        assert torch.equal(ours(texts[0]), theirs(texts[0]))
    # The one known difference: a literal "<|endoftext|>" in a text is OpenAI's special token for us
    # (OpenAI's tokenizer); open_clip 3.x spells its specials "<end_of_text>" and encodes the characters.
    odd = "a <|endoftext|> b"
    ours = clipforge.get_tokenizer("ViT-B-32")
    assert ours(odd)[0, :5].tolist() == [49406, *ours.encode("a"), 49407, *ours.encode("b"), 49407]
    assert 49407 not in open_clip.get_tokenizer("ViT-B-32")(odd)[0, 1:4].tolist()
    long = " ".join(["word"] * 100)  # open_clip truncates silently; ours does when asked to
    assert torch.equal(ours(long, truncate=True), open_clip.get_tokenizer("ViT-B-32")(long))
    with pytest.raises(ValueError, match="context length 77"):
        clipforge.get_tokenizer("ViT-B-32")(long)


@pytest.fixture(scope="module")
def photos(shared_data):
    """24 real ImageNet photos of varied aspect ratios (shorter side 160)."""
    rows = list(csv.DictReader(open(shared_data / "imagenet_samples" / "labels.tsv", encoding="utf-8"),
                               delimiter="\t", quoting=csv.QUOTE_NONE))
    with tarfile.open(shared_data / "imagenet_samples" / "images_160.tar") as tf:
        return [load_image(tf.extractfile(r["image"]).read(), r["image"]) for r in rows[::41][:24]]


@pytest.mark.parametrize("size, interpolation, resize_mode", [
    (224, "bicubic", "shortest"), (288, "bicubic", "shortest"), (224, "bilinear", "shortest"),
    (224, "bicubic", "squash")])
def test_preprocess_val_matches_open_clips_on_real_photos(photos, size, interpolation, resize_mode):
    oc_val = image_transform_v2(PreprocessCfg(size=size, interpolation=interpolation, resize_mode=resize_mode),
                                is_train=False)
    cf_val = clipforge.image_transform(clipforge.PreprocessConfig(image_size=size, interpolation=interpolation,
                                                                  resize_mode=resize_mode))
    diffs = [(cf_val(im) - oc_val(im)).abs().max().item() for im in photos]
    sizes = ", ".join(sorted({f"{im.width}x{im.height}" for im in photos})[:5])
    print(f"preprocess_val {size} {interpolation} {resize_mode} vs open_clip on {len(photos)} photos "
          f"({sizes}, ...): max abs diff {max(diffs):.2e}")
    assert max(diffs) == 0.0


def test_preprocess_train_is_open_clips_default_augmentation(photos, monkeypatch):
    """Same crop box -> same tensor; and open_clip's default is the crop rule we implement."""
    from torchvision.transforms import RandomResizedCrop

    from clipforge.preprocess import random_resized_crop_params

    # bilinear eval interpolation: open_clip's train crop is bicubic regardless, and so is ours.
    oc_train = image_transform_v2(PreprocessCfg(size=224, interpolation="bilinear"), is_train=True)
    cf_train = clipforge.image_transform(clipforge.PreprocessConfig(interpolation="bilinear"), train=True)
    rrc = oc_train.transforms[0]
    assert isinstance(rrc, RandomResizedCrop) and rrc.scale == (0.9, 1.0) and rrc.size == (224, 224)
    assert rrc.ratio == pytest.approx((3 / 4, 4 / 3)) and rrc.interpolation.value == "bicubic"
    assert cf_train.train_scale == rrc.scale
    for i, im in enumerate(photos[:8]):
        params = random_resized_crop_params(im.width, im.height, random.Random(i), rrc.scale, tuple(rrc.ratio))
        monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(lambda img, scale, ratio, p=params: p))
        assert torch.equal(cf_train(im, rng=random.Random(i)), oc_train(im)), i


def test_cli_info_of_an_open_clip_folder(tmp_path, capsys):
    oc_model = open_clip.create_model("RN50-quickgelu")
    folder = tmp_path / "rn50"
    folder.mkdir()
    save_file(oc_model.state_dict(), str(folder / "open_clip_model.safetensors"))
    model_cfg = open_clip.get_model_config("RN50-quickgelu")
    save_config_for_hf(oc_model, folder / "open_clip_config.json", model_config=model_cfg)
    assert cli_main(["info", str(folder), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["format"] == "openclip" and rec["architecture"] == "RN50" and rec["activation"] == "quick_gelu"
    assert rec["parameters"]["total"] == sum(p.numel() for p in oc_model.parameters())
