"""Training a family model (``clipforge train --init FOLDER``) feeds its text tower the ids of the
folder's own tokenizer (here a tiny SentencePiece model trained in the test), not OpenAI's BPE."""

from __future__ import annotations

import io
import json

import pytest
import torch
from training.helpers_train import WORDS
from safetensors.torch import save_file

import clipforge
from clipforge.families import FamilyCLIP, FamilyConfig, FolderTokenizer, create_family_model, tokenizer_for
from clipforge.training import TrainConfig, train
from clipforge.training.loop import TokenizeCaptions

spm = pytest.importorskip("sentencepiece")

VOCAB = 64
MODEL_CFG = {
    "embed_dim": 32, "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 1,
                 "no_causal_mask": True, "pool_type": "last", "proj_bias": True,
                 "hf_tokenizer_name": "local-dir", "tokenizer_kwargs": {"clean": "canonicalize"}},
}


def family_folder(folder) -> None:
    """An open_clip local-dir folder: random weights, and a SentencePiece model trained on scene words."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=g)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB - 8,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    model = create_family_model(FamilyConfig(model_cfg=MODEL_CFG, preprocess={"image_size": 32}), seed=0)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def test_training_a_family_model_uses_the_folder_tokenizer(tmp_path, monkeypatch):
    family_folder(tmp_path / "fam")
    batches: list[tuple[list[str], torch.Tensor]] = []
    fed: list[torch.Tensor] = []
    tokenize, encode_text = TokenizeCaptions.__call__, FamilyCLIP.encode_text

    def spy_tokenize(self, texts):
        ids = tokenize(self, texts)
        batches.append((list(texts), ids))
        return ids

    def spy_encode(self, ids, normalize=False):
        if self.training:
            fed.append(ids.detach().clone())
        return encode_text(self, ids, normalize)

    monkeypatch.setattr(TokenizeCaptions, "__call__", spy_tokenize)
    monkeypatch.setattr(FamilyCLIP, "encode_text", spy_encode)
    train(TrainConfig(init=str(tmp_path / "fam"), data="builtin:scenes?n=16&size=32", steps=1, batch_size=8,
                      num_workers=0, out=str(tmp_path / "run"), save_every=0, log_every=1, progress=False,
                      threads=1, eval_every=0))
    assert batches and fed
    folder_tok = FolderTokenizer(tmp_path / "fam", 16, "canonicalize")
    for texts, ids in batches:  # the loader's ids are the folder tokenizer's, not OpenAI's BPE
        assert torch.equal(ids, folder_tok.tokenize(texts, 16, truncate=True))
        assert int(ids.max()) < VOCAB and (ids == folder_tok.eos_id).any(dim=1).all()
    assert all(any(torch.equal(f, ids) for _, ids in batches) for f in fed)  # and what the text tower got
    trained, _ = clipforge.load(tmp_path / "run" / "final")  # saved as a folder, its tokenizer beside it
    assert torch.equal(tokenizer_for(trained)(["red circle"]), folder_tok(["red circle"]))
