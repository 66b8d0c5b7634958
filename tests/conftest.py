"""Shared test fixtures: tiny models, and the real data in ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLIPFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (real Flickr8k, CIFAR-10, MNIST, ImageNet samples); skips if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def micro_config(kind: str = "vit", activation: str = "quick_gelu"):
    """A very small model config for fast tests (real vocabulary and context length)."""
    from clipforge.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig

    if kind == "vit":
        vision = VisionConfig(kind="vit", image_size=32, width=64, layers=2, heads=2, patch_size=8)
    else:
        vision = VisionConfig(kind="resnet", image_size=64, width=16, layers=[1, 1, 1, 1], heads=8)
    return CLIPConfig(embed_dim=32, vision=vision, text=TextConfig(width=64, heads=2, layers=2),
                      activation=activation, preprocess=PreprocessConfig(image_size=vision.image_size),
                      name=f"micro-{kind}")


@pytest.fixture
def micro_vit():
    from clipforge.models import create_model

    return create_model(micro_config("vit"), seed=0).eval()


@pytest.fixture
def micro_rn():
    from clipforge.models import create_model

    return create_model(micro_config("resnet"), seed=0).eval()
