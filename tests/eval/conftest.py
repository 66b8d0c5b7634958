"""Evaluation test fixtures. Test double: an "oracle" CLIP whose towers map a class to a one-hot vector.

``OracleCLIP`` has the interface evaluation uses (``encode_image``, ``encode_text``,
``config.preprocess``, ``context_length``, ``device``, ``logit_scale``). Images are solid colours whose red
value encodes the class; texts are one-hot on the class whose name token they contain. A
correct zero-shot pipeline must therefore score 100%; a pipeline that mixes up prompt order,
class order or ensembling cannot.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipforge.tokenizer import get_tokenizer

from conftest import micro_config

# Single-BPE-token words that occur in no built-in template.
ORACLE_CLASSES = ["zebra", "violin", "pizza", "castle", "banana", "tiger"]


def class_image(c: int, size: int = 40, noise: int = 0, seed: int = 0) -> Image.Image:
    """A solid image whose red channel is 20 + 35*c (green/blue random if ``noise``)."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[..., 0] = 20 + 35 * c
    if noise:
        a[..., 1:] = rng.integers(0, 255, (size, size, 2), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


class OracleCLIP(nn.Module):
    def __init__(self, classnames: list[str] = ORACLE_CLASSES, dim: int = 32) -> None:
        super().__init__()
        self.config = micro_config("vit")
        self.dim = dim
        tok = get_tokenizer()
        ids = []
        for name in classnames:
            enc = tok.encode(name)
            assert len(enc) == 1, f"{name!r} must be one BPE token"
            ids.append(enc[0])
        self.register_buffer("class_tokens", torch.tensor(ids))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.text_calls = 0
        self.image_calls = 0

    @property
    def context_length(self) -> int:
        return 77

    @property
    def device(self) -> torch.device:
        return self.class_tokens.device

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.text_calls += 1
        hit = (ids[:, :, None] == self.class_tokens[None, None, :]).any(dim=1).float()  # [B, C]
        out = torch.full((ids.shape[0], self.dim), 1e-3)
        out[:, : hit.shape[1]] += hit
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.image_calls += 1
        mean, std = self.config.preprocess.mean[0], self.config.preprocess.std[0]
        red = (x[:, 0].mean(dim=(1, 2)) * std + mean) * 255
        cls = torch.round((red - 20) / 35).long().clamp(0, self.dim - 1)
        out = torch.full((x.shape[0], self.dim), 1e-3)
        out[torch.arange(x.shape[0]), cls] += 1
        return F.normalize(out, dim=-1) if normalize else out


@pytest.fixture
def oracle_kit():
    """The oracle test double: ``kit.OracleCLIP``, ``kit.class_image``, ``kit.CLASSES``."""
    return SimpleNamespace(OracleCLIP=OracleCLIP, class_image=class_image, CLASSES=list(ORACLE_CLASSES))
