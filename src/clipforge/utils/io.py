"""Atomic writes: a file is written to a temporary sibling, fsynced, then renamed over the
target, so a crash or kill never leaves a half-written checkpoint, shard or report behind.
JSON goes through :func:`jsonable` (the one NumPy/path -> JSON conversion), so it is strict JSON."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on clean exit it replaces ``path`` atomically. On
    any error the temporary file is removed; an ``OSError`` of a write (a full disk) gets ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode(path))  # mkstemp's 0600 would hide run folders from other users
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # a failed write (ENOSPC...) names no file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), since
    ``os.umask`` can only be read by setting it, which races with other threads."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """What ``open(path, "w")`` would give: the existing file's mode, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``jsonable(obj)`` atomically (keys keep their natural order, not sorted)."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=indent, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such JSON file: {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed; a torn last line is the worst a crash can leave)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        f.flush()


def jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON values, recursively: NumPy scalars and arrays as Python numbers and
    lists, paths as strings, tuples as lists, dict keys as strings, NaN/inf as None (JSON has no
    NaN; ``json.dumps`` would write a token other readers reject). Anything else unknown is a
    ``TypeError`` naming its type."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
