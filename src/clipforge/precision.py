"""Precision: the names every command accepts, what each does in training and at inference, the
name -> dtype map, autocast and the casting rules. Training, inference, the fast layer, the
planner and the CLI all read them here.

The names are open_clip's, with open_clip's meaning where open_clip has the name (open_clip 3.3:
``create_model(precision=)`` / ``open_clip_train --precision``; ``get_autocast``):

============  ====================================================  =========================================
name          training (:func:`cast_weights` + :func:`autocast`)    inference (``load_for_inference``, commands)
============  ====================================================  =========================================
fp32          float32 weights, no autocast                          float32
bf16 / fp16   Linear/Conv/attention/projection weights cast         the same cast
              (LayerNorm, embeddings, logit scale stay float32;
              OpenAI's and open_clip's ``convert_weights_to_lp``;
              a timm / Hugging Face tower cast whole)
pure_bf16,    every weight cast                                     every weight cast
pure_fp16
amp_bf16,     float32 weights, bfloat16 autocast                    refused (autocast is for training)
amp_bfloat16
amp           float32 weights, float16 autocast + gradient          refused
              scaler (CUDA)
int8          refused                                               CPU: Transformer products by dynamic int8
                                                                    quantization, the rest fp32
auto          ``amp_bf16`` where bf16 pays (the machine's stored    ``bf16`` or ``fp16`` only where the stored
              matmul probe on a CPU; a CUDA GPU with bf16), else    probe finds it >= 1.3x faster than fp32;
              ``fp32`` (CPU) / ``amp`` (older GPU); resolved once   fp32 on a GPU
              per run and recorded
============  ====================================================  =========================================

A name means one weight cast in both columns (:func:`cast_weights`); a ``bf16`` model's
``dtype`` (its logit scale's) stays float32, :func:`lowest_weight_dtype` names the cast.

On a CPU, ``amp_bf16`` training takes the fast layer's bf16 path (``clipforge.fast``): bf16
products, float32 master weights, LayerNorm, attention softmax, loss and temperature. Before this
vocabulary, ``clipforge train --precision bf16`` meant bfloat16 *autocast*; that run is spelled
``amp_bf16`` (and the old ``fp16`` autocast is ``amp``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

#: The dtype each short name stands for (the weight dtype of a cast, a matmul probe's operands).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What a training precision name does: weight dtype and scope, autocast dtype, gradient scaler."""

    name: str
    weight_dtype: torch.dtype = torch.float32
    weight_scope: str = "none"  # "none" | "matmul" (Linear/Conv/attention/projections) | "all"
    autocast_dtype: torch.dtype | None = None
    grad_scaler: bool = False

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype images are fed in (open_clip's ``get_input_dtype``)."""
        return self.weight_dtype if self.weight_scope != "none" else torch.float32


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32"),
    "bf16": Precision("bf16", torch.bfloat16, "matmul"),
    "fp16": Precision("fp16", torch.float16, "matmul"),
    "pure_bf16": Precision("pure_bf16", torch.bfloat16, "all"),
    "pure_fp16": Precision("pure_fp16", torch.float16, "all"),
    "amp_bf16": Precision("amp_bf16", autocast_dtype=torch.bfloat16),
    "amp_bfloat16": Precision("amp_bfloat16", autocast_dtype=torch.bfloat16),
    "amp": Precision("amp", autocast_dtype=torch.float16, grad_scaler=True),
}
TRAIN_PRECISIONS = tuple(PRECISIONS)
# What a training run may ask for: a concrete name, or "auto" (resolved by training.run_precision).
TRAIN_PRECISION_CHOICES = TRAIN_PRECISIONS + ("auto",)
# What inference commands accept: casts of every weight, int8, or "auto" (measured); no autocast.
INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16", "int8", "auto")
# What ``optimize_for_inference(precision=)`` takes: the same names (``bf16`` / ``fp16`` cast the
# Linear/Conv weights, ``pure_*`` every weight, int8 quantizes the Transformer products).
INFERENCE_CASTS = INFERENCE_PRECISIONS


def get_precision(name: str) -> Precision:
    """The :class:`Precision` of a training precision name (``ValueError`` listing the names)."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r} (expected one of {', '.join(TRAIN_PRECISIONS)})") from None


def inference_precision(name: str) -> str:
    """The cast ``optimize_for_inference`` takes (:data:`INFERENCE_CASTS`) for an inference precision
    name: the same name (``bf16`` means at inference what it means in training); ``ValueError`` for
    an autocast name, which only training takes."""
    if name not in INFERENCE_PRECISIONS:
        hint = " (autocast precisions are for training; inference casts the weights: use bf16 or fp16)" \
            if name in PRECISIONS else ""
        raise ValueError(f"unknown inference precision {name!r}; expected one of "
                         f"{', '.join(INFERENCE_PRECISIONS)}{hint}")
    return name


def inference_dtype(cast: str) -> torch.dtype:
    """The dtype of an ``optimize_for_inference`` cast's matmul weights (int8 keeps fp32 weights)."""
    return torch.float32 if cast == "int8" else DTYPES[cast.removeprefix("pure_")]


#: Parameters cast with the Linear/Conv weights (open_clip's ``convert_weights_to_lp``): attention
#: projections held as parameters, and the towers' output projections.
MATMUL_PARAMETERS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v", "text_projection", "proj")


def cast_weights(model: torch.nn.Module, precision: Precision | str) -> torch.nn.Module:
    """Cast ``model``'s weights as ``precision`` says (in place; returns the model): training and
    inference alike. ``bf16``/``fp16``: Linear/Conv weights and :data:`MATMUL_PARAMETERS`; a module
    with ``cast_whole = True`` (a timm or Hugging Face tower, whose internals mix dtypes otherwise)
    is cast whole, as open_clip casts a timm model."""
    p = get_precision(precision) if isinstance(precision, str) else precision
    if p.weight_scope == "all":
        model.to(p.weight_dtype)
    elif p.weight_scope == "matmul":
        whole = [m for m in model.modules() if getattr(m, "cast_whole", False)]
        for m in whole:  # a tower built by timm or transformers: cast whole (open_clip's rule for timm)
            m.to(p.weight_dtype)
        skip = {id(sub) for m in whole for sub in m.modules()}
        for m in model.modules():
            if id(m) in skip:
                continue
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                m.to(p.weight_dtype)
            for name in MATMUL_PARAMETERS:
                t = m._parameters.get(name)
                if t is not None:
                    t.data = t.data.to(p.weight_dtype)
    return model


def lowest_weight_dtype(model: torch.nn.Module) -> torch.dtype:
    """The lowest floating dtype among ``model``'s parameters: ``bfloat16`` for a ``bf16`` cast even
    though its LayerNorm and embeddings stay float32 (what records and the fp32-only runtimes ask)."""
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float32)


def autocast(precision: Precision | str, device: torch.device | str) -> ContextManager[Any]:
    """torch autocast for the ``amp*`` precisions; a null context otherwise. float16 autocast
    (``amp``) needs CUDA: on another device it is a ``ValueError`` naming the alternatives."""
    p = get_precision(precision) if isinstance(precision, str) else precision
    device = torch.device(device)
    if p.autocast_dtype is None:
        return contextlib.nullcontext()
    if p.autocast_dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"precision {p.name} (float16 autocast with a gradient scaler) needs a CUDA GPU; "
                         f"on {device.type} use amp_bf16, bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=p.autocast_dtype)


__all__ = ["DTYPES", "Precision", "PRECISIONS", "TRAIN_PRECISIONS", "TRAIN_PRECISION_CHOICES", "INFERENCE_PRECISIONS",
           "INFERENCE_CASTS", "MATMUL_PARAMETERS", "get_precision", "inference_precision", "inference_dtype", "cast_weights",
           "lowest_weight_dtype", "autocast"]
