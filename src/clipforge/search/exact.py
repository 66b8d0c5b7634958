"""Batch-invariant query encoding: the same text or image gives the same bits whatever batch
it rode in (its companions, their number, its position).

Matrix kernels block by the shapes they get, so a row's last bits can change with the batch's
size, and the fast text tower trims each batch to its longest row. Here every model call has a
shape that depends on the row alone:

- images are encoded in chunks of exactly ``IMAGE_ROWS`` through the reference ViT computation
  (the fast tower's class-token-only last block makes a row's bits depend on its position),
  zero images padding the last chunk; other image towers (ResNets, families) one image per call;
- a text goes to the length bucket of its own end-of-text token (``TEXT_LENGTHS``), whose rows
  are run ``TEXT_TOKENS // length`` at a time through the reference text computation (every
  position computed, the last block included, then pooled: the fast tower's pooled-row last block
  and shared prefixes depend on the companions), padded with empty texts.

Checked on the serving CPU by ``tests/search/test_exact.py`` (a query alone vs inside chunks with
other companions and at every position: equal bits). A text tower other than clipforge's
:class:`~clipforge.models.text.TextTransformer` (SigLIP, HF towers, ONNX graphs) is encoded one
text per call: shape fixed by the text alone, hence exact too, without the batching gain; the
same for image towers other than clipforge's ViT.

A lone query pays for its chunk's padding rows (``IMAGE_ROWS`` images, ``TEXT_TOKENS`` tokens).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..models.text import TextTransformer
from ..models.vision_vit import VisionTransformer
from ..tokenizer import tokenize

TEXT_LENGTHS = (8, 10, 12, 14, 16, 20, 24, 32, 48, 64, 77)  # token buckets: a row goes to the first that holds its end-of-text
TEXT_TOKENS = 64                    # rows x length per text chunk (a 77-token bucket: one row)
IMAGE_ROWS = 2                      # images per chunk


def text_bucket(eot: int, context: int) -> int:
    """The bucket length for a row whose end-of-text token sits at ``eot``."""
    for n in TEXT_LENGTHS:
        if eot < n <= context:
            return n
    return context


def reference_text_features(text: TextTransformer, ids: torch.Tensor) -> torch.Tensor:
    """[R, L] ids -> [R, E]: every position through every block, pooled at each row's
    end-of-text token (the reference tower's computation, whatever the fast subclass)."""
    return TextTransformer.forward(text, ids)


def supports_exact_text(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "text", None), TextTransformer) and hasattr(model, "context_length")


@torch.inference_mode()
def encode_texts_exact(model: torch.nn.Module, texts: list[str], tokenizer: Callable | None = None) -> torch.Tensor:
    """[B, D] L2-normalised float32 features of ``texts`` (truncated to the context), each row
    computed in a chunk whose shape depends on that row alone."""
    context = int(model.context_length)
    ids = tokenizer(texts, context, truncate=True) if tokenizer is not None else tokenize(texts, context, truncate=True)
    pad = tokenizer([""], context, truncate=True) if tokenizer is not None else tokenize([""], context, truncate=True)
    eot = ids.argmax(dim=-1).tolist()
    buckets: dict[int, list[int]] = {}
    for i, e in enumerate(eot):
        buckets.setdefault(text_bucket(e, context), []).append(i)
    out = torch.empty(len(texts), int(model.config.embed_dim))
    device = model.device
    for length, rows in sorted(buckets.items()):
        per = max(1, TEXT_TOKENS // length)
        for s in range(0, len(rows), per):
            part = rows[s:s + per]
            chunk = torch.cat([ids[part], pad.expand(per - len(part), -1)])[:, :length]
            feats = reference_text_features(model.text, chunk.to(device))[: len(part)]
            out[part] = F.normalize(feats.float(), dim=-1).cpu()
    return out


@torch.inference_mode()
def encode_images_exact(model: torch.nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    """[B, D] L2-normalised float32 features of preprocessed ``[3, S, S]`` images: a ViT tower in
    chunks of exactly ``IMAGE_ROWS`` (zero images pad the last one), other towers one per call."""
    vit = isinstance(getattr(model, "visual", None), VisionTransformer)
    rows = IMAGE_ROWS if vit else 1
    out = []
    for s in range(0, len(images), rows):
        part = images[s:s + rows]
        x = torch.stack(part + [torch.zeros_like(part[0])] * (rows - len(part)))
        if vit:
            x = VisionTransformer.forward(model.visual, x.to(device=model.device, dtype=model.dtype))
        else:
            x = model.encode_image(x)
        out.append(F.normalize(x[: len(part)].float(), dim=-1).cpu())
    if not out:
        return torch.empty(0, int(model.config.embed_dim))
    return torch.cat(out)
