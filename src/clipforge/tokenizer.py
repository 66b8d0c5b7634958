"""Byte-level BPE tokenizer identical to OpenAI CLIP's ``SimpleTokenizer``.

Text is fixed with ftfy, HTML-unescaped twice, whitespace-collapsed and lowercased, split with
OpenAI's pre-tokenisation regex, mapped to printable byte symbols and merged with the released
49,152-merge BPE table (shipped as package data, MIT licence, see ``assets/LICENSE-OPENAI-CLIP.txt``).
Ids: 0..48,893 BPE symbols, 49406 ``<|startoftext|>``, 49407 ``<|endoftext|>`` (vocabulary 49,408).
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

import ftfy
import regex as re
import torch

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
_PAT = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    re.IGNORECASE,
)
_WS = re.compile(r"\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode symbols (GPT-2's scheme)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean_text(text: str) -> str:
    """ftfy fix, double HTML unescape, whitespace collapse, lowercase: OpenAI's normalisation."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WS.sub(" ", text).strip().lower()


class Tokenizer:
    """OpenAI CLIP's BPE. Use :func:`get_tokenizer` for the shared, lazily built instance."""

    def __init__(self, bpe_path: str | None = None, context_length: int = 77) -> None:
        if bpe_path is None:
            data = (resources.files("clipforge") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
        else:
            with open(bpe_path, "rb") as f:
                data = f.read()
        merges_text = gzip.decompress(data).decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}  # type: ignore[misc]
        self.sot_token = self.encoder[SOT]
        self.eot_token = self.encoder[EOT]
        self.vocab_size = len(self.encoder)
        self.context_length = context_length
        # Per-word cache of BPE ids: captions reuse a small vocabulary of words.
        self._word_cache: dict[str, list[int]] = {SOT: [self.sot_token], EOT: [self.eot_token]}

    def _bpe(self, token: str) -> list[str]:
        word = [self.byte_encoder[b] for b in token.encode("utf-8")]
        word[-1] = word[-1] + "</w>"
        ranks = self.bpe_ranks
        while len(word) > 1:
            best, best_rank = -1, None
            for i in range(len(word) - 1):
                r = ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best_rank is None:
                break
            first, second = word[best], word[best + 1]
            # Merge every occurrence of the best pair left to right, as OpenAI's loop does.
            merged: list[str] = []
            i = 0
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _word_ids(self, token: str) -> list[int]:
        ids = self._word_cache.get(token)
        if ids is None:
            ids = [self.encoder[t] for t in self._bpe(token)]
            if len(self._word_cache) < 1_000_000:
                self._word_cache[token] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        ids: list[int] = []
        for token in _PAT.findall(clean_text(text)):
            ids.extend(self._word_ids(token))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; start/end/padding ids are dropped, word ends become spaces."""
        toks = [int(i) for i in ids]
        # Padding zeros only follow the end-of-text token; a real id 0 ("!") elsewhere is kept.
        if self.eot_token in toks:
            toks = toks[: toks.index(self.eot_token)]
        text = "".join(self.decoder[i] for i in toks if i not in (self.sot_token, self.eot_token))
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        return self.tokenize(texts, context_length, truncate)

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        """``[N, context_length]`` LongTensor: start token, BPE ids, end token, zero padding.

        A text that does not fit raises ``ValueError`` naming its index and token count, unless
        ``truncate=True`` (then the first tokens are kept and the row still ends with end-of-text).
        """
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text at index {i} is {type(text).__name__}, expected str")
            ids = [self.sot_token, *self.encode(text), self.eot_token]
            if len(ids) > ctx:
                if not truncate:
                    raise ValueError(
                        f"text at index {i} has {len(ids)} tokens (with start/end), more than the "
                        f"context length {ctx}: {text[:60]!r}... Pass truncate=True to cut it."
                    )
                ids = ids[:ctx]
                ids[-1] = self.eot_token
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> Tokenizer:
    """The tokenizer for CLIP's released vocabulary, built once per process (merges load ~0.3 s)."""
    return Tokenizer(context_length=context_length)


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Tokenize one text or a list of texts into a ``[N, context_length]`` LongTensor."""
    return get_tokenizer(context_length).tokenize(texts, context_length, truncate)


def decode(ids: Iterable[int]) -> str:
    """Inverse of :func:`tokenize` for one row (special tokens and padding dropped)."""
    return get_tokenizer().decode(ids)
