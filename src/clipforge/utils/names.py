"""File names as text: a name whose bytes are not UTF-8 reaches Python with surrogate escapes,
which Parquet, strict JSON and a UTF-8 stdout all refuse. :func:`text_name` gives the one printable,
storable spelling; :func:`fs_name` turns it back into the name ``open`` needs."""

from __future__ import annotations

import os
import re


def text_name(name: str) -> str:
    """``name`` as valid, printable UTF-8 text: unchanged when it is; otherwise (a file name
    whose bytes are not UTF-8, held with surrogate escapes) each undecodable byte becomes
    ``\\xNN``. Used for keys and paths in Parquet/JSON (which need UTF-8) and in messages;
    :func:`fs_name` reverses it."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


_ESCAPED = re.compile(r"\\x([89a-f][0-9a-f])")


def fs_name(text: str) -> str:
    """The file system name that :func:`text_name` wrote as ``text`` (surrogate-escaped str,
    ready for ``open``). ``\\xNN`` sequences of bytes >= 0x80 are read back as those bytes when
    the result is not valid UTF-8 (so a valid name that merely contains such text stays as it is)."""
    if "\\x" not in text:
        return text
    raw = _ESCAPED.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)
    data = os.fsencode(raw)
    try:
        data.decode("utf-8")
        return text  # the escapes spell valid UTF-8: the name held them literally
    except UnicodeDecodeError:
        return os.fsdecode(data)
