"""A Hugging Face ``transformers`` text tower (open_clip's ``HFTextEncoder``: XLM-R, BERT, mT5's
encoder, ...), built from a ``config.json`` only (``AutoModel.from_config``: no weights are ever
downloaded), pooled and projected as open_clip does; parameter names ``transformer.*`` / ``proj.*``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .deps import require

# The attribute of each HF config that holds the hidden width (open_clip's hf_configs).
WIDTH_ATTR = {"roberta": "hidden_size", "xlm-roberta": "hidden_size", "bert": "hidden_size",
              "mt5": "d_model", "t5": "d_model", "m2m_100": "d_model"}
DEFAULT_POOLER = {"roberta": "mean_pooler", "xlm-roberta": "mean_pooler", "bert": "cls_pooler",
                  "mt5": "mean_pooler", "t5": "mean_pooler", "m2m_100": "mean_pooler"}
POOLERS = ("mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler")


class HFText(nn.Module):
    """``transformer`` (the HF model) -> pooled hidden states -> ``proj`` (none, linear or MLP)."""

    #: ``precision.cast_weights`` casts a Hugging Face model whole (its embeddings feed its Linears).
    cast_whole = True

    def __init__(self, text_cfg: dict[str, Any], hf_config: dict[str, Any], embed_dim: int) -> None:
        super().__init__()
        transformers = require("transformers", "a Hugging Face text tower")
        model_type = hf_config.get("model_type")
        if model_type not in WIDTH_ATTR:
            raise ValueError(f"Hugging Face text tower of model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(sorted(WIDTH_ATTR))})")
        cfg = transformers.AutoConfig.for_model(**hf_config)
        self.pooler_type = text_cfg.get("hf_pooler_type") or DEFAULT_POOLER[model_type]
        if self.pooler_type not in POOLERS:
            raise ValueError(f"text_cfg.hf_pooler_type={self.pooler_type!r} is not one of {', '.join(POOLERS)}")
        if getattr(cfg, "is_encoder_decoder", False):
            self.transformer = transformers.AutoModel.from_config(cfg).encoder
        else:
            self.transformer = transformers.AutoModel.from_config(
                cfg, add_pooling_layer=self.pooler_type == "cls_pooler")
        self.pad_id = int(cfg.pad_token_id)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0))
        width = int(getattr(cfg, WIDTH_ATTR[model_type]))
        proj = text_cfg.get("hf_proj_type", "mlp")
        if width == embed_dim and proj is None:
            self.proj: nn.Module = nn.Identity()
        elif proj == "linear":
            self.proj = nn.Linear(width, embed_dim, bias=False)
        elif proj == "mlp":
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, embed_dim, bias=False))
        else:
            raise ValueError(f"text_cfg.hf_proj_type={proj!r} is not one of linear|mlp (or null when the "
                             f"widths are equal)")

    def pool(self, out: Any, mask: torch.Tensor) -> torch.Tensor:  # -> [B, W]
        h = out.last_hidden_state  # [B, L, W]
        if self.pooler_type == "mean_pooler":
            return (h * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True)
        if self.pooler_type == "max_pooler":  # open_clip's: fills where the mask is 1 (as released)
            return h.masked_fill(mask.unsqueeze(-1).bool(), -torch.inf).max(1).values
        if self.pooler_type == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return h[:, 0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        if ids.dim() != 2:
            raise ValueError(f"text ids must be [batch, length], got shape {tuple(ids.shape)}")
        mask = (ids != self.pad_id).long()
        return self.proj(self.pool(self.transformer(input_ids=ids, attention_mask=mask), mask))

    def forward_intermediates(self, ids: torch.Tensor, attention: bool = False) -> dict[str, object]:
        mask = (ids != self.pad_id).long()
        out = self.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                               output_attentions=attention)
        return {"tokens": list(out.hidden_states[1:]), "attentions": list(out.attentions or []),
                "output": self.proj(self.pool(out, mask))}
