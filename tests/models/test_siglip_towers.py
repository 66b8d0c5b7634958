"""The native SigLIP towers (models/siglip.py): shapes, config round trip, the fast layer within
1e-4 of the plain model, our format round trip, and the open_clip key mapping."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import clipforge
from clipforge import fast
from clipforge.checkpoints import save_model
from clipforge.checkpoints import siglip as siglip_format
from clipforge.config import CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig
from clipforge.models import create_model


def siglip_micro() -> CLIPConfig:
    vision = VisionConfig(kind="siglip", image_size=32, width=64, layers=2, heads=4, patch_size=8)
    text = TextConfig(kind="siglip", context_length=16, vocab_size=500, width=64, heads=4, layers=2)
    return CLIPConfig(embed_dim=64, vision=vision, text=text, activation="gelu", norm_eps=1e-6,
                      init_logit_bias=-10.0, init_logit_scale=2.302585092994046,
                      preprocess=PreprocessConfig(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3),
                      tokenizer=TokenizerConfig(context_length=16), name="micro-siglip")


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 500, (n, 16), generator=g)


def test_config_round_trip_and_defaults_unchanged():
    cfg = siglip_micro()
    d = cfg.to_dict()
    assert d["text"]["kind"] == "siglip" and d["vision"]["kind"] == "siglip"
    assert CLIPConfig.from_dict(d) == cfg
    assert "kind" not in CLIPConfig().to_dict()["text"]  # CLIP configs read and hash as before
    with pytest.raises(ValueError, match="embed_dim"):
        create_model(CLIPConfig.from_dict({**d, "embed_dim": 32}))


def test_forward_shapes_and_bias():
    model = create_model(siglip_micro(), seed=0).eval()
    x, ids = _inputs()
    with torch.no_grad():
        img, txt = model.encode_image(x), model.encode_text(ids)
        logits, _ = model(x, ids)
    assert img.shape == txt.shape == (3, 64)
    expected = 10.0 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t() - 10
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padded to the context"):
        model.encode_text(ids[:, :8])


@pytest.mark.parametrize("pack", [False, True])
def test_fast_equals_plain_within_1e4(pack):
    plain = create_model(siglip_micro(), seed=0).eval()
    quick = fast.enable(copy.deepcopy(plain), pack=pack)
    assert type(quick.text).__name__ == "FastSigLIPText" and type(quick.visual).__name__ == "FastSigLIPVision"
    x, ids = _inputs(5)
    with torch.no_grad():
        for a, b in ((plain.encode_image(x), quick.encode_image(x)), (plain.encode_text(ids), quick.encode_text(ids))):
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    # Training calls (gradients) too.
    plain.train(), quick.train()
    for m in (plain, quick):
        m.zero_grad()
        logits, _ = m(x, ids)
        logits.sum().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), quick.named_parameters()):
        if p.grad is not None:
            assert float((p.grad - q.grad).abs().max()) <= 1e-4 * max(float(p.grad.abs().max()), 1e-6), n
    assert plain.state_dict().keys() == quick.state_dict().keys()


def test_native_round_trip(tmp_path):
    model = create_model(siglip_micro(), seed=1).eval()
    back, _ = clipforge.load(save_model(model, tmp_path / "s.safetensors"), fast=False)
    assert back.config == model.config
    x, ids = _inputs()
    with torch.no_grad():
        assert torch.equal(back.encode_image(x), model.encode_image(x))
        assert torch.equal(back.encode_text(ids), model.encode_text(ids))


def test_openclip_keys_map_both_ways():
    model = create_model(siglip_micro(), seed=2)
    sd = model.state_dict()
    oc = siglip_format.from_native(sd)
    assert siglip_format.is_siglip_layout(oc)
    for key in ("visual.trunk.pos_embed", "visual.trunk.patch_embed.proj.bias", "visual.trunk.blocks.1.attn.qkv.weight",
                "visual.trunk.blocks.0.mlp.fc2.bias", "visual.trunk.norm.weight", "visual.trunk.attn_pool.latent",
                "visual.trunk.attn_pool.kv.weight", "visual.trunk.attn_pool.mlp.fc1.weight", "text.text_projection.bias",
                "text.transformer.resblocks.1.attn.in_proj_weight", "logit_bias"):
        assert key in oc, key
    assert oc["visual.trunk.pos_embed"].shape == (1, 16, 64)
    back = siglip_format.to_native(oc)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    model_cfg = {"embed_dim": 64, "init_logit_bias": -10, "vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224",
                 "timm_pool": "map", "timm_proj": "none", "heads": 4},
                 "text_cfg": {"heads": 4, "no_causal_mask": True, "pool_type": "last", "proj_bias": True,
                              "norm_kwargs": {"eps": 1e-6}}}
    assert siglip_format.is_siglip_model_cfg(model_cfg)
    cfg = siglip_format.config_from_openclip(model_cfg, oc, siglip_micro().preprocess)
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("name", "init_logit_scale")} == \
        {k: v for k, v in siglip_micro().to_dict().items() if k not in ("name", "init_logit_scale")}


@pytest.mark.parametrize("fmt", ["openai", "openclip", "hf"])
def test_clip_layout_writers_refuse_siglip_towers(tmp_path, fmt):
    from clipforge.checkpoints import FORMATS

    model = create_model(dataclasses.replace(siglip_micro(), init_logit_bias=None), seed=0)
    with pytest.raises(ValueError, match="SigLIP towers") as e:
        FORMATS[fmt].write(model, tmp_path / ("m.pt" if fmt == "openai" else "out"))
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_info_describes_siglip_towers(tmp_path, capsys):
    from clipforge.cli.main import main

    path = save_model(create_model(siglip_micro(), seed=0), tmp_path / "s.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SigLIP ViT (attention-pool head)" in out and "bidirectional, last-token pooling" in out
    assert "-10.0 (sigmoid/SigLIP loss)" in out
