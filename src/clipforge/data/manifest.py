"""Image-caption manifests (CSV / TSV / JSONL) as a map-style :class:`PairSource`.

Rows naming the same image are merged into one sample with several captions; image paths are
relative to the manifest's folder. The manifest is parsed eagerly (so format errors surface
before training starts) but images are only opened when a sample is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..preprocess import ImageLoadError, load_image
from .base import PairSource, Sample
from .skip import BadSample
from .tables import CAPTION_COLUMNS, IMAGE_COLUMNS, as_caption_list, find_column, read_rows


class ManifestSource(PairSource):
    """Map-style pairs from a manifest.

    A ``split`` column, when present, filters rows (``split=None`` keeps all); without one the
    whole manifest is used whatever ``split`` says. ``image_key`` / ``caption_key`` name the
    columns (open_clip's ``--csv-img-key`` / ``--csv-caption-key``; default: auto-detected,
    e.g. ``filepath`` / ``title``), ``separator`` the CSV delimiter (default: sniffed).
    """

    is_map_style = True

    def __init__(self, path: str | os.PathLike, *, split: str | None = "train", caption_key: str | None = None,
                 image_key: str | None = None, separator: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.spec = str(path)
        self.name = self.path.stem
        columns, rows = read_rows(self.path, separator)
        if not rows:
            raise ValueError(f"{self.path}: manifest has a header but no rows")
        self.image_column = find_column(self.path, columns, IMAGE_COLUMNS, "image", image_key)
        self.caption_column = find_column(self.path, columns, CAPTION_COLUMNS, "caption", caption_key)
        split_col = next((c for c in columns if c.lower() == "split"), None)
        if split_col is not None and split is not None:
            kept = [(n, r) for n, r in rows if str(r.get(split_col, "")).strip() == split]
            if not kept:
                found = sorted({str(r.get(split_col, "")).strip() for _, r in rows})
                raise ValueError(f"{self.path}: no rows with {split_col}={split!r}; splits found: {found}")
            rows = kept
        self.split = split
        root = self.path.parent
        index: dict[str, int] = {}
        self._keys: list[str] = []
        self._paths: list[Path | None] = []
        self._captions: list[list[str]] = []
        self._lines: list[int] = []
        for lineno, row in rows:
            raw = row.get(self.image_column)
            rel = "" if raw is None else str(raw).strip()
            caps = as_caption_list(row.get(self.caption_column))
            if not rel:  # a row without an image cannot be grouped: its own (bad) entry
                self._add(f"{self.path.name}:{lineno}", None, caps, lineno)
                continue
            i = index.get(rel)
            if i is None:
                index[rel] = len(self._keys)
                p = Path(rel)
                self._add(rel, p if p.is_absolute() else root / p, caps, lineno)
            else:
                self._captions[i].extend(caps)
        self.num_samples = len(self._keys)

    def _add(self, key: str, path: Path | None, caps: list[str], lineno: int) -> None:
        self._keys.append(key)
        self._paths.append(path)
        self._captions.append(caps)
        self._lines.append(lineno)

    def key(self, i: int) -> str:
        return self._keys[i]

    def captions(self, i: int) -> list[str]:
        """Captions of sample ``i`` without opening its image."""
        return list(self._captions[i])

    def get(self, i: int) -> Sample:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.path} ({self.num_samples} samples)")
        key, path, caps = self._keys[i], self._paths[i], self._captions[i]
        if path is None:
            raise BadSample("missing_image", key, f"{self.path.name} line {self._lines[i]}: empty {self.image_column!r} cell")
        if not caps:
            raise BadSample("empty_caption", key, f"{self.path.name} line {self._lines[i]}: empty {self.caption_column!r} cell")
        try:
            img = load_image(path)
        except ImageLoadError as e:
            reason = "missing_file" if not path.exists() else "decode_error"
            raise BadSample(reason, key, str(e)) from None
        return Sample(key=key, image=img, captions=list(caps),
                      meta={"path": str(path), "line": self._lines[i], "width": img.width, "height": img.height})
