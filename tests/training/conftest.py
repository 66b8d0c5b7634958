"""Training tests run single-threaded: their models are tiny (threads buy nothing), and on a CPU
shared with other jobs several OpenMP threads wait on each other for whole time slices
(measured 3x slower here)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
