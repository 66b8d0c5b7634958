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


def read_rows(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """All rows of a manifest as ``(line_number, row)``, plus the column names.

    CSV uses standard quoting; TSV is read unquoted (IANA TSV: captions may contain ``"``);
    JSONL lines must be JSON objects (blank lines are ignored). Raises FileNotFoundError /
    ValueError naming the file (and line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix not in (".csv", ".tsv"):
        raise ValueError(f"{p}: unsupported manifest type {suffix!r} (use .csv, .tsv or .jsonl)")
    with open(p, newline="", encoding="utf-8-sig") as f:
        if suffix == ".tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
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
                rows.append((reader.line_num, dict(zip(header, values))))
        except csv.Error as e:
            raise ValueError(f"{p}: line {reader.line_num}: {e}") from None
    return header, rows


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
