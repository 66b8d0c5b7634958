"""Partial locking and layer-wise learning-rate decay of the two towers (open_clip's
``--lock-image-unlocked-groups``, ``--lock-image-freeze-bn-stats``, ``--lock-text``,
``--lock-text-unlocked-layers``, ``--lock-text-freeze-layer-norm``; layer decay as in BEiT/timm).

Both act on a tower's parameters in *groups*, input to output (open_clip's grouping):

- ViT image tower: ``[conv1, class/positional embedding, ln_pre]``, one group per block but the
  last, ``[last block, ln_post]``, ``[proj]``;
- ResNet image tower: the stem (``conv1..3``, ``bn1..3``), ``layer1`` .. ``layer4``, ``attnpool``;
- text tower: ``[token/positional embedding]``, one group per block but the last,
  ``[last block, ln_final]``, ``[text_projection]``.

Locking with ``unlocked`` groups freezes all but the last ``unlocked`` groups (0: the whole
tower). Layer decay ``d`` scales group ``g`` of ``G``'s learning rate by ``d ** (G - 1 - g)``: the
output group trains at the full rate, each group below at ``d`` times the one above it. The
temperature belongs to no tower (scale 1).
"""

from __future__ import annotations

import re

from torch import nn

from ..models import CLIP

_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_STEM = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "token_embedding.")


def group_of(model: CLIP, tower: str, name: str) -> tuple[int, int]:
    """``(group index, number of groups)`` of parameter ``name`` (relative to the tower
    ``visual`` or ``text``), in the grouping of the module docstring."""
    module = model.visual if tower == "visual" else model.text
    if tower == "visual" and model.config.vision.kind == "resnet":
        order = ["stem", "layer1", "layer2", "layer3", "layer4", "attnpool"]
        head = name.split(".")[0]
        return (order.index(head) if head in order else 0), len(order)
    layers = len(module.transformer.resblocks)
    m = _BLOCK.match(name)
    if m:
        return min(int(m.group(1)) + 1, layers), layers + 2
    if name.startswith(_STEM):
        return 0, layers + 2
    if name.startswith(("ln_post.", "ln_final.")):
        return layers, layers + 2
    if name in ("proj", "text_projection"):
        return layers + 1, layers + 2
    raise ValueError(f"no layer group for {tower}.{name} (an unknown parameter of this tower)")


def _lock(model: CLIP, tower: str, unlocked: int, keep_layer_norm: bool = False) -> None:
    module = model.visual if tower == "visual" else model.text
    for name, p in module.named_parameters():
        g, n = group_of(model, tower, name)
        if unlocked > n:
            raise ValueError(f"{tower} tower has {n} layer groups; cannot leave {unlocked} unlocked")
        frozen = g < n - unlocked
        if frozen and keep_layer_norm and _in_layer_norm(module, name):
            frozen = False
        if frozen:
            p.requires_grad_(False)


def _in_layer_norm(module: nn.Module, name: str) -> bool:
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    return isinstance(owner, nn.LayerNorm)


def lock_image(model: CLIP, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
    """Freeze the image tower but its last ``unlocked_groups`` groups. Fully locked (0), the tower
    runs in eval mode (as ``CLIP.lock_image_tower``: BatchNorm statistics frozen too); partly
    locked, BatchNorm statistics keep updating unless ``freeze_bn_stats``."""
    if unlocked_groups == 0:
        model.lock_image_tower()
        return
    _lock(model, "visual", unlocked_groups)
    if freeze_bn_stats:
        freeze_batch_norm_stats(model)


def freeze_batch_norm_stats(model: CLIP) -> None:
    """Keep the image tower's BatchNorm layers in eval mode (running statistics fixed, also after
    ``model.train()``); their affine parameters train if their group does."""
    model._image_bn_frozen = True
    model.train(model.training)


def lock_text(model: CLIP, unlocked_layers: int = 0, freeze_layer_norm: bool = False) -> None:
    """Freeze the text tower but its last ``unlocked_layers`` groups; the LayerNorm gains and
    biases of the frozen part stay trainable unless ``freeze_layer_norm`` (open_clip's meaning)."""
    _lock(model, "text", unlocked_layers, keep_layer_norm=not freeze_layer_norm)


def layer_decay_scales(model: CLIP, image: float = 1.0, text: float = 1.0) -> dict[str, float]:
    """Learning-rate scale per parameter name (full model names) for layer decays ``image`` and
    ``text``; parameters of a tower with decay 1 and the temperature get 1."""
    scales: dict[str, float] = {}
    for tower, decay in (("visual", image), ("text", text)):
        module = model.visual if tower == "visual" else model.text
        for name, _ in module.named_parameters():
            g, n = group_of(model, tower, name)
            scales[f"{tower}.{name}"] = float(decay ** (n - 1 - g)) if decay != 1.0 else 1.0
    return scales


__all__ = ["group_of", "lock_image", "lock_text", "freeze_batch_norm_stats", "layer_decay_scales"]
