"""Tokenizers read from a checkpoint folder, as open_clip's ``HFTokenizer`` makes ids: text
cleaned (``clean``: ``whitespace`` | ``canonicalize`` (SigLIP) | ``lower``), encoded with special
tokens, truncated and padded to the context length (64 for SigLIP).

- ``tokenizer.json`` (Hugging Face ``tokenizers``: XLM-R, Gemma, T5 fast...), through the
  ``tokenizers`` library, with the pad token named in ``tokenizer_config.json``;
- ``spiece.model`` alone (SentencePiece, SigLIP's T5 style): pieces + ``</s>``, pad id 0, through
  ``sentencepiece``.
"""

from __future__ import annotations

import html
import json
import string
from pathlib import Path
from typing import Any, Sequence

import torch

from .deps import require

CLEANS = ("whitespace", "canonicalize", "lower")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
_PUNCT = str.maketrans("", "", string.punctuation)


def clean(text: str, mode: str) -> str:
    """open_clip's cleaning: ftfy + double HTML unescape, whitespace collapsed; ``canonicalize``
    also drops ASCII punctuation ("_" -> " ") and lowercases; ``lower`` lowercases."""
    ftfy = require("ftfy", "text cleaning")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCT).lower()
    elif mode == "lower":
        text = text.lower()
    elif mode != "whitespace":
        raise ValueError(f"tokenizer clean={mode!r} is not one of {', '.join(CLEANS)}")
    return " ".join(text.split()).strip()


class FolderTokenizer:
    """Ids ``[N, context_length]`` from a Hugging Face or SentencePiece tokenizer folder."""

    def __init__(self, folder: str | Path, context_length: int, clean: str = "whitespace",
                 strip_sep_token: bool = False) -> None:
        folder = Path(folder)
        self.folder, self.context_length, self.clean_mode = folder, int(context_length), clean
        self.strip_sep_token = strip_sep_token
        if clean not in CLEANS:
            raise ValueError(f"tokenizer clean={clean!r} is not one of {', '.join(CLEANS)}")
        cfg_path = folder / "tokenizer_config.json"
        self.hf_config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        if (folder / "tokenizer.json").is_file():
            self.kind = "tokenizers"
            tk = require("tokenizers", "a tokenizer.json tokenizer")
            self.tok = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.tok.no_truncation()
            self.tok.no_padding()
            self.pad_id = self._special_id("pad_token", 0)
            self.sep_id = self._special_id("sep_token", None)
        elif (folder / "spiece.model").is_file():
            self.kind = "sentencepiece"
            spm = require("sentencepiece", "a SentencePiece tokenizer")
            self.sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
            self.eos_id = self.sp.eos_id()
            self.sep_id = None
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json or spiece.model (the text tower's tokenizer "
                                    f"must be in the checkpoint folder; clipforge never downloads)")

    def _special_id(self, name: str, default: int | None) -> int | None:
        tok = self.hf_config.get(name)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok is None:
            return default
        i = self.tok.token_to_id(tok)
        if i is None:
            raise ValueError(f"{self.folder / 'tokenizer_config.json'}: {name} {tok!r} is not in tokenizer.json")
        return int(i)

    # --- ids ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after cleaning, special tokens included (no padding, no truncation)."""
        text = clean(text, self.clean_mode)
        if self.kind == "tokenizers":
            return list(self.tok.encode(text).ids)
        return list(self.sp.encode(text)) + [self.eos_id]

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return [len(self.encode(t)) for t in texts]

    def _fit(self, text: str, ctx: int) -> list[int]:
        text = clean(text, self.clean_mode)
        if self.kind == "tokenizers":
            enc = self.tok.encode(text)
            if len(enc.ids) > ctx:  # truncate the content, keep the special tokens (transformers' rule)
                n_special = self.tok.num_special_tokens_to_add(False)
                enc = self.tok.encode(text, add_special_tokens=False)
                enc.truncate(ctx - n_special)
                ids = self.tok.post_process(enc).ids
            else:
                ids = list(enc.ids)
        else:
            ids = list(self.sp.encode(text))[: ctx - 1] + [self.eos_id]
        return ids

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = True) -> torch.Tensor:
        """Texts -> ``LongTensor [N, context_length]`` (right-padded with the pad id). Texts past the
        context are truncated as open_clip's ``HFTokenizer`` does (``truncate=False``: refused)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ctx = int(context_length or self.context_length)
        out = torch.full((len(texts), ctx), int(self.pad_id or 0), dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self._fit(t, ctx)
            if not truncate and len(self.encode(t)) > ctx:
                raise ValueError(f"text {i} has {len(self.encode(t))} tokens > context length {ctx}")
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if self.strip_sep_token and self.sep_id is not None:
            out[out == self.sep_id] = 0
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        return self.tokenize(texts, context_length)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        return self.tok.decode(ids) if self.kind == "tokenizers" else self.sp.decode(ids)


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files present in ``folder`` (copied when a model is saved)."""
    return [n for n in TOKENIZER_FILES if (folder / n).is_file()]
