"""Family models (open_clip's configs beyond OpenAI's CLIP) in the main environment: the towers
that need no timm (open_clip's ViT, its text-Transformer variants, a Hugging Face text tower) load
from an open_clip folder, round-trip through our format, and run through the callers (embed,
load_for_inference, info); a timm tower without timm is refused in one line naming the extra.
Parity with open_clip itself: tests/interop/test_families.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

import clipforge
from clipforge.checkpoints import convert, load_model, save_model
from clipforge.checkpoints.family import needs_family, to_native
from clipforge.cli.main import main as cli_main
from clipforge.families import FamilyCLIP, FamilyConfig, create_family_model, tokenizer_for
from clipforge.inference import embed_texts
from clipforge.loading import load_for_inference
from safetensors.torch import save_file

TINY = {
    "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                 "act_kwargs": {"approximate": "tanh"}},
}


def write_folder(folder, model_cfg, sd, preprocess=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                              "preprocess_cfg": preprocess or {}}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "open_clip_model.safetensors"))


def _inputs(size=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=g), clipforge.tokenize(["a dog", "two red circles"], 16)


def test_family_folder_loads_and_round_trips(tmp_path):
    ref = create_family_model(FamilyConfig(model_cfg=TINY, preprocess={"image_size": 32}), seed=0).eval()
    with torch.no_grad():
        ref.logit_bias.fill_(-3.5)
    write_folder(tmp_path / "oc", TINY, ref.state_dict(), {"mean": [0.5] * 3, "std": [0.5] * 3,
                                                           "interpolation": "bilinear", "resize_mode": "squash"})
    model, pre = clipforge.load(tmp_path / "oc")
    assert isinstance(model, FamilyCLIP) and model.context_length == 16 and model.image_size == 32
    p = model.config.preprocess
    assert p.mean == (0.5,) * 3 and p.interpolation == "bilinear" and p.resize_mode == "squash"
    images, ids = _inputs()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref.encode_image(images))
        assert torch.equal(model.encode_text(ids), ref.encode_text(ids))
        logits, _ = model(images, ids)
        cos = model.encode_image(images, normalize=True) @ model.encode_text(ids, normalize=True).T
        assert torch.allclose(logits, model.logit_scale.exp() * cos - 3.5, atol=1e-5)
    again, info = load_model(save_model(model, tmp_path / "ours"), return_info=True)
    assert info.format == "clipforge" and again.config.to_dict() == model.config.to_dict()
    assert again.logit_bias.item() == -3.5
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids), ref.encode_text(ids))
    fast, _ = load_for_inference(tmp_path / "ours", precision="fp32")
    emb = embed_texts(fast, ["a dog", "two red circles"])
    assert torch.allclose(emb, ref.encode_text(ids, normalize=True), atol=1e-6)


def test_text_tower_variants_differ_as_configured():
    """Each option changes the computation (so a parity test could not pass by ignoring it)."""
    base = create_family_model(FamilyConfig(model_cfg=TINY, preprocess={"image_size": 32}), seed=0).eval()
    _, ids = _inputs()
    sd = base.state_dict()
    for key, val in (("no_causal_mask", False), ("pool_type", "argmax"), ("act_kwargs", None),
                     ("norm_kwargs", None)):
        cfg = json.loads(json.dumps(TINY))
        cfg["text_cfg"][key] = val
        other = create_family_model(FamilyConfig(model_cfg=cfg, preprocess={"image_size": 32})).eval()
        other.load_state_dict(sd)
        with torch.no_grad():
            assert not torch.allclose(other.encode_text(ids), base.encode_text(ids), atol=1e-6), key


def test_plain_clip_text_keys_and_coca_decoder():
    sd = {"visual.proj": torch.zeros(1), "token_embedding.weight": torch.zeros(1), "logit_scale": torch.zeros(()),
          "text_decoder.x": torch.zeros(1)}
    assert sorted(to_native(sd)) == ["logit_scale", "text.token_embedding.weight", "text_decoder.x", "visual.proj"]
    assert needs_family(TINY) and needs_family({"embed_dim": 8, "vision_cfg": {"timm_model_name": "convnext_base"},
                                                "text_cfg": {}})
    assert not needs_family({"embed_dim": 512, "vision_cfg": {"layers": 12, "width": 768, "patch_size": 32},
                             "text_cfg": {"layers": 12}})


def test_coca_decoder_is_carried_through_load_save_and_convert(tmp_path):
    """CoCa's caption decoder is not built, but its tensors (any names under ``text_decoder.``) ride
    along as buffers: our format and ``convert --to openclip`` write them back bit for bit."""
    cfg = {"embed_dim": 32, "custom_text": True,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16,
                          "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 1,
                        "embed_cls": True},
           "multimodal_cfg": {"context_length": 16, "width": 48, "heads": 4, "layers": 1}}
    ref = create_family_model(FamilyConfig(model_cfg=cfg, preprocess={"image_size": 32}), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    decoder = {"text_decoder.resblocks.0.attn.in_proj_weight": torch.randn(144, 48, generator=g),
               "text_decoder.ln_final.bias": torch.randn(48, generator=g),
               "text_decoder.text_projection": torch.randn(48, 300, generator=g)}
    write_folder(tmp_path / "oc", cfg, {**ref.state_dict(), **decoder})
    model, _ = clipforge.load(tmp_path / "oc")
    assert set(model.carried()) == set(decoder) and all(torch.equal(model.carried()[k], v) for k, v in decoder.items())
    assert not any(n.startswith("text_decoder") for n, _ in model.named_parameters())
    images, ids = _inputs()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref.encode_image(images))
    back = convert(save_model(model, tmp_path / "ours"), tmp_path / "back", to="openclip")
    from safetensors.torch import load_file

    written = load_file(str(back / "open_clip_model.safetensors"))
    assert set(written) == set(ref.state_dict()) | set(decoder)
    assert all(torch.equal(written[k], v) for k, v in decoder.items())
    assert "multimodal_cfg" in json.loads((back / "open_clip_config.json").read_text())["model_cfg"]
    with pytest.raises(ValueError, match="no caption decoder weights"):  # random init: nothing to carry
        convert(save_model(ref, tmp_path / "fresh"), tmp_path / "fresh_oc", to="openclip")


def test_hf_text_tower_from_a_local_config_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "xlmr"
    transformers.XLMRobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40, pad_token_id=1).save_pretrained(hf)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 16},
           "text_cfg": {"hf_model_name": str(hf), "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"}}
    fc = FamilyConfig(model_cfg=cfg, preprocess={"image_size": 32},
                      hf_text_config=json.loads((hf / "config.json").read_text()))
    ref = create_family_model(fc, seed=0).eval()
    write_folder(tmp_path / "oc", cfg, ref.state_dict())
    model, _ = clipforge.load(tmp_path / "oc")
    ids = torch.tensor([[0, 5, 9, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), ref.encode_text(ids))
    saved = save_model(model, tmp_path / "ours")  # the HF config travels in our config.json
    assert json.loads((saved / "config.json").read_text())["hf_text_config"]["model_type"] == "xlm-roberta"
    cfg["text_cfg"]["hf_model_name"] = "xlm-roberta-base"  # a hub name: never fetched, named in one line
    write_folder(tmp_path / "hub", cfg, ref.state_dict())
    with pytest.raises(FileNotFoundError, match="hf_model_name='xlm-roberta-base'.*never downloads"):
        clipforge.load(tmp_path / "hub")


def test_family_tokenizer_needs_its_files(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["text_cfg"].update(hf_tokenizer_name="timm/ViT-B-16-SigLIP", tokenizer_kwargs={"clean": "canonicalize"})
    ref = create_family_model(FamilyConfig(model_cfg=TINY, preprocess={"image_size": 32}), seed=0)
    write_folder(tmp_path, cfg, ref.state_dict())
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or spiece.model"):
        clipforge.load(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_timm_tower_without_timm_is_one_line(tmp_path, capsys):
    cfg = {"embed_dim": 8, "vision_cfg": {"timm_model_name": "convnext_base", "image_size": 224},
           "text_cfg": {"layers": 1, "width": 8, "heads": 1}}
    write_folder(tmp_path, cfg, {"logit_scale": torch.zeros(())})
    assert cli_main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "clipforge"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'clipforge[families]'" in err and "timm" in err


def test_unrecognised_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Foo"], "hidden": 3}))
    save_file({"text.a": torch.zeros(1), "visual.b": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not one clipforge recognises"):
        clipforge.load(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="not a checkpoint clipforge recognises"):
        clipforge.load(tmp_path)


def test_info_describes_a_family_folder(tmp_path, capsys):
    ref = create_family_model(FamilyConfig(model_cfg=TINY, preprocess={"image_size": 32}), seed=0)
    write_folder(tmp_path, TINY, ref.state_dict())
    assert cli_main(["info", str(tmp_path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["format"] == "openclip-family" and rec["logit_bias"] == -10.0
    assert rec["parameters"]["total"] == sum(v.numel() for v in ref.state_dict().values())


def tiny_hf_state_dict(config_cls, model_cls, **vision) -> dict[str, torch.Tensor]:
    """The random weights of a tiny transformers SiglipModel / Siglip2Model (``vision``: its grid)."""
    cfg = config_cls(text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=8),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, patch_size=16, **vision))
    torch.manual_seed(0)
    return model_cls(cfg).state_dict()


def test_hf_siglip_key_mapping_round_trips():
    """HF SiglipModel <-> our keys is tensor surgery only: both ways give back every tensor exactly,
    and a weight the mapping does not know is refused, not dropped."""
    transformers = pytest.importorskip("transformers")
    from clipforge.checkpoints import hf_siglip

    sd = tiny_hf_state_dict(transformers.SiglipConfig, transformers.SiglipModel, image_size=32)
    ours = hf_siglip.to_native(sd)
    assert "visual.trunk.attn_pool.kv.weight" in ours and ours["logit_bias"].shape == ()
    back = hf_siglip.from_native(ours)
    assert set(back) == {k for k in sd if not k.endswith("position_ids")}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    with pytest.raises(ValueError, match="does not map"):
        hf_siglip.to_native({**sd, "vision_model.extra.weight": torch.zeros(1)})


def test_hf_siglip2_key_mapping_round_trips():
    """Siglip2Model's keys are SiglipModel's with the patch embedding as a Linear over (row, col,
    channel) patches: both ways give back every tensor exactly."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Siglip2Config"):
        pytest.skip("this transformers has no Siglip2Model")
    from clipforge.checkpoints import hf_siglip2

    sd = tiny_hf_state_dict(transformers.Siglip2Config, transformers.Siglip2Model, num_patches=4)
    ours = hf_siglip2.to_native(sd)
    conv = ours["visual.trunk.patch_embed.proj.weight"]
    assert conv.shape == (32, 3, 16, 16)
    x = torch.randn(1, 3, 16, 16)  # one patch: the convolution equals the Linear over HF's patch layout
    want = sd["vision_model.embeddings.patch_embedding.weight"] @ x.permute(0, 2, 3, 1).reshape(-1)
    assert torch.allclose(torch.nn.functional.conv2d(x, conv).reshape(-1), want, atol=1e-5)
    back = hf_siglip2.from_native(ours)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in back)


def test_families_without_a_hugging_face_class_are_refused_in_one_line(tmp_path):
    ref = create_family_model(FamilyConfig(model_cfg=TINY, preprocess={"image_size": 32}), seed=0)
    write_folder(tmp_path / "oc", TINY, ref.state_dict())
    for to in ("hf", "hf-siglip", "hf-siglip2"):
        with pytest.raises(ValueError, match=r"SigLIP \(SiglipModel\) and SigLIP2 \(Siglip2Model\)") as e:
            convert(tmp_path / "oc", tmp_path / "hf", to=to)
        assert "\n" not in str(e.value)


SIGLIP = {"embed_dim": 768, "init_logit_bias": -10, "custom_text": True,
          "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224",
                         "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                       "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}}


@pytest.mark.slow  # ViT-B/16 at 224 px built three times: ~30 s alone, more on a loaded machine
def test_siglip_folder_loads_on_the_native_towers_without_timm(tmp_path):
    """An open_clip SigLIP folder (timm's ViT-B/16 SigLIP under ``visual.trunk.``) is built on the
    native towers: no timm needed, clipforge's fast layer on, outputs the plain towers' (1e-4), and
    ``convert --to openclip`` writes timm's keys back bit for bit."""
    from safetensors.torch import load_file

    from clipforge import fast
    from clipforge.checkpoints.family import openclip_state_dict
    from clipforge.families.native_siglip import native_siglip_config
    from clipforge.models.siglip import SigLIPVisionTransformer

    ref = create_family_model(FamilyConfig(model_cfg=SIGLIP, preprocess={"image_size": 224}), seed=0).eval()
    assert isinstance(ref.visual, SigLIPVisionTransformer) and not fast.is_enabled(ref)
    sd = openclip_state_dict(ref)
    assert "visual.trunk.attn_pool.latent" in sd and "visual.trunk.blocks.11.attn.qkv.weight" in sd
    write_folder(tmp_path / "oc", SIGLIP, sd)
    model, _ = clipforge.load(tmp_path / "oc")
    assert model.native_config is not None and fast.is_enabled(model)
    g = torch.Generator().manual_seed(0)
    images, ids = torch.randn(2, 3, 224, 224, generator=g), clipforge.tokenize(["a dog", "two red circles"], 16)
    with torch.no_grad():
        for ours, want in ((model.encode_image(images), ref.encode_image(images)),
                           (model.encode_text(ids), ref.encode_text(ids))):
            assert ((ours - want).abs().max() / want.abs().max()).item() < 1e-4
    back = convert(tmp_path / "oc", tmp_path / "back", to="openclip")
    written = load_file(str(back / "open_clip_model.safetensors"))
    assert set(written) == set(sd) and all(torch.equal(written[k], v) for k, v in sd.items())
    # what the native towers do not compute exactly stays on timm: SigLIP2's tanh text GELU, other eps
    for key, val in (("act_kwargs", {"approximate": "tanh"}), ("norm_kwargs", {"eps": 1e-5})):
        cfg = json.loads(json.dumps(SIGLIP))
        cfg["text_cfg"][key] = val
        assert native_siglip_config(FamilyConfig(model_cfg=cfg, preprocess={"image_size": 224})) is None, key


def test_zoo_siglip_is_open_clips_architecture_on_the_native_towers():
    """``ViT-B-16-SigLIP`` in the zoo: open_clip's ViT-B-16-SigLIP as the native towers compute it,
    with OpenAI's BPE (49408 ids; open_clip's release has a 32000-piece SentencePiece vocabulary,
    which loads from its folder) so that random init and training work like any zoo name."""
    from clipforge.families.native_siglip import native_siglip_config
    from clipforge.models.siglip import SigLIPTextTransformer, SigLIPVisionTransformer
    from clipforge.training.loop import TokenizeCaptions

    oc = json.loads(json.dumps(SIGLIP))  # open_clip's ViT-B-16-SigLIP model_cfg
    oc["text_cfg"].update(context_length=64, vocab_size=32000, width=768, heads=12, layers=12,
                          hf_tokenizer_name="timm/ViT-B-16-SigLIP", tokenizer_kwargs={"clean": "canonicalize"})
    native = native_siglip_config(FamilyConfig(model_cfg=oc, preprocess={"image_size": 224}))
    zoo = clipforge.get_model_config("ViT-B-16-SigLIP")
    assert zoo.vision == native.vision and zoo.embed_dim == native.embed_dim == 768
    assert dataclasses.replace(zoo.text, vocab_size=32000) == native.text and zoo.text.vocab_size == 49408
    assert (zoo.activation, zoo.norm_eps, zoo.init_logit_bias) == ("gelu", 1e-6, -10.0)
    assert zoo.preprocess.mean == (0.5,) * 3 and zoo.preprocess.resize_mode == "squash"
    with torch.device("meta"):
        model = clipforge.create_model("ViT-B-16-SigLIP")
    assert isinstance(model.visual, SigLIPVisionTransformer) and isinstance(model.text, SigLIPTextTransformer)
    assert TokenizeCaptions.for_model(model) == TokenizeCaptions(64)  # training: OpenAI's BPE at context 64


def test_bf16_casts_family_towers_as_open_clip_and_they_run(tmp_path):
    """``bf16`` (training and inference alike): our towers cast their matmul weights and keep
    LayerNorm and embeddings float32; a Hugging Face tower is cast whole. Every tower runs in it,
    forward and backward, and stays close to float32."""
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "xlmr"
    transformers.XLMRobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40, pad_token_id=1).save_pretrained(hf)
    coca = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "attentional_pool": True, "attn_pooler_queries": 4,
                                   "attn_pooler_heads": 2}, "text_cfg": {**TINY["text_cfg"], "embed_cls": True}}
    hf_cfg = {"embed_dim": 16, "vision_cfg": TINY["vision_cfg"],
              "text_cfg": {"hf_model_name": str(hf), "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"}}
    configs = [FamilyConfig(model_cfg=TINY, preprocess={"image_size": 32}),
               FamilyConfig(model_cfg=coca, preprocess={"image_size": 32}),
               FamilyConfig(model_cfg=hf_cfg, preprocess={"image_size": 32},
                            hf_text_config=json.loads((hf / "config.json").read_text()))]
    images, _ = _inputs()
    ids = torch.tensor([[0, 5, 9, 2] + [1] * 12, [0, 7, 2, 1] + [1] * 12])
    for i, fc in enumerate(configs):
        ref = create_family_model(fc, seed=0).eval()
        model = clipforge.precision.cast_weights(create_family_model(fc, seed=0).eval(), "bf16")
        dtypes = {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point()}
        assert dtypes["logit_scale"] == dtypes["visual.ln_pre.weight"] == torch.float32
        assert dtypes["visual.conv1.weight"] == torch.bfloat16
        if "hf_model_name" in fc.model_cfg["text_cfg"]:
            assert {dtypes[k] for k in dtypes if k.startswith("text.")} == {torch.bfloat16}  # cast whole
        else:
            assert dtypes["text.token_embedding.weight"] == dtypes["text.ln_final.weight"] == torch.float32
            assert dtypes["text.transformer.resblocks.0.mlp.c_fc.weight"] == torch.bfloat16
        for got, want in [(model.encode_image(images, normalize=True), ref.encode_image(images, normalize=True)),
                          (model.encode_text(ids, normalize=True), ref.encode_text(ids, normalize=True))]:
            assert got.dtype == torch.bfloat16 and (got.float() * want).sum(-1).min() > 0.99
        logits, _ = model.train()(images, ids)
        logits.float().sum().backward()  # training in bf16 reaches every trainable weight
        assert all(p.grad is not None for p in model.visual.parameters() if p.requires_grad)
        inferred = load_for_inference(save_model(ref, tmp_path / f"m{i}"), precision="bf16")[0]
        assert {k: v.dtype for k, v in inferred.state_dict().items() if v.is_floating_point()} == dtypes
