"""Walking image folders that may hold hostile entries: a FIFO or device named ``x.jpg`` (opening
it would block forever), symlinked directories that loop (``sub/loop -> ..``), and names that
are not valid UTF-8 (Python hands them over with surrogate escapes; they must survive to the
metadata written later, see :func:`text_name`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from ..utils.names import text_name
from .skip import SkipStats

_KINDS = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"))


def file_kind(mode: int) -> str:
    """A short name of what a non-regular ``st_mode`` is (for skip reasons and errors)."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def walk_files(root: str | Path, suffixes: Iterable[str], stats: SkipStats | None = None) -> list[Path]:
    """Files under ``root`` (recursive, symlinks followed) whose lower-case suffix is in ``suffixes``,
    sorted by their relative POSIX path. Hidden entries (``.name``) are ignored.

    Never opens anything. Entries with a wanted suffix that are not regular files (FIFO, socket,
    device), dangling links and unreadable directories are counted in ``stats`` by reason. Each
    directory (``(st_dev, st_ino)``) is walked once: real directories first, then symlinked ones
    whose target was not walked yet, so ``sub/loop -> ..`` adds nothing."""
    root = Path(root)
    want = {s.lower() for s in suffixes}
    stats = stats if stats is not None else SkipStats(log_first=0)
    found: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()
    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    stack: list[tuple[Path, str]] = [(root, "")]
    links: list[tuple[Path, str, tuple[int, int]]] = []  # symlinked directories, walked after the real ones
    while stack or links:
        if not stack:
            path, sub, ident = links.pop(0)
            if ident in seen:
                stats.add("directory_seen", text_name(sub), "a symlink to a directory walked already")
            else:
                seen.add(ident)
                stack.append((path, sub))
            continue
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            stats.add("unreadable_dir", text_name(rel or "."), f"{type(e).__name__}: {e.strerror or e}")
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            sub = f"{rel}/{e.name}" if rel else e.name
            wanted = os.path.splitext(e.name)[1].lower() in want
            try:
                st = e.stat()  # follows symlinks
            except OSError as err:
                if wanted or e.is_symlink():
                    stats.add("broken_link" if e.is_symlink() else "unreadable_file", text_name(sub),
                              err.strerror or str(err))
                continue
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if e.is_symlink():
                    links.append((Path(e.path), sub, ident))
                elif ident not in seen:  # (a bind mount could show one directory twice)
                    seen.add(ident)
                    stack.append((Path(e.path), sub))
            elif wanted:
                if stat.S_ISREG(st.st_mode):
                    found.append((sub, Path(e.path)))
                else:
                    stats.add("not_regular_file", text_name(sub), file_kind(st.st_mode))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]
