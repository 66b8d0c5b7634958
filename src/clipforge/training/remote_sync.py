"""Copies of a run folder on other storage (open_clip's ``--remote-sync``): any fsspec URL
(``s3://``, ``gs://``, ``memory://`` ...) or a local path, so a run on a machine that may vanish
can be resumed elsewhere.

open_clip syncs every ``--remote-sync-frequency`` seconds from a background process; here the
copy runs on the training thread at step boundaries (every checkpoint, or every N steps, and at
the end), so what the remote holds after a given step does not depend on timing. Only finished
files are copied (temporaries of atomic writes, dot-files, are not), each written to a temporary
remote name and then moved onto its own: a reader of the remote never sees half a file.
Checkpoints pruned locally (``keep_last``) are removed from the remote too.

:func:`pull_run` is the way back: the run's records and its newest checkpoint copied from the
remote into a local folder, from which ``--resume`` continues.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..data.remote import local_path, require_fsspec
from ..utils import atomic_open

PROTOCOLS = ("fsspec",)
CHECKPOINTS = "checkpoints"


def _fs(remote: str) -> tuple[Any, str]:
    """``(filesystem, root path)`` of a URL or local path (local paths through fsspec's ``file``)."""
    fsspec = require_fsspec(remote)
    local = local_path(remote)
    try:
        return fsspec.core.url_to_fs(os.path.abspath(local) if local is not None else remote)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing (s3fs, gcsfs)
        raise ValueError(f"remote_sync {remote}: {e}") from None


def _local_files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of the finished files (no dot-files: temporaries)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = p.stat()
            out[rel.as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


class RemoteSync:
    """Mirrors ``run_dir``'s finished files to ``remote`` when :meth:`sync` is called."""

    def __init__(self, run_dir: str | Path, remote: str) -> None:
        self.run_dir, self.remote = Path(run_dir), remote
        self.fs, self.root = _fs(remote)
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise ValueError(f"remote_sync {remote}: cannot create it ({e})") from None
        self._synced: dict[str, tuple[int, int]] = {}
        self.copies = 0  # files copied so far (for tests and the summary)

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def _put(self, rel: str) -> None:
        final = self._path(rel)
        head, _, name = final.rpartition("/")
        tmp = f"{head}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        self.fs.makedirs(head, exist_ok=True)
        try:
            self.fs.put_file(str(self.run_dir / rel), tmp)
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def sync(self) -> list[str]:
        """Copy the files that are new or changed since the last sync; drop remote checkpoints that
        were pruned here. Returns the copied relative paths."""
        files = _local_files(self.run_dir)
        copied = []
        for rel, sig in files.items():
            if self._synced.get(rel) == sig:
                continue
            if rel.startswith(CHECKPOINTS + "/") and rel not in self._synced and self.fs.exists(self._path(rel)) \
                    and self.fs.size(self._path(rel)) == sig[0]:
                self._synced[rel] = sig  # a checkpoint is never rewritten: already there (an earlier process)
                continue
            self._put(rel)
            self._synced[rel] = sig
            copied.append(rel)
        ckpt_dir = self._path(CHECKPOINTS)
        if self.fs.isdir(ckpt_dir):
            for p in self.fs.ls(ckpt_dir, detail=False):
                name = str(p).rstrip("/").rpartition("/")[2]
                rel = f"{CHECKPOINTS}/{name}"
                if not name.startswith(".") and rel not in files:
                    self.fs.rm(str(p))
                    self._synced.pop(rel, None)
        self.copies += len(copied)
        return copied


def pull_run(remote: str, run_dir: str | Path) -> Path:
    """Copy a run folder synced to ``remote`` into ``run_dir`` (records and the newest checkpoint
    only; each file written atomically) so that ``--resume run_dir`` continues it."""
    fs, root = _fs(remote)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/config.json"):
        raise FileNotFoundError(f"--resume {remote}: no config.json there (not a synced training run)")
    paths = [str(p) for p in fs.find(root)]
    rels = [p[len(root) + 1:] for p in paths if p.startswith(root + "/")]
    rels = [r for r in rels if not any(part.startswith(".") for part in r.split("/"))]
    ckpts = sorted(r for r in rels if r.startswith(CHECKPOINTS + "/step_"))
    if not ckpts:
        raise FileNotFoundError(f"--resume {remote}: no checkpoints in {remote}/{CHECKPOINTS}")
    wanted = [r for r in rels if not r.startswith(CHECKPOINTS + "/")] + [ckpts[-1]]
    run_dir = Path(run_dir)
    for rel in wanted:
        with fs.open(f"{root}/{rel}", "rb") as src, atomic_open(run_dir / rel, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return run_dir


def has_checkpoints(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / CHECKPOINTS).glob("step_*.pt"))


def is_url(text: str) -> bool:
    """A remote location (``scheme://...`` other than ``file://``), not a local folder."""
    return "://" in str(text) and local_path(str(text)) is None


__all__ = ["RemoteSync", "pull_run", "is_url", "has_checkpoints", "PROTOCOLS"]
