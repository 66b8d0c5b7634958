"""Opening shards by name, wherever they live: local paths, ``file://``, ``http(s)://`` URLs,
``pipe:CMD`` (a shell command's stdout for reading, its stdin for writing, as in WebDataset)
and any other fsspec URL (``s3://``, ``gs://``, ``memory://`` ...).

Reads are sequential streams (never a seek, never a download to disk), so a tar shard can be
consumed member by member while it arrives. ``http(s)`` uses the standard library (no extra
needed); other URL schemes need ``fsspec`` and its protocol package (``pip install
clipforge[remote]``; ``s3fs`` / ``gcsfs`` for ``s3://`` / ``gs://``). Opening a URL is retried
on transient failures; a URL that stays unreachable raises :class:`ShardOpenError` naming it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO, Iterator

from ..utils import atomic_open

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a shard folder's listing keeps

logger = logging.getLogger("clipforge.data")

REMOTE_EXTRA = "remote"
#: Seconds to wait before each retry of a failed open (len = number of retries).
RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0)
HTTP_TIMEOUT = 60.0
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")  # two+ letters: "C:/x" is a Windows path


class ShardOpenError(OSError):
    """A shard (URL, command or file) cannot be opened or read; the message names it."""


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing; the message names the extra to install.
    (A ValueError too, so the CLI reports it as one line.)"""


def scheme(name: str) -> str:
    """``"pipe"``, a URL scheme (``"http"``, ``"s3"``, ``"file"`` ...) or ``""`` for a local path."""
    if name.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(name)
    return m.group(1).lower() if m else ""


def is_remote(name: str) -> bool:
    """True for names that are not plain local files (``file://`` counts as local)."""
    return scheme(name) not in ("", "file")


def local_path(name: str) -> str | None:
    """The filesystem path of a local name (``~`` expanded, ``file://`` stripped), else None."""
    s = scheme(name)
    if s == "":
        return os.path.expanduser(name)
    if s == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(name).path)
    return None


def require_fsspec(name: str) -> Any:
    """The ``fsspec`` module, or :class:`MissingExtraError` naming the extra to install."""
    try:
        import fsspec
    except ImportError:
        raise MissingExtraError(f"{name}: {scheme(name)}:// URLs need fsspec: "
                                f"pip install 'clipforge[{REMOTE_EXTRA}]'") from None
    return fsspec


def _fsspec_call(name: str, fn: Any) -> Any:
    """Run ``fn`` turning fsspec's "install s3fs" ImportError into a one-line error."""
    try:
        return fn()
    except ImportError as e:
        raise MissingExtraError(f"{name}: {e} (pip install 'clipforge[{REMOTE_EXTRA}]' plus the protocol "
                                f"package, e.g. s3fs for s3://, gcsfs for gs://)") from None


class _Permanent(Exception):
    """An open failure not worth retrying (HTTP 404, file not found)."""


def _retrying(name: str, what: str, attempt: Any, retries: tuple[float, ...] | None) -> Any:
    """``attempt()`` with retries on transient errors; raises ShardOpenError naming ``name``.
    ``attempt`` raises ``_Permanent`` for errors not worth retrying."""
    delays = RETRY_DELAYS if retries is None else retries
    for k in range(len(delays) + 1):
        try:
            return attempt()
        except _Permanent as e:
            raise ShardOpenError(f"{name}: {e}") from None
        except (OSError, ConnectionError, TimeoutError) as e:
            if isinstance(e, ShardOpenError):
                raise
            reason = getattr(e, "reason", None) or e
            if k == len(delays):
                raise ShardOpenError(f"{name}: {what} failed after {k + 1} attempt(s): {reason}") from None
            logger.warning("%s: %s failed (%s); retry %d of %d in %.1fs", name, what, reason, k + 1,
                           len(delays), delays[k])
            time.sleep(delays[k])
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- reading
@contextlib.contextmanager
def open_stream(name: str, *, retries: tuple[float, ...] | None = None) -> Iterator[BinaryIO]:
    """A sequential binary stream of ``name`` (path, ``file://``, ``http(s)://``, ``pipe:CMD``
    or fsspec URL). Opening is retried (``retries``: delays, default :data:`RETRY_DELAYS`)."""
    s = scheme(name)
    local = local_path(name)
    if local is not None:
        if not os.path.exists(local):
            raise FileNotFoundError(f"shard not found: {name}")
        with open(local, "rb") as f:
            yield f
    elif s == "pipe":
        with _pipe_reader(name) as f:
            yield f
    elif s in ("http", "https"):
        resp = _retrying(name, "GET", lambda: _http_open(name), retries)
        with resp:
            yield resp
    else:
        fsspec = require_fsspec(name)
        of = _fsspec_call(name, lambda: fsspec.open(name, "rb"))

        def attempt() -> Any:
            try:
                return of.open()
            except FileNotFoundError as e:
                raise _Permanent(f"not found ({e})") from None

        f = _retrying(name, "open", attempt, retries)
        with f:
            yield f


def _http_open(url: str) -> Any:
    req = urllib.request.Request(url, headers={"User-Agent": "clipforge"})
    try:
        return urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)  # noqa: S310 (the user's own URL)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in _TRANSIENT_HTTP:
            raise OSError(f"HTTP {e.code} {e.reason}") from None
        raise _Permanent(f"HTTP {e.code} {e.reason}") from None


@contextlib.contextmanager
def _pipe_reader(name: str) -> Iterator[BinaryIO]:
    """stdout of ``pipe:CMD``. On a normal exit the rest of the output (tar padding) is drained
    and a non-zero exit status raises; when the reader stops early the command is killed."""
    cmd = name[len("pipe:"):].strip()
    if not cmd:
        raise ValueError(f"{name!r}: empty pipe: command")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=err)  # noqa: S602 (user command)
        assert proc.stdout is not None
        try:
            yield proc.stdout  # type: ignore[misc]
        except GeneratorExit:
            _kill(proc)
            raise
        except BaseException as e:
            # The stream failed. Closing our end stops a command still writing (SIGPIPE: a negative
            # status); a command that failed on its own exited >0, and that is the error to report.
            proc.stdout.close()
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                rc = None
            _kill(proc)
            if rc is not None and rc > 0:
                raise ShardOpenError(f"{name}: command exited with status {rc}{_tail(err)}") from e
            raise
        else:
            while proc.stdout.read(1 << 16):
                pass
            rc = proc.wait()
            if rc:
                raise ShardOpenError(f"{name}: command exited with status {rc}{_tail(err)}")
        finally:
            proc.stdout.close()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _tail(err: Any) -> str:
    err.seek(0)
    lines = err.read().decode("utf-8", errors="replace").strip().splitlines()
    return f": {lines[-1]}" if lines else ""


def read_small(name: str) -> bytes | None:
    """The bytes of a small side file (``_stats.json``, ``.parquet``, ``classnames.txt``), or
    None when it does not exist or cannot be fetched (no retries: side files are optional)."""
    s = scheme(name)
    local = local_path(name)
    try:
        if local is not None:
            with open(local, "rb") as f:
                return f.read()
        if s == "pipe":
            return None
        if s in ("http", "https"):
            with _http_open(name) as r:
                return r.read()
        fsspec = require_fsspec(name)
        with _fsspec_call(name, lambda: fsspec.open(name, "rb")) as f:
            return f.read()
    except (OSError, _Permanent, ValueError):
        return None


def sibling(name: str, filename: str) -> str | None:
    """The name of ``filename`` in the same folder as shard ``name`` (None for ``pipe:``)."""
    if scheme(name) == "pipe":
        return None
    head, _, _ = name.rpartition("/")
    return f"{head}/{filename}" if head else filename


# ----------------------------------------------------------------------------- writing
@contextlib.contextmanager
def create_stream(name: str) -> Iterator[BinaryIO]:
    """A binary stream that becomes ``name`` only when the block exits without error: local
    paths and ``file://`` are written atomically (temporary sibling + rename), fsspec URLs are
    discarded on error, ``pipe:CMD`` feeds the command's stdin (its exit status is checked)."""
    s = scheme(name)
    local = local_path(name)
    if local is not None:
        with atomic_open(local, "wb") as f:
            yield f
    elif s == "pipe":
        with _pipe_writer(name) as f:
            yield f
    elif s in ("http", "https"):
        raise ValueError(f"{name}: cannot write to an http(s) URL; use an fsspec URL (s3://, gs://) or "
                         f"pipe:CMD (e.g. pipe:curl -T - URL)")
    else:
        fsspec = require_fsspec(name)
        of = _fsspec_call(name, lambda: fsspec.open(name, "wb", auto_mkdir=True))
        f = of.open()
        try:
            yield f
        except BaseException:
            discard = getattr(f, "discard", None)
            if callable(discard):
                discard()
            else:
                f.close()
                with contextlib.suppress(Exception):
                    of.fs.rm(of.path)
            raise
        else:
            f.close()


@contextlib.contextmanager
def _pipe_writer(name: str) -> Iterator[BinaryIO]:
    cmd = name[len("pipe:"):].strip()
    if not cmd:
        raise ValueError(f"{name!r}: empty pipe: command")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.PIPE, stderr=err)  # noqa: S602 (user command)
        assert proc.stdin is not None
        try:
            yield proc.stdin  # type: ignore[misc]
        except BaseException:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            _kill(proc)
            raise
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = proc.wait()
        if rc:
            raise ShardOpenError(f"{name}: command exited with status {rc}{_tail(err)}")


def write_small(name: str, data: bytes) -> None:
    """Write a small side file (atomically where the storage allows); ``pipe:`` has none."""
    if scheme(name) == "pipe":
        return
    with create_stream(name) as f:
        f.write(data)


def list_remote(pattern: str) -> list[str]:
    """fsspec URLs matching a glob ``pattern`` or, for a folder URL, its ``.tar`` files (sorted,
    with the pattern's scheme kept)."""
    fsspec = require_fsspec(pattern)
    fs, path = _fsspec_call(pattern, lambda: fsspec.core.url_to_fs(pattern))
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    else:
        try:
            found = [p for p in fs.ls(path, detail=False) if str(p).lower().endswith(TAR_SUFFIXES)]
        except FileNotFoundError:
            found = []
    return sorted(fs.unstrip_protocol(str(p)) for p in found)

