"""The single switch: ``enable(model)`` swaps the fast modules in (training and inference: same
Parameters, same state_dict, outputs within float rounding of the plain model);
``optimize_for_inference(model)`` also freezes the model and prepares inference-only forms
(packed weights, folded BatchNorm, channels-last)."""

from __future__ import annotations

import torch
from torch import nn

from ..models import CLIP
from ..models.layers import MLP, Attention, ResidualAttentionBlock, Transformer
from ..models.siglip import SigLIPTextTransformer, SigLIPVisionTransformer
from ..models.text import TextTransformer
from ..models.vision_resnet import ModifiedResNet
from ..models.vision_vit import VisionTransformer
from ..precision import INFERENCE_CASTS, PRECISIONS, cast_weights, inference_dtype
from .backend import FastLinear, fastest_precision
from .linear import int8_available
from .siglip import FastSigLIPText, FastSigLIPVision
from .resnet import FastResNet, FoldedResNet, conv_bn_pairs, fold_batchnorm, fused_conv_available
from .swap import swap_class
from .text import FastTextTransformer
from .transformer import FastAttention, FastBlock, FastMLP, FastTransformer, Packing
from .vit import FastVisionTransformer

FAST: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: FastLinear, MLP: FastMLP, Attention: FastAttention, ResidualAttentionBlock: FastBlock,
    Transformer: FastTransformer, TextTransformer: FastTextTransformer, VisionTransformer: FastVisionTransformer,
    ModifiedResNet: FastResNet, SigLIPTextTransformer: FastSigLIPText, SigLIPVisionTransformer: FastSigLIPVision,
}
PLAIN = {fast: plain for plain, fast in FAST.items()}


def enable(model: nn.Module, *, pack: bool = False) -> nn.Module:
    """Swap every plain module of ``model`` for its fast subclass, in place; returns ``model``.

    ``pack=True`` (what ``clipforge.load`` does): inference calls (no autograd) also use weights
    prepacked in oneDNN's layout, made at the first such call and remade after any change to the
    weights (``fast.transformer.Packing``); training calls are unaffected. A second copy of the
    Transformer weights while in eval mode. A model whose class sets ``fast_paths = False`` (the
    open_clip families: their towers are timm's / transformers') is returned as it is."""
    if getattr(model, "fast_paths", True) is False:
        return model
    for m in model.modules():
        fast = FAST.get(type(m))
        if fast is not None:
            swap_class(m, fast)
        if isinstance(m, Packing):
            m.pack_weights = pack
    return model


def disable(model: nn.Module) -> nn.Module:
    """Back to the plain classes (a folded ResNet stays folded: its BatchNorms are gone)."""
    for m in model.modules():
        plain = PLAIN.get(type(m))
        if plain is not None:
            if isinstance(m, Packing):
                m.reset()
            swap_class(m, plain)
    return model


def is_enabled(model: nn.Module) -> bool:
    return any(type(m) in PLAIN for m in model.modules())


def optimize_for_inference(model: CLIP, *, precision: str = "fp32", channels_last: bool = True,
                           fold_bn: bool = True, pack_weights: bool = True, compile: bool = False) -> CLIP:
    """Prepare a model for fast CPU/GPU inference. With ``precision="fp32"`` (the default) outputs
    stay within float tolerance of the plain model (1e-4, tested).

    eval mode and no parameter gradients; the fast modules (``enable``); where the linear backend
    is oneDNN (``fast.backend``), Transformer weights reordered once into its layout with the MLP
    activation fused into the first product; for the ResNets, BatchNorm folded into the preceding
    convolutions, channels-last memory and oneDNN convolutions with the ReLU and the residual add
    fused, large batches in chunks; optionally ``torch.compile`` of both towers. ``precision``:
    ``"bf16"``/``"fp16"`` cast the Linear/Conv weights as training does (LayerNorm and embeddings
    stay float32; ``"pure_bf16"``/``"pure_fp16"``: every weight; embeddings then agree with fp32 to
    ~1e-2, not 1e-4);
    ``"auto"`` picks a reduced precision only where the machine's stored matmul probe found it
    >= 1.3x faster than fp32 (``fast.fastest_precision``; never int8). ``"int8"``: the Transformer
    products (attention projections, MLP) by dynamic int8 quantization on CPU (weights int8 per
    output row, activations quantized per call; everything else fp32): embeddings drift from fp32
    by more than bf16's (measured in benchmarks/int8.py), for embedding large collections. Returns the same model, changed in
    place: a model with folded BatchNorm is for inference only (``save_model`` refuses it).
    Packed weights are a second copy of the Transformer weights (``pack_weights=False`` avoids it).
    """
    if precision not in INFERENCE_CASTS:
        raise ValueError(f"precision must be one of {INFERENCE_CASTS}, got {precision!r}")
    model.eval()
    model.requires_grad_(False)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if precision == "auto":
        precision = fastest_precision() if on_cpu else "fp32"
    if precision == "int8" and not (on_cpu and int8_available()):
        raise ValueError("precision int8 needs a CPU model and a torch build with a quantized CPU engine "
                         f"(this one: {torch.backends.quantized.supported_engines}); use bf16 or fp32")
    enable(model, pack=pack_weights)
    if getattr(model, "fast_paths", True) is False:
        if precision == "int8":
            raise ValueError("precision int8 is not available for this model family (fp32, bf16 or fp16)")
        return _cast(model, precision)
    for m in model.modules():
        if isinstance(m, (FastMLP, FastAttention)):
            m.int8 = precision == "int8"
    n_folded = fold_batchnorm(model.visual) if fold_bn else 0
    _cast(model, precision)
    if isinstance(model.visual, ModifiedResNet) and channels_last:
        model.visual.to(memory_format=torch.channels_last)
        if isinstance(model.visual, FoldedResNet):
            # Fused oneDNN conv + ReLU / + residual add, on top of folded BatchNorm (fp32 CPU calls).
            model.visual.fused = n_folded == len(conv_bn_pairs(model.visual)) and fused_conv_available()
    if compile:
        model.visual = torch.compile(model.visual, dynamic=True)  # type: ignore[assignment]
        model.text = torch.compile(model.text, dynamic=True)  # type: ignore[assignment]
    return model


def _cast(model: CLIP, precision: str) -> CLIP:
    """The inference cast: ``bf16``/``fp16`` as training casts (``cast_weights``: Linear/Conv weights,
    LayerNorm and embeddings float32), ``pure_*`` every weight; int8 and fp32 keep float32."""
    if precision in PRECISIONS and precision != "fp32":  # from float32, whatever dtype the file held
        return cast_weights(model.float(), precision)
    return model.to(inference_dtype(precision))
