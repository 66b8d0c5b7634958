"""Fixtures of the multi-node tests: a process tracker that never leaves a launch running."""

from __future__ import annotations

import sys

import pytest
from distributed.multinode import Launches


@pytest.fixture
def launches(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the multi-node tests read /proc and use FIFOs (Linux)")
    tracker = Launches(tmp_path / "logs")
    yield tracker
    tracker.close()
