"""Reading CSV / TSV / JSONL manifests into rows, with errors that name the file and line,
and case-insensitive column auto-detection shared by pair and labelled manifests."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Sequence

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")

IMAGE_COLUMNS = ("image", "filepath", "path", "file", "image_path", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "captions", "sentence")
LABEL_COLUMNS = ("label", "class", "cls", "target", "class_index", "labels", "category", "y")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions / JSON lists in a cell


def is_manifest(spec: str) -> bool:
    return spec.lower().endswith(MANIFEST_SUFFIXES)


SNIFF_DELIMITERS = ("\t", ",", ";", "|")  # tie order: tab first, open_clip_train's default


def parse_separator(sep: str | None) -> str | None:
    """A CSV separator as typed on a command line (``\\t``, ``tab``, ``,`` ...) as one character."""
    if sep is None or sep == "":
        return None
    named = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
    sep = named.get(sep.lower(), sep)
    if len(sep) != 1:
        raise ValueError(f"csv separator must be one character (or \\t / tab), got {sep!r}")
    return sep


def sniff_delimiter(header_line: str) -> str:
    """The delimiter of a manifest's header line: the most frequent of :data:`SNIFF_DELIMITERS`
    outside double quotes (``,`` when none occurs: a one-column file)."""
    counts = dict.fromkeys(SNIFF_DELIMITERS, 0)
    quoted = False
    for c in header_line:
        if c == '"':
            quoted = not quoted
        elif not quoted and c in counts:
            counts[c] += 1
    best = max(SNIFF_DELIMITERS, key=lambda d: counts[d])  # max keeps the first of equal counts
    return best if counts[best] else ","


def read_rows(path: str | Path, separator: str | None = None
              ) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """All rows of a manifest as ``(line_number, row)``, plus the column names.

    ``separator`` (open_clip's ``--csv-separator``) splits CSV / TSV lines; by default ``.tsv``
    is tab-separated and a ``.csv`` file's delimiter is sniffed from its header line (tab,
    comma, semicolon or bar: open_clip's tab-separated ``.csv`` files work as they are).
    Quoting follows the CSV standard, except that a default ``.tsv`` is read unquoted (IANA
    TSV: captions may contain ``"``). JSONL lines must be JSON objects (blank lines are
    ignored). A row with more fields than the header is an error (an unquoted separator inside
    a caption). Raises FileNotFoundError / ValueError naming the file (and line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix not in (".csv", ".tsv"):
        raise ValueError(f"{p}: unsupported manifest type {suffix!r} (use .csv, .tsv or .jsonl)")
    sep = parse_separator(separator)
    with open(p, newline="", encoding="utf-8-sig") as f:
        if sep is None and suffix == ".tsv":
            sep, quoting = "\t", csv.QUOTE_NONE
        else:
            if sep is None:
                sep = sniff_delimiter(f.readline())
                f.seek(0)
            quoting = csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=sep, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{p}: empty manifest (no header line)") from None
        except csv.Error as e:
            raise ValueError(f"{p}: line 1: {e}") from None
        header = [h.strip() for h in header]
        rows: list[tuple[int, dict[str, Any]]] = []
        try:
            for values in reader:
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) > len(header):
                    raise ValueError(
                        f"{p}: line {reader.line_num}: {len(values)} {_sep_name(sep)}-separated fields but the header "
                        f"has {len(header)} columns {header}; field {len(header) + 1} "
                        f"({values[len(header)][:40]!r}) has no column (quote fields that contain the "
                        f"separator, or set the separator: --csv-separator)")
                rows.append((reader.line_num, dict(zip(header, values))))
        except csv.Error as e:
            raise ValueError(f"{p}: line {reader.line_num}: {e}") from None
    return header, rows


def _sep_name(sep: str) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon", "|": "bar"}.get(sep, repr(sep))


def _read_jsonl(p: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    columns: dict[str, None] = {}
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(p, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{p}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            for k in obj:
                columns.setdefault(k)
            rows.append((lineno, obj))
    return list(columns), rows


def find_column(path: str | Path, columns: Sequence[str], candidates: Sequence[str], what: str,
                override: str | None = None) -> str:
    """The column to use for ``what``: ``override`` if given (must exist), else the first of
    ``candidates`` present (case-insensitive). ValueError names the file and the columns found."""
    lower = {c.lower(): c for c in columns}
    if override is not None:
        if override in columns:
            return override
        if override.lower() in lower:
            return lower[override.lower()]
        raise ValueError(f"{path}: no {what} column {override!r}; columns found: {list(columns)}")
    for c in candidates:
        if c in lower:
            return lower[c]
    raise ValueError(f"{path}: no {what} column (looked for {', '.join(candidates)}); "
                     f"columns found: {list(columns)}")


def as_caption_list(value: Any) -> list[str]:
    """A caption cell as a list of non-empty stripped strings (a JSON list in a CSV cell or a
    list in JSONL means several captions)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return [v.strip() for v in parsed if v.strip()]
    return [text] if text else []
