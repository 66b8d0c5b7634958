"""The CLIP dual encoder: an image tower and a text tower projected into one embedding space
(:class:`DualEncoder`: the interface and computation every model here shares; :class:`CLIP`: OpenAI's
and the native SigLIP towers)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig
from .siglip import SigLIPTextTransformer, SigLIPVisionTransformer
from .text import TextTransformer
from .vision_resnet import ModifiedResNet
from .vision_vit import VisionTransformer


_M = TypeVar("_M", bound="DualEncoder")


class DualEncoder(nn.Module):
    """What every CLIP-style model here shares, whatever its towers (ours, or an open_clip family's):
    ``visual`` and ``text`` modules projecting into one space, ``logit_scale`` (log temperature) and an
    optional ``logit_bias``, and ``config`` with ``vision.image_size``, ``text.context_length`` and
    ``max_logit_scale``. Subclasses build the towers and say how to checkpoint them.

    ``encode_image`` / ``encode_text`` return projected (unnormalised, as in OpenAI's code)
    features; pass ``normalize=True`` for unit vectors. ``forward`` returns
    ``(logits_per_image, logits_per_text)``: cosine similarities scaled by ``exp(logit_scale)``,
    plus ``logit_bias`` for models that carry one (SigLIP's sigmoid loss; ``None`` otherwise).
    """

    config: Any
    visual: nn.Module
    text: nn.Module
    logit_scale: nn.Parameter
    logit_bias: nn.Parameter | None

    # --- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    # --- encoders -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (already preprocessed) -> features ``[B, embed_dim]``."""
        x = self.visual(images.to(device=self.device, dtype=self.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``[B, L]`` (from the model's tokenizer) -> features ``[B, embed_dim]``."""
        x = self.text(ids.to(self.device))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(ids, normalize=True)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()  # [B_img, B_txt]
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()

    def forward_intermediates(self, images: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                              attention: bool = False) -> dict[str, dict[str, object]]:
        """Per-layer outputs of either tower (and attention maps if ``attention=True``, where the
        tower offers them). Off the normal path, so ``encode_*`` pay nothing for it."""
        out: dict[str, dict[str, object]] = {}
        if images is not None:
            out["image"] = self.visual.forward_intermediates(  # type: ignore[operator]
                images.to(device=self.device, dtype=self.dtype), attention=attention)
        if ids is not None:
            out["text"] = self.text.forward_intermediates(ids.to(self.device), attention=attention)  # type: ignore[operator]
        return out

    # --- training helpers -----------------------------------------------------------------------
    def clamp_logit_scale(self) -> None:
        """Clip the learned temperature so exp(logit_scale) <= max_logit_scale (100 in the paper)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    def lock_image_tower(self) -> None:
        """Freeze the image tower (LiT); BatchNorm statistics are frozen too."""
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.visual.eval()
        self._image_locked = True

    def train(self: _M, mode: bool = True) -> _M:
        super().train(mode)
        if getattr(self, "_image_locked", False):
            self.visual.eval()
        elif getattr(self, "_image_bn_frozen", False):  # training.lock: BatchNorm statistics fixed
            for m in self.visual.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def num_parameters(self) -> dict[str, int]:
        vis = sum(p.numel() for p in self.visual.parameters())
        txt = sum(p.numel() for p in self.text.parameters())
        scalars = 1 if self.logit_bias is None else 2
        return {"image": vis, "text": txt, "total": vis + txt + scalars}


class CLIP(DualEncoder):
    """Contrastive Language-Image model: OpenAI's towers (ViT or ModifiedResNet image tower, causal
    text Transformer) or the native SigLIP ones (``kind = "siglip"``); the interface is
    :class:`DualEncoder`'s.
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        towers = {"vit": VisionTransformer, "resnet": ModifiedResNet, "siglip": SigLIPVisionTransformer}
        self.visual = towers[config.vision.kind](config)
        self.text = TextTransformer(config) if config.text.kind == "clip" else SigLIPTextTransformer(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (
            None if config.init_logit_bias is None else nn.Parameter(torch.tensor(float(config.init_logit_bias))))

    # The towers' dtype and device (``logit_scale`` may be kept in float32 beside bf16 towers).
    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    # --- training helpers -----------------------------------------------------------------------
    def add_logit_bias(self, init: float) -> None:
        """Give a bias-free model a learned logit bias (to train it with the sigmoid loss); the
        config records it, so checkpoints written afterwards carry and describe it."""
        if self.logit_bias is not None:
            raise ValueError("this model already has a logit_bias")
        self.config = dataclasses.replace(self.config, init_logit_bias=float(init))
        self.logit_bias = nn.Parameter(torch.tensor(float(init), device=self.logit_scale.device,
                                                    dtype=self.logit_scale.dtype))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.transformer.grad_checkpointing = enable
        if isinstance(self.visual, (VisionTransformer, SigLIPVisionTransformer)):
            self.visual.transformer.grad_checkpointing = enable
        else:
            self.visual.grad_checkpointing = enable  # type: ignore[assignment]
