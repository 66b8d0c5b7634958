"""Batched embedding of image and text streams: the one seam where evaluation, search and data
curation meet the model. Outputs are L2-normalised float32 features."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from PIL import Image
from tqdm.auto import tqdm

from .device import to_device
from .models import CLIP
from .models.layers import MLP, Attention
from .models.conv import fused_conv_available
from .models.linear import fastest_precision, onednn_linear_is_faster
from .preprocess import Preprocess, image_transform
from .tokenizer import get_tokenizer

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
    tok = get_tokenizer(model.context_length)
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


def fold_batchnorm(visual: torch.nn.Module) -> int:
    """Fold each eval-mode BatchNorm that acts straight on a bias-free conv's output (the pairs
    the tower lists in ``conv_bn_pairs()``) into the conv's weight and bias; the BatchNorm becomes
    ``Identity``. One pass over each activation map less, same outputs within float tolerance.
    Returns the number of pairs folded.

    Only for inference: the folded tower has different parameters (convs gain biases, the
    BatchNorm statistics are gone), so it can be neither trained nor saved as a checkpoint.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = visual.conv_bn_pairs() if hasattr(visual, "conv_bn_pairs") else []
    folded = 0
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and not bn.training:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, torch.nn.Identity())
            folded += 1
    if folded:
        visual.inference_only = True  # type: ignore[assignment]  # checked by save_model
    return folded


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def optimize_for_inference(model: CLIP, *, precision: str = "fp32", channels_last: bool = True,
                           fold_bn: bool = True, pack_weights: bool = True, compile: bool = False) -> CLIP:
    """Prepare a model for fast CPU/GPU inference. With ``precision="fp32"`` (the default) outputs
    stay within float tolerance of the plain model (1e-4, tested).

    eval mode and no parameter gradients; where oneDNN's linear is the faster one here (see
    ``models.linear``), Transformer weights reordered once into its layout with the MLP activation
    fused into the first product; for the ResNets, BatchNorm folded into the preceding
    convolutions, channels-last memory and oneDNN convolutions with the ReLU and the residual
    add fused (``models.conv``), large batches in chunks; optionally ``torch.compile``
    of both towers. ``precision``: ``"bf16"``/``"fp16"`` cast the weights (embeddings then agree
    with fp32 to ~1e-2, not 1e-4); ``"auto"`` picks a reduced precision only where a measured
    matmul probe finds it >= 1.3x faster than fp32 on this CPU (``models.linear.fastest_precision``).
    Returns the same model, changed in place: a model with folded BatchNorm is for inference
    only (``save_model`` refuses it). Packed weights are a second copy of the Transformer
    weights (memory grows by about the model's size; ``pack_weights=False`` avoids it).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model.eval()
    model.requires_grad_(False)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if precision == "auto":
        precision = fastest_precision() if on_cpu else "fp32"
    folded = False
    if model.config.vision.kind == "resnet" and fold_bn:
        folded = fold_batchnorm(model.visual) == len(model.visual.conv_bn_pairs())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if model.dtype != dtype:
        model.to(dtype)
    if pack_weights and on_cpu and model.dtype == torch.float32 and onednn_linear_is_faster():
        for m in model.modules():
            if isinstance(m, (MLP, Attention)):
                m.pack_for_inference()
    if model.config.vision.kind == "resnet" and channels_last:
        model.visual.to(memory_format=torch.channels_last)
        # Fused oneDNN conv + ReLU / + residual add, on top of folded BatchNorm (fp32 CPU calls).
        model.visual.fused_inference = folded and fused_conv_available()
    if compile:
        model.visual = torch.compile(model.visual, dynamic=True)  # type: ignore[assignment]
        model.text = torch.compile(model.text, dynamic=True)  # type: ignore[assignment]
    return model
