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

from collections.abc import Mapping

import torch
from torch import nn

from ..config import CLIPConfig
from ..models import DualEncoder
from ..models.siglip import SigLIPTextTransformer, SigLIPVisionTransformer
from .config import FamilyConfig
from .hf_tower import HFText
from .native_siglip import native_siglip_config
from .text_tower import OpenCLIPText
from .timm_tower import TimmTower
from .vit_tower import build_vit


#: State-dict prefixes of open_clip models that clipforge reads and writes back but does not compute
#: with: CoCa's caption decoder (``text_decoder.*``: a multimodal Transformer and its vocabulary head).
CARRIED_PREFIXES = ("text_decoder.",)


class FamilyCLIP(DualEncoder):
    """Image and text towers of an open_clip family, projected into one embedding space; logits
    ``exp(logit_scale) * cos + logit_bias`` (SigLIP's learned bias; absent: ``logit_bias is None``).
    Encoders, ``forward`` and the training helpers are :class:`~clipforge.models.DualEncoder`'s, as
    for our own CLIP; this class builds the towers (dtype and device: ``logit_scale``'s)."""

    #: clipforge.fast leaves timm / transformers / open_clip-variant towers as they are; a model on
    #: the native SigLIP towers takes the fast layer (``fast_paths`` True on the instance).
    fast_paths = False

    def __init__(self, config: FamilyConfig, *, native: bool = True) -> None:
        """``native``: build a SigLIP config the native towers compute exactly on them
        (:func:`~clipforge.families.native_siglip.native_siglip_config`: no timm, the fast layer
        applies, state dict keys of :class:`~clipforge.models.CLIP`'s SigLIP towers); ``False`` or
        any other config: timm / open_clip's towers under open_clip's keys."""
        super().__init__()
        self.config = config
        m = config.model_cfg
        vision_cfg, text_cfg = m.get("vision_cfg", {}), m.get("text_cfg", {})
        quick = bool(m.get("quick_gelu", False))
        self.native_config: CLIPConfig | None = native_siglip_config(config) if native else None
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        bias = config.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None
        if self.native_config is not None:
            self.visual = SigLIPVisionTransformer(self.native_config)
            self.text = SigLIPTextTransformer(self.native_config)
            self.fast_paths = True
            return
        self.visual = TimmTower(vision_cfg, config.embed_dim) if vision_cfg.get("timm_model_name") \
            else build_vit(vision_cfg, config.embed_dim, quick)
        if text_cfg.get("hf_model_name"):
            if config.hf_text_config is None:
                raise ValueError(f"text_cfg.hf_model_name={text_cfg['hf_model_name']!r} needs the tower's "
                                 f"Hugging Face config.json (FamilyConfig.hf_text_config)")
            self.text = HFText(text_cfg, config.hf_text_config, config.embed_dim)
        else:
            self.text = OpenCLIPText(text_cfg, config.embed_dim, quick)

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

    # --- training helpers (the rest of the interface and computation: DualEncoder's) -----------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if isinstance(self.visual, TimmTower):
            self.visual.set_grad_checkpointing(enable)
        else:  # ours: open_clip's / CoCa's ViT, the native SigLIP tower
            self.visual.transformer.grad_checkpointing = enable  # type: ignore[union-attr]
        if isinstance(self.text, SigLIPTextTransformer):
            self.text.transformer.grad_checkpointing = enable  # type: ignore[union-attr]
        elif isinstance(self.text, OpenCLIPText):
            self.text.grad_checkpointing = enable
        elif enable:
            self.text.transformer.gradient_checkpointing_enable()  # type: ignore[union-attr,operator]


def create_family_model(config: FamilyConfig, *, seed: int | None = None) -> FamilyCLIP:
    """A randomly initialised family model (``seed``: reproducible without touching the global RNG)."""
    if seed is None:
        return FamilyCLIP(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FamilyCLIP(config)
