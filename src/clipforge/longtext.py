"""Embedding text longer than CLIP's context (77 tokens), by one of three stated strategies.

``error``: refuse, naming the text and its length (OpenAI's behaviour). ``truncate``: keep the
first 77 tokens and warn how much was cut (what open_clip does silently); a detail after the cut
is lost. ``chunks``: cut the text into windows of whole words that fit the context (consecutive
windows share up to ``overlap`` tokens), encode each window and average the unit-norm window
embeddings weighted by their token counts, then renormalise: every word reaches the embedding,
at the price of one text-tower pass per window. A text that fits is encoded exactly as plainly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .families import tokenizer_for
from .inference import embed_texts
from .models import CLIP
from .tokenizer import (
    DEFAULT_OVERLAP,
    TextWindows,
    check_long_text,
    truncation_warning,
)


def pool_windows(window_embeddings: torch.Tensor, windows: TextWindows) -> torch.Tensor:
    """``[num_texts, D]``: per text, the token-count-weighted mean of its unit-norm window
    embeddings, renormalised. A text with one window keeps that window's embedding unchanged."""
    if len(window_embeddings) != len(windows.texts):
        raise ValueError(f"{len(window_embeddings)} window embeddings for {len(windows.texts)} windows")
    emb = window_embeddings.float()
    w = windows.lengths.clamp(min=1).to(emb.dtype)  # an empty text is one window of 0 tokens
    summed = torch.zeros(windows.num_texts, emb.shape[1], dtype=emb.dtype)
    summed.index_add_(0, windows.text_index, F.normalize(emb, dim=-1) * w[:, None])
    out = F.normalize(summed, dim=-1)
    single = windows.windows_per_text == 1
    if single.any():  # exactly the plain encoding, not a renormalised copy of it
        first = torch.searchsorted(windows.text_index, torch.arange(windows.num_texts))
        out[single] = emb[first[single]]
    return out


def encode_text_long(model: CLIP, texts: Sequence[str], *, long_text: str = "chunks",
                     overlap: int = DEFAULT_OVERLAP, batch_size: int = 256,
                     progress: bool = False) -> torch.Tensor:
    """``[N, D]`` L2-normalised float32 embeddings of ``texts`` whatever their length, by the
    ``long_text`` strategy (module docstring); ``overlap``: tokens shared by consecutive windows."""
    ctx = int(model.context_length)
    check_long_text(long_text, overlap, ctx)
    texts = list(texts)
    tok = tokenizer_for(model)
    if long_text == "chunks" and not hasattr(tok, "windows"):
        raise ValueError("long_text 'chunks' needs OpenAI's BPE tokenizer; this model has its own: use 'truncate'")
    if long_text == "error":
        return embed_texts(model, texts, batch_size=batch_size, progress=progress, truncate=False)
    if long_text == "truncate":
        w = truncation_warning(tok.token_counts(texts), ctx)
        if w is not None:
            warnings.warn(w, stacklevel=2)
        return embed_texts(model, texts, batch_size=batch_size, progress=progress, truncate=True)
    windows = tok.windows(texts, ctx, overlap)
    emb = embed_texts(model, windows.texts, batch_size=batch_size, progress=progress, truncate=True)
    if len(windows.texts) == len(texts):  # every text fits: the plain encoding, untouched
        return emb
    return pool_windows(emb, windows)


__all__ = ["encode_text_long", "pool_windows"]
