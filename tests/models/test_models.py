"""The plain model: named architectures, golden outputs, batch independence, intermediates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.config import CLIPConfig, VisionConfig, get_model_config
from clipforge.models import CLIP
from golden_cases import CASES, compute_case

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"

PUBLISHED = {  # total parameters (millions) of the released OpenAI models
    "RN50": 102.0, "RN101": 119.7, "RN50x4": 178.3, "RN50x16": 291.0, "RN50x64": 623.3,
    "ViT-B/32": 151.3, "ViT-B/16": 149.6, "ViT-L/14": 427.6, "ViT-L/14@336px": 427.9,
}
RESOLUTION = {"RN50": 224, "RN101": 224, "RN50x4": 288, "RN50x16": 384, "RN50x64": 448,
              "ViT-B/32": 224, "ViT-B/16": 224, "ViT-L/14": 224, "ViT-L/14@336px": 336}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_architectures_match_published_sizes(name):
    cfg = get_model_config(name)
    assert cfg.vision.image_size == RESOLUTION[name]
    assert cfg.activation == "quick_gelu" and cfg.text.vocab_size == 49408 and cfg.text.context_length == 77
    with torch.device("meta"):
        model = CLIP(cfg)
        out = model.encode_image(torch.empty(2, 3, cfg.vision.image_size, cfg.vision.image_size))
        txt = model.text(torch.zeros(2, 77, dtype=torch.long, device="meta"))
    assert out.shape == (2, cfg.embed_dim) and txt.shape == (2, cfg.embed_dim)
    assert abs(model.num_parameters()["total"] / 1e6 - PUBLISHED[name]) < 0.1


@pytest.mark.parametrize("name", ["RN50", "ViT-B/32"])
def test_real_forward_at_named_resolution(name):
    model = clipforge.create_model(name, seed=0).eval()
    s = model.image_size
    with torch.inference_mode():
        logits_i, logits_t = model(torch.randn(1, 3, s, s), clipforge.tokenize(["a dog", "a cat"]))
    assert logits_i.shape == (1, 2) and torch.isfinite(logits_i).all()
    assert torch.allclose(model.logit_scale.exp(), torch.tensor(1 / 0.07))


def test_zoo_names_and_config_json_round_trip():
    names = clipforge.available_models()
    assert names[:9] == list(PUBLISHED) and "tiny-vit" in names
    for name in names:
        cfg = get_model_config(name)
        assert CLIPConfig.from_json(cfg.to_json()) == cfg
    assert get_model_config("vit-b-32").name == "ViT-B/32"
    with pytest.raises(KeyError, match="unknown model"):
        get_model_config("ViT-Z/99")


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(kind="vit", image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="4 stage depths"):
        VisionConfig(kind="resnet", layers=3)
    with pytest.raises(ValueError, match="unknown CLIPConfig keys"):
        CLIPConfig.from_dict({"embed_dim": 8, "colour": "red"})


@pytest.mark.parametrize("case", CASES)
def test_golden_outputs(case):
    """Stored outputs of the plain model (torch's own kernels, never a per-machine choice) for fixed
    weights and inputs: exact on the CPU ISA / torch version that made them."""
    meta = json.loads((GOLDEN / "meta.json").read_text())
    ref = np.load(GOLDEN / "outputs.npz")
    got = compute_case(case)
    same_env = (meta["torch"] == torch.__version__ and meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability())
    for key, value in got.items():
        expected = torch.from_numpy(ref[f"{case}/{key}"])
        if same_env:
            assert torch.equal(value, expected), f"{case}/{key} drifted: max diff {(value - expected).abs().max()}"
        else:  # other kernels (CPU ISA, torch version) may round differently, never by more than this
            assert torch.allclose(value, expected, atol=1e-5, rtol=1e-5), f"{case}/{key}"


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_batch_size_does_not_change_embeddings(kind, micro_vit, micro_rn):
    model = micro_vit if kind == "vit" else micro_rn
    s = model.image_size
    images = torch.randn(64, 3, s, s)
    texts = [f"a photo of {i} dogs" + " and cats" * (i % 7) for i in range(64)]
    ids = clipforge.tokenize(texts)
    with torch.inference_mode():
        full_i, full_t = model.encode_image(images), model.encode_text(ids)
        for i in (0, 17, 63):
            assert (model.encode_image(images[i : i + 1]) - full_i[i]).abs().max() <= 1e-5
            assert (model.encode_text(ids[i : i + 1]) - full_t[i]).abs().max() <= 1e-5


def test_text_features_come_from_the_eot_token(micro_vit):
    a = clipforge.tokenize(["a red circle"])
    b = a.clone()
    eot = int(a.argmax())
    b[0, eot + 1 :] = 5  # garbage after EOT cannot leak backwards through the causal mask
    b[0, eot] = 49407
    with torch.inference_mode():
        assert torch.allclose(micro_vit.encode_text(a), micro_vit.encode_text(b), atol=1e-6)
        c = a.clone()
        c[0, 2] = 1000  # a change before EOT must change the features
        assert not torch.allclose(micro_vit.encode_text(a), micro_vit.encode_text(c), atol=1e-4)


def test_forward_logits_are_scaled_cosines(micro_vit):
    x, ids = torch.randn(3, 3, 32, 32), clipforge.tokenize(["a", "b c", "d e f"])
    with torch.no_grad():
        li, lt = micro_vit(x, ids)
        i, t = micro_vit.encode_image(x, normalize=True), micro_vit.encode_text(ids, normalize=True)
    assert torch.allclose(li, micro_vit.logit_scale.exp() * i @ t.T, atol=1e-5)
    assert torch.allclose(i.norm(dim=-1), torch.ones(3)) and torch.equal(lt, li.T)


def test_logit_scale_clamp(micro_vit):
    with torch.no_grad():
        micro_vit.logit_scale.fill_(10.0)
    micro_vit.clamp_logit_scale()
    assert abs(micro_vit.logit_scale.exp().item() - 100.0) < 1e-3


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_intermediates(kind, micro_vit, micro_rn):
    model = micro_vit if kind == "vit" else micro_rn
    s = model.image_size
    x, ids = torch.randn(2, 3, s, s), clipforge.tokenize(["a dog", "a cat on a mat"])
    with torch.no_grad():
        out = model.forward_intermediates(x, ids, attention=True)
        img, txt = out["image"], out["text"]
        assert torch.allclose(img["output"], model.encode_image(x), atol=1e-5)
        assert torch.allclose(txt["output"], model.encode_text(ids), atol=1e-5)
    if kind == "vit":
        assert len(img["tokens"]) == 2 and img["tokens"][0].shape == (2, 1 + img["grid"] ** 2, 64)
        assert img["attentions"][0].shape == (2, 2, 17, 17)
    else:
        assert len(img["tokens"]) == 5 and img["attentions"][0].shape == (2, 8, 1, 1 + img["grid"] ** 2)
    for a in img["attentions"] + txt["attentions"]:
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)
    causal = txt["attentions"][0]
    assert causal.triu(1).abs().max() == 0  # text attention is causal


def test_grad_checkpointing_gives_same_gradients(micro_vit):
    x, ids = torch.randn(2, 3, 32, 32), clipforge.tokenize(["a dog", "a cat"])
    micro_vit.train()
    micro_vit(x, ids)[0].sum().backward()
    ref = [p.grad.clone() for p in micro_vit.parameters()]
    micro_vit.zero_grad()
    micro_vit.set_grad_checkpointing(True)
    micro_vit(x, ids)[0].sum().backward()
    for r, p in zip(ref, micro_vit.parameters()):
        assert torch.allclose(r, p.grad, atol=1e-6)


def test_lock_image_tower(micro_rn):
    micro_rn.lock_image_tower()
    micro_rn.train()
    assert not any(p.requires_grad for p in micro_rn.visual.parameters())
    assert not micro_rn.visual.training and micro_rn.text.training  # BN statistics stay frozen


def test_bad_inputs_have_clear_errors(micro_vit):
    with pytest.raises(ValueError, match="takes 32x32"):
        micro_vit.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        micro_vit.encode_image(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="context length 77"):
        micro_vit.encode_text(torch.zeros(1, 80, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tokens"):
        micro_vit.encode_text(torch.zeros(1, 77))
