"""open_clip's model families beyond OpenAI's CLIP (SigLIP / SigLIP2, EVA02, ConvNeXt, MobileCLIP,
PE-Core, CoCa's contrastive towers (its decoder carried), Hugging Face text towers), behind our model interface.

Built on the libraries made for them, as open_clip is: ``timm`` for image towers, ``transformers``
for HF text towers, ``tokenizers`` / ``sentencepiece`` for their tokenizers (the ``families``
extra); a missing one is named in one line (:class:`MissingDependency`). open_clip's own text and
ViT towers are ours (:mod:`.text_tower`, :mod:`.vit_tower`, on :mod:`clipforge.models.layers`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..tokenizer import get_tokenizer
from .config import FamilyConfig, is_family_dict
from .deps import EXTRA, MissingDependency
from .model import CARRIED_PREFIXES, FamilyCLIP, create_family_model
from .tokenizers import FolderTokenizer, clean, tokenizer_files


def tokenizer_for(model: nn.Module) -> Any:
    """The tokenizer that made the ids ``model`` was trained on: a family model's own (read from
    its checkpoint folder), else OpenAI's BPE at the model's context length."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok
    cfg = getattr(model, "config", None)
    if isinstance(cfg, FamilyConfig) and cfg.tokenizer.get("kind") != "openai-bpe":
        raise ValueError("this family model has no tokenizer attached: load it from its checkpoint folder "
                         "(the tokenizer files sit beside the weights)")
    return get_tokenizer(model.context_length)  # type: ignore[arg-type]


__all__ = ["CARRIED_PREFIXES", "FamilyConfig", "FamilyCLIP", "create_family_model", "FolderTokenizer", "MissingDependency", "EXTRA",
           "clean", "is_family_dict", "tokenizer_files", "tokenizer_for"]
