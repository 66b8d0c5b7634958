"""An image tower made by ``timm`` (open_clip's ``TimmModel``): any ``timm_model_name`` (SigLIP
ViTs with a MAP head, EVA02, ConvNeXt, FastViT / MobileCLIP, PE-Core) with open_clip's pooling and
projection options; parameter names ``trunk.*`` / ``head.*`` as open_clip's."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .deps import require


class TimmTower(nn.Module):
    """``trunk`` (the timm network, its classifier reset or used as the projection) then ``head``
    (optional attention pooling, then a linear or MLP projection)."""

    #: ``precision.cast_weights`` casts a timm network whole (open_clip's rule for timm towers).
    cast_whole = True

    def __init__(self, vision_cfg: dict[str, Any], embed_dim: int) -> None:
        super().__init__()
        timm = require("timm", f"the image tower {vision_cfg['timm_model_name']!r}")
        name = vision_cfg["timm_model_name"]
        pool = vision_cfg.get("timm_pool", "avg")
        proj = vision_cfg.get("timm_proj", "linear")
        proj_bias = bool(vision_cfg.get("timm_proj_bias", False))
        drop = float(vision_cfg.get("timm_drop", 0.0))
        kwargs: dict[str, Any] = {}
        if vision_cfg.get("timm_drop_path") is not None:
            kwargs["drop_path_rate"] = vision_cfg["timm_drop_path"]
        if vision_cfg.get("patch_dropout"):
            kwargs["patch_drop_rate"] = vision_cfg["patch_dropout"]
        if proj not in (None, "", "linear", "mlp", "none"):
            raise ValueError(f"vision_cfg.timm_proj={proj!r} is not one of linear|mlp|none")
        custom_pool = pool in ("abs_attn", "rot_attn")
        extra_proj = proj in ("linear", "mlp")
        try:
            if not extra_proj and not custom_pool:
                # The network's own classifier is the projection ('none': features as they are).
                self.trunk = timm.create_model(name, num_classes=0 if proj == "none" else embed_dim,
                                               global_pool=pool, pretrained=False, **kwargs)
                width = embed_dim
            else:
                self.trunk = timm.create_model(name, pretrained=False, **kwargs)
                self.trunk.reset_classifier(0, **({"global_pool": ""} if custom_pool else
                                                  {"global_pool": pool} if pool else {}))
                width = self.trunk.num_features
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"vision_cfg.timm_model_name={name!r} is not a model of the installed timm "
                                 f"{timm.__version__}") from None
            raise
        feat_size = self.trunk.default_cfg.get("pool_size", None)
        head: OrderedDict[str, nn.Module] = OrderedDict()
        layers = require("timm.layers", "a timm image tower")
        if pool == "abs_attn":
            head["pool"] = layers.AttentionPool2d(width, feat_size=feat_size, out_features=embed_dim)
            width = embed_dim
        elif pool == "rot_attn":
            head["pool"] = layers.RotAttentionPool2d(width, out_features=embed_dim)
            width = embed_dim
        if proj == "linear":
            head["drop"] = nn.Dropout(drop)
            head["proj"] = nn.Linear(width, embed_dim, bias=proj_bias)
        elif proj == "mlp":
            head["mlp"] = layers.Mlp(width, 2 * embed_dim, embed_dim, drop=(drop, 0), bias=(True, proj_bias))
        self.head = nn.Sequential(head)
        size = vision_cfg.get("image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images are {x.shape[-2]}x{x.shape[-1]} but this model takes "
                             f"{self.image_size}x{self.image_size}; use the model's preprocess")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, E]
        self._check(x)
        return self.head(self.trunk(x.to(self.input_dtype)))

    @property
    def input_dtype(self) -> torch.dtype:
        """The network's weight dtype, which images are cast to."""
        return next(self.trunk.parameters()).dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(enable)

    def forward_intermediates(self, x: torch.Tensor, attention: bool = False) -> dict[str, object]:
        """Each block's output (timm's ``forward_intermediates``, where the network offers it)."""
        if attention:
            raise ValueError("attention maps are not available for a timm image tower")
        if not hasattr(self.trunk, "forward_intermediates"):
            raise ValueError(f"timm's {type(self.trunk).__name__} has no forward_intermediates")
        self._check(x)
        final, tokens = self.trunk.forward_intermediates(x.to(self.input_dtype))
        return {"tokens": tokens, "attentions": [], "output": self.head(self.trunk.forward_head(final))}
