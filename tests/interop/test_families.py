"""open_clip's model families in clipforge, against open_clip itself (random weights, no hub).

For each family: open_clip builds the model with random weights, written as a ``local-dir:``
folder (``open_clip_config.json`` + ``open_clip_model.safetensors`` + tokenizer files);
``clipforge.load`` reads it; image and text features agree within 1e-4 of the feature scale, logit
scale and bias are equal, eval preprocessing equals open_clip's on real photos, the tokenizer
gives open_clip's ids, and ``convert --to openclip`` gives a folder open_clip loads with the same
outputs. Tokenizers are tiny ones trained here (the real vocabularies are not available offline).
"""

from __future__ import annotations

import copy
import csv
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")
pytest.importorskip("torchvision")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

import clipforge  # noqa: E402
from clipforge import fast  # noqa: E402
from clipforge.checkpoints import convert, save_model  # noqa: E402
from clipforge.families import FamilyCLIP, FolderTokenizer, tokenizer_for  # noqa: E402
from clipforge.precision import lowest_weight_dtype  # noqa: E402
from clipforge.preprocess import load_image  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

RTOL = 1e-4
TEXTS = ["a photo of a cat", "Two dogs play on the grass.", "an ÉLÉPHANT in the zoo!!", "C'est déjà l'été",
         "&amp; html &lt;b&gt;", "numbers 12345 and 3.14", "  spaced\tout\n", ""]


def corpus() -> list[str]:
    from pathlib import Path

    tsv = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k" / "captions.tsv"
    if tsv.is_file():
        rows = csv.DictReader(open(tsv, encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE)
        return [r["caption"] for r in rows][:4000]
    words = "a the dog cat man woman runs jumps on in grass water red blue two three street ball".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[i] for i in torch.randint(len(words), (8,), generator=g).tolist()) for _ in range(2000)]


def write_tokenizer(folder, style: str) -> None:
    """A tiny trained tokenizer saved as transformers saves one (``tokenizer.json`` + config):
    ``t5``: unigram, ``$A </s>``, pad 0 (SigLIP's); ``xlmr``: BPE, ``<s> $A </s>``, pad 1 (XLM-R's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders

    texts = corpus()
    if style == "t5":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                                               unk_token="<unk>"))
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                    unk_token="<unk>")
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>",
                                                    eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def hf_text_folder(folder) -> str:
    """A small XLM-R config folder (what ``hf_model_name`` points at; no weights, no hub)."""
    cfg = transformers.XLMRobertaConfig(vocab_size=600, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=256, max_position_embeddings=80, pad_token_id=1,
                                        bos_token_id=0, eos_token_id=2)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    return str(folder)


# name -> (open_clip config, tokenizer style or None for OpenAI's BPE)
FAMILIES = {
    "ViT-B-16-SigLIP": "t5", "ViT-B-16-SigLIP2": "t5", "EVA02-B-16": None, "MobileCLIP2-S0": None,
    "convnext_base": None, "coca_ViT-B-32": None, "PE-Core-T-16-384": None, "xlm-roberta-base-ViT-B-32": "xlmr",
}
# Fast enough for the default run on 2 cores; the others are marked slow.
DEFAULT_RUN = {"ViT-B-16-SigLIP", "convnext_base", "xlm-roberta-base-ViT-B-32"}


def model_cfg(name: str, tmp_path) -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    t = cfg["text_cfg"]
    if t.get("hf_model_name"):
        t["hf_model_name"] = hf_text_folder(tmp_path / "xlmr-config")
    return cfg


def open_clip_folder(name: str, tmp_path, seed: int = 0):
    """open_clip's random-weight model of ``name`` written as a local-dir folder -> (folder, model)."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = model_cfg(name, tmp_path)
    style = FAMILIES[name]
    if style:
        write_tokenizer(folder, style)
    torch.manual_seed(seed)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None, pretrained_text=False).eval()
    with torch.no_grad():  # random but non-trivial: logit bias and scale away from their init
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.fill_(-7.25)
        model.logit_scale.fill_(2.5)
    pp = dict(model.visual.preprocess_cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder, model


def flickr_photos(shared_data, n: int = 2):
    """Real Flickr8k photos (from the dev tar) of different aspect ratios."""
    with tarfile.open(shared_data / "flickr8k" / "images_128_dev.tar") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")][:n]
        return [load_image(tf.extractfile(m).read(), m.name) for m in members]


def features(model, images, ids):
    """Unnormalised features (open_clip's CoCa normalises by default; the others and ours do not)."""
    with torch.no_grad():
        return model.encode_image(images, normalize=False), model.encode_text(ids, normalize=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _params(names):
    return [pytest.param(n, marks=() if n in DEFAULT_RUN else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _params(FAMILIES))
def test_family_loads_with_open_clips_outputs(name, tmp_path, shared_data):
    folder, oc = open_clip_folder(name, tmp_path)
    model, preprocess = clipforge.load(folder)
    assert isinstance(model, FamilyCLIP)
    # SigLIP (not SigLIP2: tanh GELU in its text tower) loads on the native towers, fast layer on
    assert (model.native_config is not None) == (name == "ViT-B-16-SigLIP") == fast.is_enabled(model), name
    oc_tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    tok = tokenizer_for(model)
    ids = oc_tok(TEXTS[:2])
    assert torch.equal(tok.tokenize(TEXTS, model.context_length, truncate=True), oc_tok(TEXTS)), name
    pp = json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]
    oc_pre = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    ims = flickr_photos(shared_data)
    for im in ims:  # eval preprocessing: open_clip's (torchvision) transform, equal on real photos
        assert (preprocess(im) - oc_pre(im)).abs().max().item() < 1e-6, name
    images = torch.stack([preprocess(im) for im in ims])
    ci, ct = features(model, images, ids)
    oi, ot = features(oc, images, ids)
    print(f"{name}: image rel {rel(ci, oi):.1e}, text rel {rel(ct, ot):.1e}")
    assert rel(ci, oi) < RTOL and rel(ct, ot) < RTOL, name
    assert model.logit_scale.item() == oc.logit_scale.item()
    ob = getattr(oc, "logit_bias", None)
    assert (model.logit_bias is None) == (ob is None) and (ob is None or model.logit_bias.item() == ob.item())
    with torch.no_grad():  # logits, bias included, as open_clip's get_logits
        cl, _ = model(images, ids)
        ol = oc.get_logits(images, ids)[0] if hasattr(oc, "get_logits") else None
    if ol is not None:
        assert rel(cl, ol) < RTOL

    # our format round trip, then back to open_clip (CoCa: its decoder carried through)
    ours = save_model(model, tmp_path / "ours")
    again, _ = clipforge.load(ours)
    assert rel(features(again, images, ids)[0], oi) < RTOL
    assert torch.equal(tokenizer_for(again).tokenize(TEXTS, again.context_length), oc_tok(TEXTS))
    back = convert(ours, tmp_path / "back", to="openclip")
    oc2 = open_clip.create_model(f"local-dir:{back}", pretrained=None).eval()
    bi, bt = features(oc2, images, ids)
    assert rel(bi, oi) < RTOL and rel(bt, ot) < RTOL, name
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{back}")(TEXTS), oc_tok(TEXTS))
    # bf16 inference: open_clip's cast (matmul weights; a timm / HF tower whole) runs on every family
    low = fast.optimize_for_inference(again, precision="bf16")
    assert lowest_weight_dtype(low) == torch.bfloat16 and low.logit_scale.dtype == torch.float32
    li, lt = (F.normalize(f.float(), dim=-1) for f in features(low, images, ids))
    assert (li * F.normalize(oi, dim=-1)).sum(-1).min() > 0.99 and (lt * F.normalize(ot, dim=-1)).sum(-1).min() > 0.99


@pytest.mark.parametrize("style,clean", [("t5", "canonicalize"), ("xlmr", "whitespace"), ("xlmr", "lower")])
def test_folder_tokenizer_equals_open_clips_hf_tokenizer(style, clean, tmp_path):
    write_tokenizer(tmp_path, style)
    texts = TEXTS + corpus()[::7][:300] + ["word " * 200]
    for ctx in (64, 16):
        theirs = open_clip.tokenizer.HFTokenizer(str(tmp_path), context_length=ctx, clean=clean)
        ours = FolderTokenizer(tmp_path, ctx, clean)
        assert torch.equal(ours(texts), theirs(texts)), (style, clean, ctx)


def test_sentencepiece_model_alone(tmp_path):
    """A folder with only ``spiece.model``: pieces + ``</s>``, truncated before it, padded with 0."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    ours = FolderTokenizer(tmp_path, 12, "canonicalize")
    ids = ours(["A dog runs on the grass.", "word " * 40])
    first = sp.encode("a dog runs on the grass") + [1]
    assert ids[0, : len(first)].tolist() == first and ids[0, len(first):].eq(0).all()
    assert ids[1].tolist() == sp.encode("word " * 40)[:11] + [1]


def test_unknown_hf_model_name_is_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = copy.deepcopy(open_clip.get_model_config("xlm-roberta-base-ViT-B-32"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({"logit_scale": torch.zeros(())}, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="hf_model_name='xlm-roberta-base'"):
        clipforge.load(folder)


def _hf_features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.slow
def test_siglip_to_and_from_hugging_face_siglipmodel(tmp_path, shared_data):
    """open_clip ViT-B-16-SigLIP -> clipforge -> HF SiglipModel folder: transformers gives open_clip's
    features; and a SiglipModel transformers writes loads in clipforge with transformers' features."""
    folder, oc = open_clip_folder("ViT-B-16-SigLIP", tmp_path)
    model, preprocess = clipforge.load(folder)
    images = torch.stack([preprocess(im) for im in flickr_photos(shared_data)])
    ids = tokenizer_for(model)(TEXTS[:2])
    oi, ot = features(oc, images, ids)
    hf_dir = convert(folder, tmp_path / "hf", to="hf")
    hf = transformers.SiglipModel.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        hi = _hf_features(hf.get_image_features(pixel_values=images))
        ht = _hf_features(hf.get_text_features(input_ids=ids))
    print(f"open_clip -> HF SiglipModel: image rel {rel(hi, oi):.1e}, text rel {rel(ht, ot):.1e}")
    assert rel(hi, oi) < RTOL and rel(ht, ot) < RTOL
    assert hf.logit_scale.item() == oc.logit_scale.item() and hf.logit_bias.item() == oc.logit_bias.item()
    assert torch.equal(transformers.AutoTokenizer.from_pretrained(str(hf_dir))(
        [clipforge.families.clean(t, "canonicalize") for t in TEXTS[:2]], padding="max_length", max_length=64,
        truncation=True, return_tensors="pt").input_ids, ids)

    # transformers' own SiglipModel (random weights, exact-GELU vision as timm's) -> clipforge
    theirs_load_with_their_features(transformers.SiglipModel, hf.config, hf_dir, tmp_path, images, ids,
                                     {"pixel_values": images})


def theirs_load_with_their_features(cls, config, hf_dir, tmp_path, images, ids, pixels) -> None:
    """A model transformers makes (``cls(config)``, random, vision GELU exact as timm's), saved with
    ``hf_dir``'s tokenizer and preprocessor files: clipforge loads it with transformers' features
    (``pixels``: the image inputs ``cls`` takes for ``images``)."""
    config.vision_config.hidden_act = "gelu"
    torch.manual_seed(1)
    theirs = cls(config).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / "theirs" / name).write_bytes((hf_dir / name).read_bytes())
    ours, _ = clipforge.load(tmp_path / "theirs")
    with torch.no_grad():
        ti = _hf_features(theirs.get_image_features(**pixels))
        tt = _hf_features(theirs.get_text_features(input_ids=ids))
    ci, ct = features(ours, images, ids)
    print(f"HF {cls.__name__} -> clipforge: image rel {rel(ci, ti):.1e}, text rel {rel(ct, tt):.1e}")
    assert rel(ci, ti) < RTOL and rel(ct, tt) < RTOL


# A small CoCa (open_clip's layout, narrow and shallow so the default run builds it in seconds).
TINY_COCA = {
    "embed_dim": 64, "custom_text": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 4, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                       "attn_pooler_heads": 4},
}


def test_coca_converts_back_with_its_decoder(tmp_path):
    """open_clip CoCa -> clipforge.load -> our format -> convert --to openclip -> open_clip: the
    contrastive features are open_clip's, and the caption decoder, carried unchanged, gives the
    same teacher-forced logits and the same greedy caption as the original."""
    folder = tmp_path / "coca"
    folder.mkdir()
    torch.manual_seed(0)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_COCA}))
    oc = open_clip.create_model(f"local-dir:{folder}", pretrained=None).eval()
    with torch.no_grad():
        oc.logit_scale.fill_(2.5)
        # open_clip's MultimodalTransformer never runs its init_parameters() (which would fail: it
        # reads a missing self.transformer): the decoder's text_projection is torch.empty's memory,
        # NaN in some runs (NaN != NaN broke the equality below). Initialised as that method means to.
        torch.nn.init.normal_(oc.text_decoder.text_projection, std=TINY_COCA["multimodal_cfg"]["width"] ** -0.5)
    assert all(v.isfinite().all() for v in oc.state_dict().values() if v.is_floating_point())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_COCA,
                                                              "preprocess_cfg": dict(oc.visual.preprocess_cfg)}))
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(folder / "open_clip_model.safetensors"))

    model, _ = clipforge.load(folder)
    carried = model.carried()
    assert carried and all(k.startswith("text_decoder.") for k in carried)
    assert all(torch.equal(v, oc.state_dict()[k]) for k, v in carried.items())
    assert not any(k.startswith("text_decoder.") for k, _ in model.named_parameters())  # not trained
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ids = open_clip.get_tokenizer(f"local-dir:{folder}")(["a photo of a cat", "two dogs on the grass"])
    ci, ct = features(model, images, ids)
    oi, ot = features(oc, images, ids)
    assert rel(ci, oi) < RTOL and rel(ct, ot) < RTOL

    ours = save_model(model, tmp_path / "ours")
    back = convert(ours, tmp_path / "back", to="openclip")
    oc2 = open_clip.create_model(f"local-dir:{back}", pretrained=None).eval()
    assert set(oc2.state_dict()) == set(oc.state_dict())
    assert all(torch.equal(oc2.state_dict()[k], v) for k, v in oc.state_dict().items())
    bi, bt = features(oc2, images, ids)
    assert torch.equal(bi, oi) and torch.equal(bt, ot)
    with torch.no_grad():
        want, got = oc(images, ids), oc2(images, ids)
        assert want["logits"].shape == (2, 75, 49408)
        assert torch.equal(got["logits"], want["logits"])
        # greedy captions (open_clip's generate() needs transformers < 5): each step's decoder logits equal
        assert torch.equal(greedy_caption(oc2, images), greedy_caption(oc, images))


def greedy_caption(coca, images, steps: int = 8) -> torch.Tensor:
    """Greedy decoding from the start token -> ids ``[B, 1 + steps]`` (each the argmax of the decoder's
    logits for the next token)."""
    ids = torch.full((images.shape[0], 1), 49406, dtype=torch.long)
    for _ in range(steps):
        logits = coca(images, ids, output_labels=False)["logits"][:, -1]  # [B, V]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def test_coca_without_decoder_weights_is_refused(tmp_path):
    from clipforge.families import FamilyConfig, create_family_model

    model = create_family_model(FamilyConfig(model_cfg=TINY_COCA, preprocess={"image_size": 64}), seed=0)
    with pytest.raises(ValueError, match="no caption decoder weights"):
        clipforge.checkpoints.family.write(model, tmp_path / "out")


def patches(images: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """Images ``[B, 3, S, S]`` as Siglip2Model's NaFlex inputs at the full grid: ``[B, N, p*p*3]`` patches
    (row-major, each ``(row, col, channel)`` as Siglip2ImageProcessor makes them), grid and mask."""
    b, c, s, _ = images.shape
    n = s // p
    x = images.reshape(b, c, n, p, n, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n * n, p * p * c)
    return {"pixel_values": x, "spatial_shapes": torch.tensor([[n, n]] * b),
            "pixel_attention_mask": torch.ones(b, n * n, dtype=torch.long)}


@pytest.mark.slow
def test_siglip2_to_and_from_hugging_face_siglip2model(tmp_path, shared_data):
    """open_clip's ViT-B-16-SigLIP2 (text tower cut to 2 layers and a tiny trained vocabulary) ->
    clipforge -> ``convert --to hf`` (a Siglip2Model folder) -> transformers: open_clip's features
    at the full patch grid; the folder reads back into clipforge; and a Siglip2Model written by
    transformers itself (random, exact-GELU vision as timm's) loads with transformers' features."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16-SigLIP2"))
    cfg["text_cfg"].update(layers=2, vocab_size=400)
    folder = tmp_path / "siglip2"
    folder.mkdir()
    write_tokenizer(folder, "t5")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    oc = open_clip.create_model(f"local-dir:{folder}", pretrained=None).eval()
    with torch.no_grad():
        oc.logit_bias.fill_(-7.25)
        oc.logit_scale.fill_(2.5)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg,
                                                              "preprocess_cfg": dict(oc.visual.preprocess_cfg)}))
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    model, preprocess = clipforge.load(folder)
    images = torch.stack([preprocess(im) for im in flickr_photos(shared_data)])
    ids = tokenizer_for(model)(TEXTS[:2])
    oi, ot = features(oc, images, ids)

    hf_dir = convert(folder, tmp_path / "hf", to="hf")  # SigLIP2 -> Siglip2Model
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "siglip2"
    hf = transformers.Siglip2Model.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        hi = _hf_features(hf.get_image_features(**patches(images, 16)))
        ht = _hf_features(hf.get_text_features(input_ids=ids))
    print(f"open_clip -> HF Siglip2Model: image rel {rel(hi, oi):.1e}, text rel {rel(ht, ot):.1e}")
    assert rel(hi, oi) < RTOL and rel(ht, ot) < RTOL
    assert hf.logit_scale.item() == oc.logit_scale.item() and hf.logit_bias.item() == oc.logit_bias.item()
    back, _ = clipforge.load(hf_dir)  # read back: the same tensors, hence open_clip's features
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert convert(folder, tmp_path / "v1", to="hf-siglip").joinpath("config.json").read_text().count('"siglip"') == 1

    theirs_load_with_their_features(transformers.Siglip2Model, hf.config, hf_dir, tmp_path, images, ids,
                                     patches(images, 16))
