"""Fixtures: small pools for the curation steps, and run options without progress bars."""

from __future__ import annotations

import pytest

from clipforge.curation import RunOptions


@pytest.fixture
def opts():
    def make(**kw) -> RunOptions:
        kw.setdefault("progress", False)
        kw.setdefault("poll_interval", 0.05)
        kw.setdefault("wait_timeout", 60.0)
        return RunOptions(**kw)

    return make
