"""The CLIP dual encoder: an image tower and a text tower projected into one embedding space."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig
from .text import TextTransformer
from .vision_resnet import ModifiedResNet
from .vision_vit import VisionTransformer


class CLIP(nn.Module):
    """Contrastive Language-Image model.

    ``encode_image`` / ``encode_text`` return projected (unnormalised, as in OpenAI's code)
    features; pass ``normalize=True`` for unit vectors. ``forward`` returns
    ``(logits_per_image, logits_per_text)``: cosine similarities scaled by ``exp(logit_scale)``,
    plus ``logit_bias`` for models that carry one (SigLIP's sigmoid loss; ``None`` otherwise).
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual: nn.Module = (
            VisionTransformer(config) if config.vision.kind == "vit" else ModifiedResNet(config)
        )
        self.text = TextTransformer(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias: nn.Parameter | None = (
            None if config.init_logit_bias is None else nn.Parameter(torch.tensor(float(config.init_logit_bias))))

    # --- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.text.text_projection.dtype

    @property
    def device(self) -> torch.device:
        return self.text.text_projection.device

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
        """Token ids ``[B, L]`` (from :func:`clipforge.tokenize`) -> features ``[B, embed_dim]``."""
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
        """Per-layer outputs of either tower (and attention maps if ``attention=True``).
        Off the normal path, so ``encode_*`` pay nothing for it."""
        out: dict[str, dict[str, object]] = {}
        if images is not None:
            out["image"] = self.visual.forward_intermediates(  # type: ignore[operator]
                images.to(device=self.device, dtype=self.dtype), attention=attention)
        if ids is not None:
            out["text"] = self.text.forward_intermediates(ids.to(self.device), attention=attention)
        return out

    # --- training helpers -----------------------------------------------------------------------
    def add_logit_bias(self, init: float) -> None:
        """Give a bias-free model a learned logit bias (to train it with the sigmoid loss); the
        config records it, so checkpoints written afterwards carry and describe it."""
        if self.logit_bias is not None:
            raise ValueError("this model already has a logit_bias")
        self.config = dataclasses.replace(self.config, init_logit_bias=float(init))
        self.logit_bias = nn.Parameter(torch.tensor(float(init), device=self.logit_scale.device,
                                                    dtype=self.logit_scale.dtype))

    def clamp_logit_scale(self) -> None:
        """Clip the learned temperature so exp(logit_scale) <= max_logit_scale (100 in the paper)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable
        else:
            self.visual.grad_checkpointing = enable  # type: ignore[assignment]

    def lock_image_tower(self) -> None:
        """Freeze the image tower (LiT); BatchNorm statistics are frozen too."""
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.visual.eval()
        self._image_locked = True

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        if getattr(self, "_image_locked", False):
            self.visual.eval()
        return self

    def num_parameters(self) -> dict[str, int]:
        vis = sum(p.numel() for p in self.visual.parameters())
        txt = sum(p.numel() for p in self.text.parameters())
        scalars = 1 if self.logit_bias is None else 2
        return {"image": vis, "text": txt, "total": vis + txt + scalars}
