"""Byte-level BPE tokenizer identical to OpenAI CLIP's ``SimpleTokenizer``.

Text is fixed with ftfy, HTML-unescaped twice, whitespace-collapsed and lowercased, split with
OpenAI's pre-tokenisation regex, mapped to printable byte symbols and merged with the released
49,152-merge BPE table (shipped as package data, MIT licence, see ``assets/LICENSE-OPENAI-CLIP.txt``).
Ids: 0..48,893 BPE symbols, 49406 ``<|startoftext|>``, 49407 ``<|endoftext|>`` (vocabulary 49,408).
"""

from __future__ import annotations

import gzip
import html
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import regex as re
import torch

from .config import get_model_config

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
_PAT = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    re.IGNORECASE,
)
_WS = re.compile(r"\s+")
# Printable ASCII (plus tab/newline) without "&": ftfy.fix_text and html.unescape are provably the
# identity on such text (every ftfy fixer targets non-ASCII, control characters, "\r" or HTML
# entities), so clean_text skips them; they cost ~75% of encoding time on ordinary captions.
_PLAIN = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
_TEXT_CACHE_SIZE = 65_536  # texts remembered per Tokenizer (~20 MB for captions); later ones are not cached


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
    if _PLAIN.fullmatch(text):
        return _WS.sub(" ", text).strip().lower()
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
        # Per-text cache: prompt templates and captions are tokenized again every epoch / eval.
        self._text_cache: dict[str, tuple[int, ...]] = {}

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

    def _encode(self, text: str) -> tuple[int, ...]:
        ids = self._text_cache.get(text)
        if ids is None:
            out: list[int] = []
            for token in _PAT.findall(clean_text(text)):
                out.extend(self._word_ids(token))
            ids = tuple(out)
            if len(self._text_cache) < _TEXT_CACHE_SIZE:
                self._text_cache[text] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, expected str")
        return list(self._encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one row of ids: the framing start/end tokens and padding are dropped.

        Trailing zeros are always padding (a word's last BPE symbol ends in ``</w>``, so id 0,
        a bare "!", cannot end a text). Special tokens inside the row (a literal
        ``<|endoftext|>`` in the input text) are decoded as text, as OpenAI's ``decode`` does.
        """
        toks = [int(i) for i in ids]
        while toks and toks[-1] == 0:
            toks.pop()
        if toks and toks[-1] == self.eot_token:
            toks.pop()
        if toks and toks[0] == self.sot_token:
            toks = toks[1:]
        try:
            text = "".join(self.decoder[i] for i in toks)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is outside the vocabulary (0..{self.vocab_size - 1})") from None
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
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TypeError(f"expected a str or a sequence of str, got {type(texts).__name__}")
        else:
            texts = list(texts)
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text at index {i} is {type(text).__name__}, expected str")
            ids = [self.sot_token, *self._encode(text), self.eot_token]
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


def get_tokenizer(model_name: str | int | None = None, context_length: int | None = None) -> Tokenizer:
    """The tokenizer for CLIP's released vocabulary, shared per context length (merges load ~0.3 s).

    As ``open_clip.get_tokenizer``: ``model_name`` is a zoo or OpenCLIP name (``'ViT-B-32'``) or
    ``'local-dir:PATH'``, and the result is callable, ``tok(texts) -> LongTensor[N, context_length]``
    with the model's context length unless ``context_length`` is given. An int is read as the
    context length (``get_tokenizer(77)``). Unlike open_clip's, a text longer than the context
    raises ``ValueError`` unless called with ``truncate=True``.
    """
    if isinstance(model_name, int):
        context_length = context_length or model_name
    elif model_name:
        context_length = context_length or _model_context_length(model_name)
    return _shared_tokenizer(context_length or 77)


@lru_cache(maxsize=4)
def _shared_tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length=context_length)


def _model_context_length(name: str) -> int:
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]) / "open_clip_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"'{name}': no open_clip_config.json at {path}")
        text_cfg = json.loads(path.read_text(encoding="utf-8")).get("model_cfg", {}).get("text_cfg", {})
        return int(text_cfg.get("context_length", 77))
    return get_model_config(name).text.context_length


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Tokenize one text or a list of texts into a ``[N, context_length]`` LongTensor."""
    return get_tokenizer(context_length).tokenize(texts, context_length, truncate)


def decode(ids: Iterable[int]) -> str:
    """Inverse of :func:`tokenize` for one row (special tokens and padding dropped)."""
    return get_tokenizer().decode(ids)
