"""Path or name -> model: the one place a model argument becomes a model.

Three entry points, one code path (:func:`load`), the same checks (:func:`checkpoint_path`: a local
checkpoint, never a download) and documented defaults (docs/models.md, "Loading"):

==========================================  =====================================================
``clipforge.load(path)``                    the user's entry: eval mode, gradients on, fast layer
                                            on with packed weights (``fast=False``: plain model)
``load_for_inference(path_or_arch)``        the frozen variant every command uses: no gradients,
                                            ``optimize_for_inference`` (packed, BatchNorm folded),
                                            ``precision``; an architecture only with ``random_init``
``clipforge.create_model_and_transforms``   open_clip's signature (:mod:`clipforge.factory`): the
                                            plain model of :func:`load` (``fast=False``) or
                                            :func:`random_model`
==========================================  =====================================================

Storage (:mod:`clipforge.checkpoints`) reads files into plain models and knows nothing of speed;
the fast layer is switched on here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import load_model
from .config import CLIPConfig, available_models, get_model_config
from .device import resolve_device
from .fast import enable as enable_fast
from .inference import optimize_for_inference
from .models import CLIP, create_model
from .precision import inference_precision
from .preprocess import Preprocess, image_transform


class NotACheckpoint(FileNotFoundError, ValueError):
    """An architecture name where a checkpoint path was expected (clipforge never downloads weights).

    Both a ``FileNotFoundError`` (no such file) and a ``ValueError`` (a wrong kind of argument), so
    callers catching either keep working."""


def is_architecture_name(spec: str) -> bool:
    """Whether ``spec`` names a built-in architecture (case-insensitive; '/' or '-')."""
    try:
        get_model_config(str(spec))
    except (KeyError, ValueError):
        return False
    return True


def checkpoint_path(spec: str | os.PathLike, *, random_init_hint: str = "random_init=True (--random-init)",
                    missing_note: str = "") -> Path:
    """The local checkpoint ``spec`` names. An architecture name is a :class:`NotACheckpoint`
    naming how to get an untrained model instead (``random_init_hint``); anything else missing is a
    ``FileNotFoundError`` naming the path (plus ``missing_note``)."""
    p = Path(spec)
    if p.exists():
        return p
    if is_architecture_name(str(spec)):
        raise NotACheckpoint(f"{str(spec)!r} is an architecture name, not a checkpoint, and clipforge never downloads "
                             f"weights: pass a local checkpoint path, or {random_init_hint} for an untrained model")
    raise FileNotFoundError(f"model checkpoint not found: {spec}" + (f"; {missing_note}" if missing_note else ""))


def random_model(name_or_config: str | CLIPConfig, *, activation: str | None = None, seed: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CLIP:
    """A named architecture (or config) with random weights (``seed``: reproducible), eval mode."""
    config = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if activation is not None and activation != config.activation:
        config = CLIPConfig.from_dict({**config.to_dict(), "activation": activation})
    return create_model(config, seed=seed).to(device=device, dtype=dtype).eval()


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         config: CLIPConfig | dict | str | None = None, activation: str | None = None,
         fast: bool = True, trust_torchscript: bool = False) -> tuple[CLIP, Preprocess]:
    """``model, preprocess = clipforge.load(path)`` for OpenAI, OpenCLIP, Hugging Face or our checkpoints.

    Weights are never downloaded: ``path`` is a local file or folder. For a random-init model of a
    named architecture use :func:`clipforge.create_model`.

    ``fast=True`` (default): the model comes with the fast layer on (``clipforge.fast.enable(model,
    pack=True)``): the same Parameters and state_dict, outputs within float rounding (1e-4) of the
    plain model, ~2x faster inference on CPU without calling ``optimize_for_inference``. Inference
    calls (no autograd) use weights prepacked for oneDNN, made at the first call and remade after
    any change to the weights (a second copy of the Transformer weights in memory); training calls
    take the fast layer's training paths (gradients equal within float rounding, as ``clipforge
    train``); tracing for export records plain ops; ``forward_intermediates`` computes every token
    of every block. ``fast=False``: the plain reference model (what ``checkpoints.load_model`` reads).

    OpenAI's TorchScript archives are read without running any of their code. An archive the
    restricted reader cannot read is refused with one line; ``trust_torchscript=True`` loads it with
    ``torch.jit.load``, which runs the archive's code: only for files you trust (better: convert
    it once with ``clipforge convert SRC DST --to clipforge --trust-torchscript``).
    """
    p = checkpoint_path(path, random_init_hint=f"use clipforge.create_model({str(path)!r})")
    model = load_model(p, config=config, activation=activation, device=device, dtype=dtype,
                       trust_torchscript=trust_torchscript)
    if fast:
        enable_fast(model, pack=True)
    return model, image_transform(model.config.preprocess)


def load_for_inference(path_or_arch: str | Path, *, device: str = "cpu", precision: str = "fp32",
                       random_init: bool = False, seed: int | None = None, trust_torchscript: bool = False
                       ) -> tuple[CLIP, Callable[..., torch.Tensor]]:
    """``(model, preprocess)``: eval mode, no gradients, on ``device``, cast to ``precision``
    (``fp32`` | ``bf16`` | ``fp16`` | ``pure_bf16`` | ``pure_fp16`` | ``int8`` | ``auto``: the inference column of
    :mod:`clipforge.precision`, where ``bf16``/``fp16`` cast every weight) with the inference fast paths on.

    ``path_or_arch`` is a checkpoint path; with ``random_init=True`` it must instead be an
    architecture name, built with random weights (``seed`` makes them reproducible). An
    architecture name *without* ``random_init`` is refused: ``"ViT-B/32"`` typed by mistake must
    not silently give an untrained model (clipforge never downloads weights).
    """
    spec = str(path_or_arch)
    cast = inference_precision(precision)
    dev = resolve_device(device)
    if random_init:
        if not is_architecture_name(spec):
            raise ValueError(f"random_init (--random-init) needs an architecture name, got {spec!r}; "
                             f"available: {', '.join(available_models())}")
        model = random_model(spec, seed=seed, device=dev)
        preprocess = image_transform(model.config.preprocess)
    else:
        model, preprocess = load(checkpoint_path(spec), device=dev, trust_torchscript=trust_torchscript)
    return optimize_for_inference(model, precision=cast), preprocess


def model_label(path_or_arch: str | Path, *, random_init: bool = False, seed: int | None = None) -> str:
    """How results name the model: the checkpoint path as given, or ``NAME (random init, seed S)``."""
    if random_init:
        return f"{path_or_arch} (random init" + (f", seed {seed})" if seed is not None else ")")
    return str(path_or_arch)


__all__ = ["load", "load_for_inference", "random_model", "checkpoint_path", "NotACheckpoint", "model_label",
           "is_architecture_name"]
