"""Training tests run single-threaded: their models are tiny (threads buy nothing), and on a CPU
shared with other jobs several OpenMP threads wait on each other for whole time slices
(measured 3x slower here)."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> str:
    """The micro ViT config as a CLIPConfig JSON file (what ``TrainConfig.model`` takes)."""
    path = tmp_path_factory.mktemp("cfg") / "micro.json"
    path.write_text(micro_config("vit").to_json())
    return str(path)
