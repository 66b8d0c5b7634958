"""Batched embedding of image and text streams: the one seam where evaluation, search and data
curation meet the model. Outputs are L2-normalised float32 features. ``optimize_for_inference``
(implemented in ``clipforge.fast``) is re-exported here: callers prepare a model, then embed."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from PIL import Image
from tqdm.auto import tqdm

from .device import to_device
from .fast import optimize_for_inference
from .models import CLIP
from .preprocess import Preprocess, image_transform
from .families import tokenizer_for

T = TypeVar("T")


def batched(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``batch_size`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def embed_images(model: CLIP, images: Iterable[Image.Image | torch.Tensor], *,
                 preprocess: Preprocess | Callable[[Image.Image], torch.Tensor] | None = None,
                 batch_size: int = 64, progress: bool = False, total: int | None = None,
                 normalize: bool = True) -> torch.Tensor:
    """Embed PIL images (preprocessed here) or already-preprocessed ``[3,H,W]`` tensors."""
    pre = preprocess or image_transform(model.config.preprocess)
    was_training = model.training
    model.eval()
    outs: list[torch.Tensor] = []
    bar = tqdm(total=total, desc="embed images", unit="img", disable=not progress)
    try:
        for batch in batched(images, batch_size):
            x = torch.stack([im if isinstance(im, torch.Tensor) else pre(im) for im in batch])
            x = to_device(x, model.device)  # pinned + non-blocking on CUDA; no-op on CPU
            outs.append(model.encode_image(x, normalize=normalize).float().cpu())
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    if not outs:
        return torch.empty(0, model.config.embed_dim)
    return torch.cat(outs)


@torch.inference_mode()
def embed_texts(model: CLIP, texts: Sequence[str], *, batch_size: int = 256, progress: bool = False,
                truncate: bool = True, normalize: bool = True) -> torch.Tensor:
    """Embed texts; long texts are truncated to the model's context by default.

    Texts are batched in order of token length (and returned in the input order), so each batch
    is trimmed to a similar length: on real captions most of the 77 positions are padding.
    """
    tok = tokenizer_for(model)  # OpenAI's BPE, or a family model's own (SentencePiece, HF)
    ids = tok.tokenize(list(texts), model.context_length, truncate=truncate)
    if len(ids) == 0:
        return torch.empty(0, model.config.embed_dim)
    order = torch.argsort(ids.argmax(dim=-1), stable=True)
    was_training = model.training
    model.eval()
    out = torch.empty(len(ids), model.config.embed_dim)
    try:
        for start in tqdm(range(0, len(ids), batch_size), desc="embed texts", disable=not progress):
            idx = order[start : start + batch_size]
            out[idx] = model.encode_text(to_device(ids[idx], model.device), normalize=normalize).float().cpu()
    finally:
        model.train(was_training)
    return out


__all__ = ["batched", "embed_images", "embed_texts", "optimize_for_inference"]
