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
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal, overload

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

# What to do with a text longer than the context (see :func:`tokenize`): "error" is OpenAI's behaviour.
LONG_TEXT_MODES = ("error", "truncate", "chunks")
LongTextMode = Literal["error", "truncate", "chunks"]
DEFAULT_OVERLAP = 16  # tokens shared by consecutive windows of long_text="chunks" (~20% of a 75-token window)


class LongTextWarning(UserWarning):
    """Texts were cut to the context (``long_text="truncate"``). ``cut`` maps each cut text's index
    to its full token count (with start/end), so callers can see how much was dropped."""

    def __init__(self, message: str, cut: dict[int, int], context_length: int) -> None:
        super().__init__(message)
        self.cut = cut
        self.context_length = context_length


@dataclass(frozen=True)
class TextWindows:
    """Texts cut into context-sized windows at word boundaries (``long_text="chunks"``).

    A text that fits is one window holding the text unchanged, so its row equals plain
    :func:`tokenize`'s. A longer text becomes several windows of whole words (start and end tokens
    included, at most ``context_length`` tokens) where consecutive windows share up to ``overlap``
    tokens of words; only a single word longer than a window is cut inside (at BPE tokens).
    """

    texts: list[str]             # [M] the text of each window
    ids: torch.Tensor            # [M, context_length] LongTensor, tokenize(texts) of the windows
    text_index: torch.Tensor     # [M] LongTensor: the input text each window belongs to (non-decreasing)
    lengths: torch.Tensor        # [M] LongTensor: tokens in each window without start/end (pooling weights)
    num_texts: int

    @property
    def windows_per_text(self) -> torch.Tensor:
        """``[num_texts]`` number of windows of each input text."""
        return torch.bincount(self.text_index, minlength=self.num_texts)


def check_long_text(long_text: str, overlap: int = DEFAULT_OVERLAP, context_length: int = 77) -> None:
    """Refuse an unknown mode or (for ``"chunks"``) an overlap that leaves windows no room to advance."""
    if long_text not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {', '.join(LONG_TEXT_MODES)}, got {long_text!r}")
    if long_text != "chunks":
        return
    if context_length < 3:
        raise ValueError(f"long_text='chunks' needs a context of at least 3 tokens, got {context_length}")
    most = (context_length - 2) // 2
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= most:
        raise ValueError(f"overlap must be an integer in 0..{most} (half a {context_length - 2}-token window), "
                         f"got {overlap!r}")


def plan_windows(lengths: Sequence[int], capacity: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges over units of ``lengths`` tokens (each <= ``capacity``): greedy
    windows of at most ``capacity`` tokens; the next window starts at the earliest unit after the
    current start from which the tail of the current window holds <= ``overlap`` tokens."""
    n = len(lengths)
    out: list[tuple[int, int]] = []
    s = 0
    while True:
        e, total = s, 0
        while e < n and total + lengths[e] <= capacity:
            total += lengths[e]
            e += 1
        out.append((s, e))
        if e >= n:
            return out
        s2, back = e, 0
        while s2 - 1 > s and back + lengths[s2 - 1] <= overlap:
            s2 -= 1
            back += lengths[s2]
        s = s2


def truncation_warning(counts: Sequence[int], context_length: int, shown: int = 3) -> LongTextWarning | None:
    """The :class:`LongTextWarning` for texts of ``counts`` tokens (with start/end) cut to the
    context, or ``None`` when every text fits."""
    cut = {i: int(n) for i, n in enumerate(counts) if n > context_length}
    if not cut:
        return None
    items = list(cut.items())
    detail = ", ".join(f"text {i}: {n} tokens, {n - context_length} cut" for i, n in items[:shown])
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    dropped = sum(n - context_length for n in cut.values())
    return LongTextWarning(
        f"long_text='truncate': {len(cut)} of {len(counts)} texts are longer than the context length "
        f"{context_length} and were cut to their first {context_length} tokens ({dropped} tokens dropped; "
        f"{detail}{more}); long_text='chunks' keeps all of them", cut, context_length)


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

    def word_ids(self, text: str) -> list[tuple[str, list[int]]]:
        """``(word, its BPE ids)`` for each whitespace-separated word of the cleaned text; the ids
        concatenate to :meth:`encode`'s (pre-tokens never span whitespace, and BPE runs per pre-token)."""
        cleaned = clean_text(text)
        return [(w, [i for t in _PAT.findall(w) for i in self._word_ids(t)]) for w in cleaned.split(" ") if w]

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text including the start and end tokens (what must fit the context)."""
        return [len(self._encode(t)) + 2 for t in texts]

    def windows(self, texts: str | Sequence[str], context_length: int | None = None,
                overlap: int = DEFAULT_OVERLAP) -> TextWindows:
        """Cut each text into windows of whole words that fit the context (see :class:`TextWindows`)."""
        texts = self._as_list(texts)
        ctx = context_length or self.context_length
        check_long_text("chunks", overlap, ctx)
        capacity = ctx - 2
        win_texts: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            if len(self._encode(text)) <= capacity:
                win_texts.append(text)
                owner.append(i)
                continue
            units: list[tuple[str, list[int]]] = []
            for word, ids in self.word_ids(text):
                if len(ids) <= capacity:
                    units.append((word, ids))
                else:  # one word longer than a window (a URL, a hash): cut at BPE tokens
                    units.extend((self.decode(ids[j:j + capacity]).replace(" ", ""), ids[j:j + capacity])
                                 for j in range(0, len(ids), capacity))
            for s, e in plan_windows([len(u[1]) for u in units], capacity, overlap):
                win_texts.append(" ".join(u[0] for u in units[s:e]))
                owner.append(i)
        ids = self.tokenize(win_texts, ctx, truncate=True)
        lengths = ids.argmax(dim=-1) - 1  # the end token has the largest id (id 0, "!", may occur inside)
        return TextWindows(win_texts, ids, torch.tensor(owner, dtype=torch.long), lengths, len(texts))

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

    @staticmethod
    def _as_list(texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TypeError(f"expected a str or a sequence of str, got {type(texts).__name__}")
        out = list(texts)
        for i, text in enumerate(out):
            if not isinstance(text, str):
                raise TypeError(f"text at index {i} is {type(text).__name__}, expected str")
        return out

    @overload
    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False, *,
                 long_text: Literal["error", "truncate"] | None = None,
                 overlap: int = DEFAULT_OVERLAP) -> torch.Tensor: ...

    @overload
    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False, *,
                 long_text: Literal["chunks"], overlap: int = DEFAULT_OVERLAP) -> TextWindows: ...

    @overload
    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False, *,
                 long_text: str | None = None, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor | TextWindows: ...

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False, *,
                 long_text: str | None = None, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor | TextWindows:
        """``[N, context_length]`` LongTensor: start token, BPE ids, end token, zero padding.

        A text that does not fit: ``long_text="error"`` (the default, OpenAI's behaviour) raises
        ``ValueError`` naming its index and token count; ``"truncate"`` keeps the first tokens (the
        row still ends with end-of-text) and warns a :class:`LongTextWarning` with the counts;
        ``"chunks"`` returns :class:`TextWindows` instead of a tensor (windows of whole words,
        consecutive ones sharing up to ``overlap`` tokens). ``truncate=True`` is OpenAI's spelling
        of a silent ``"truncate"``.
        """
        ctx = context_length or self.context_length
        if long_text is None:
            long_text = "truncate" if truncate else "error"
        elif truncate and long_text != "truncate":
            raise ValueError(f"truncate=True contradicts long_text={long_text!r}: pass one of them")
        check_long_text(long_text, overlap, ctx)
        if long_text == "chunks":
            return self.windows(texts, ctx, overlap)
        texts = self._as_list(texts)
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        counts: list[int] = []
        for i, text in enumerate(texts):
            ids = [self.sot_token, *self._encode(text), self.eot_token]
            counts.append(len(ids))
            if len(ids) > ctx:
                if long_text == "error":
                    raise ValueError(
                        f"text at index {i} has {len(ids)} tokens (with start/end), more than the "
                        f"context length {ctx}: {text[:60]!r}... Pass long_text='truncate' to cut it "
                        f"or 'chunks' to encode it in windows (truncate=True: cut silently)."
                    )
                ids = ids[:ctx]
                ids[-1] = self.eot_token
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if long_text == "truncate" and not truncate:
            w = truncation_warning(counts, ctx)
            if w is not None:
                warnings.warn(w, stacklevel=2)
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


@overload
def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False, *,
             long_text: Literal["error", "truncate"] | None = None, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor: ...


@overload
def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False, *,
             long_text: Literal["chunks"], overlap: int = DEFAULT_OVERLAP) -> TextWindows: ...


@overload
def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False, *,
             long_text: str | None = None, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor | TextWindows: ...


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False, *,
             long_text: str | None = None, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor | TextWindows:
    """Tokenize one text or a list of texts into a ``[N, context_length]`` LongTensor.

    ``long_text`` decides what happens to a text longer than the context: ``"error"`` (default,
    as OpenAI's), ``"truncate"`` (cut, with a :class:`LongTextWarning` giving the counts) or
    ``"chunks"`` (a :class:`TextWindows` of word-boundary windows); see :meth:`Tokenizer.tokenize`.
    """
    return get_tokenizer(context_length).tokenize(texts, context_length, truncate, long_text=long_text,
                                                  overlap=overlap)


def decode(ids: Iterable[int]) -> str:
    """Inverse of :func:`tokenize` for one row (special tokens and padding dropped)."""
    return get_tokenizer().decode(ids)
