"""A CLIP of any open_clip family behind our model interface (``encode_image``, ``encode_text``,
``forward``, ``forward_intermediates``, ``logit_scale``, ``logit_bias``, ``config``...), so eval,
embed, search, serve, fine-tuning and export use it like our own :class:`~clipforge.models.CLIP`.

Towers: timm (``timm_model_name``), open_clip's ViT (ours), open_clip's text Transformer variants
(ours) or a Hugging Face text model. CoCa's caption decoder is not built: its tensors are carried
(:meth:`FamilyCLIP.carry`, buffers under open_clip's names, never read by our forward), so a CoCa
checkpoint converts back to open_clip's with its decoder unchanged. State dict keys are open_clip's ``CustomTextCLIP`` ones (``visual.*``, ``text.*``, ``logit_scale``,
``logit_bias``); :mod:`clipforge.checkpoints.openclip` moves a plain ``CLIP``'s top-level text keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import FamilyConfig
from .hf_tower import HFText
from .text_tower import OpenCLIPText
from .timm_tower import TimmTower
from .vit_tower import build_vit


#: State-dict prefixes of open_clip models that clipforge reads and writes back but does not compute
#: with: CoCa's caption decoder (``text_decoder.*``: a multimodal Transformer and its vocabulary head).
CARRIED_PREFIXES = ("text_decoder.",)


class FamilyCLIP(nn.Module):
    """Image and text towers of an open_clip family, projected into one embedding space; logits
    ``exp(logit_scale) * cos + logit_bias`` (SigLIP's learned bias; absent: ``logit_bias is None``)."""

    #: clipforge.fast leaves these towers as they are (its fast modules are OpenAI's CLIP's).
    fast_paths = False

    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        self.config = config
        m = config.model_cfg
        vision_cfg, text_cfg = m.get("vision_cfg", {}), m.get("text_cfg", {})
        quick = bool(m.get("quick_gelu", False))
        self.visual: nn.Module = TimmTower(vision_cfg, config.embed_dim) if vision_cfg.get("timm_model_name") \
            else build_vit(vision_cfg, config.embed_dim, quick)
        if text_cfg.get("hf_model_name"):
            if config.hf_text_config is None:
                raise ValueError(f"text_cfg.hf_model_name={text_cfg['hf_model_name']!r} needs the tower's "
                                 f"Hugging Face config.json (FamilyConfig.hf_text_config)")
            self.text: nn.Module = HFText(text_cfg, config.hf_text_config, config.embed_dim)
        else:
            self.text = OpenCLIPText(text_cfg, config.embed_dim, quick)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        bias = config.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None

    def carry(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Make room for the tensors of ``state_dict`` under :data:`CARRIED_PREFIXES` (CoCa's decoder):
        buffers of their shape and dtype under their own names (so ``state_dict()`` has open_clip's
        keys and a strict load fills them), not parameters (training leaves them as they are), never
        read by :meth:`forward`. Returns the keys carried."""
        keys = sorted(k for k in state_dict if k.startswith(CARRIED_PREFIXES))
        for key in keys:
            *path, leaf = key.split(".")
            holder: nn.Module = self
            for part in path:
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]  # type: ignore[assignment]
            t = state_dict[key]
            holder.register_buffer(leaf, torch.zeros(t.shape, dtype=torch.float32 if t.is_floating_point()
                                                      else t.dtype, device=self.logit_scale.device))
        return keys

    def carried(self) -> dict[str, torch.Tensor]:
        """The carried tensors (:meth:`carry`), by their open_clip names."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(CARRIED_PREFIXES)}

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
        """Images ``[B, 3, S, S]`` (already preprocessed) -> features ``[B, embed_dim]``."""
        x = self.visual(images.to(device=self.device, dtype=self.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``[B, L]`` (from the model's tokenizer) -> features ``[B, embed_dim]``."""
        x = self.text(ids.to(self.device))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(ids, normalize=True)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()

    def forward_intermediates(self, images: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                              attention: bool = False) -> dict[str, dict[str, object]]:
        """Per-layer outputs of either tower, where the tower offers them."""
        out: dict[str, dict[str, object]] = {}
        if images is not None:
            out["image"] = self.visual.forward_intermediates(  # type: ignore[operator]
                images.to(device=self.device, dtype=self.dtype), attention=attention)
        if ids is not None:
            out["text"] = self.text.forward_intermediates(ids.to(self.device), attention=attention)  # type: ignore[operator]
        return out

    # --- training helpers -----------------------------------------------------------------------
    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if isinstance(self.visual, TimmTower):
            self.visual.set_grad_checkpointing(enable)
        else:
            self.visual.transformer.grad_checkpointing = enable  # type: ignore[union-attr]
        if isinstance(self.text, OpenCLIPText):
            self.text.grad_checkpointing = enable
        elif enable:
            self.text.transformer.gradient_checkpointing_enable()  # type: ignore[union-attr,operator]

    def lock_image_tower(self) -> None:
        """Freeze the image tower (LiT); BatchNorm statistics are frozen too."""
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.visual.eval()
        self._image_locked = True

    def train(self, mode: bool = True) -> "FamilyCLIP":
        super().train(mode)
        if getattr(self, "_image_locked", False):
            self.visual.eval()
        return self

    def num_parameters(self) -> dict[str, int]:
        vis = sum(p.numel() for p in self.visual.parameters())
        txt = sum(p.numel() for p in self.text.parameters())
        return {"image": vis, "text": txt, "total": vis + txt + 1 + (self.logit_bias is not None)}


def create_family_model(config: FamilyConfig, *, seed: int | None = None) -> FamilyCLIP:
    """A randomly initialised family model (``seed``: reproducible without touching the global RNG)."""
    if seed is None:
        return FamilyCLIP(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FamilyCLIP(config)
