"""Writing output WebDataset shards atomically: members go into a temporary sibling that is
renamed over the target only when the shard is complete, so a killed run never leaves a
truncated shard that a later step or the training loader would read."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

from ..data.shards import IMAGE_EXTS
from ..utils import atomic_open

_FIRST = {e: k for k, e in enumerate(IMAGE_EXTS)} | {"txt": 10, "json": 11}


def member_order(files: dict[str, bytes | None]) -> list[str]:
    """Image first, then txt, json, then other members by name (img2dataset's order)."""
    return sorted((e for e, b in files.items() if b is not None), key=lambda e: (_FIRST.get(e, 99), e))


class ShardWriter:
    """Context manager writing samples to one tar shard; creates no file when nothing was written.

    Members get mtime 0 and uid/gid 0, so re-running a step produces byte-identical shards.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.count = 0
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> "ShardWriter":
        return self

    def _open(self) -> None:
        self._stack = contextlib.ExitStack()
        f = self._stack.enter_context(atomic_open(self.path, "wb"))
        self._tar = tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT)

    def write(self, key: str, files: dict[str, bytes | None]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext in member_order(files):
            data = files[ext]
            assert data is not None
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._stack is None:
            return
        try:
            if exc_type is None and self._tar is not None:
                self._tar.close()
        finally:
            self._stack.__exit__(exc_type, exc, tb)  # renames on success, deletes the temp file on error
