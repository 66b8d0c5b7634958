"""Parity with Hugging Face transformers.CLIPModel: load its checkpoints, convert back."""

from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.cli.main import main as cli_main

transformers = pytest.importorskip("transformers")


def _features(out: object) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output holds the projected features.
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def _hf_model(tiny: bool, act: str = "quick_gelu") -> "transformers.CLIPModel":
    if tiny:
        text = dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                    max_position_embeddings=77, vocab_size=49408, hidden_act=act)
        vision = dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                      image_size=32, patch_size=8, hidden_act=act)
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    else:  # ViT-B/32
        text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                    max_position_embeddings=77, vocab_size=49408, hidden_act=act)
        vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      image_size=224, patch_size=32, hidden_act=act)
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0: perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "layrnorm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(image_size: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    ids = clipforge.tokenize(["a photo of a dog", "a diagram of a very long caption " * 3, ""][:n])
    return images, ids


def _compare(hf_model, cf_model, image_size: int, atol: float = 1e-5) -> None:
    images, ids = _inputs(image_size)
    with torch.no_grad():
        hf_img = _features(hf_model.get_image_features(pixel_values=images))
        hf_txt = _features(hf_model.get_text_features(input_ids=ids))
        hf_logits = hf_model(input_ids=ids, pixel_values=images).logits_per_image
        img = cf_model.encode_image(images)
        txt = cf_model.encode_text(ids)
        logits, logits_t = cf_model(images, ids)
    assert (img - hf_img).abs().max().item() <= atol
    assert (txt - hf_txt).abs().max().item() <= atol
    assert (logits - hf_logits).abs().max().item() <= atol * 100  # logits are scaled by exp(logit_scale) ~ 14
    assert torch.equal(logits_t, logits.t())


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_tiny_hf_checkpoint_loads_with_same_outputs(tmp_path, act):
    hf = _hf_model(tiny=True, act=act)
    hf.save_pretrained(tmp_path / "hf")
    model, preprocess = clipforge.load(tmp_path / "hf")
    assert model.config.activation == act
    assert clipforge.load_model(tmp_path / "hf", return_info=True)[1].format == "hf"
    assert preprocess.config.image_size == 32
    _compare(hf, model, 32)


def test_vit_b32_hf_parity_and_round_trip(tmp_path):
    hf = _hf_model(tiny=False)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = clipforge.load(tmp_path / "hf")
    assert model.config.name == "ViT-B/32"  # recognised as the named architecture
    _compare(hf, model, 224)
    # ... and back: clipforge convert --to hf gives a folder transformers loads with equal outputs.
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "hf"]) == 0
    hf2 = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
    _compare(hf2, model, 224)
    sd1, sd2 = hf.state_dict(), hf2.state_dict()
    assert set(sd1) == set(sd2)
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)  # the weights survive the round trip bit for bit


def test_hf_tokenizer_files_written_by_convert_match_ours(tmp_path, micro_vit):
    clipforge.checkpoints.save_hf(micro_vit, tmp_path / "hf")
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    text = "a photo of a dog on the beach"
    ids = tok(text)["input_ids"]
    assert ids == clipforge.tokenize(text)[0][: len(ids)].tolist()


def test_hf_resnet_export_refused(tmp_path, micro_rn):
    with pytest.raises(ValueError, match="ResNet"):
        clipforge.checkpoints.save_hf(micro_rn, tmp_path / "x")


def test_hf_checkpoint_without_config_is_a_clear_error(tmp_path):
    hf = _hf_model(tiny=True)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        clipforge.load(tmp_path / "hf")
