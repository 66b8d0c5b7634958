"""``open_pairs``: one entry point from a spec string to a :class:`PairSource`."""

from __future__ import annotations

from .base import PairSource
from .manifest import ManifestSource
from .scenes import ScenesDataset, parse_scenes_query
from .shards import ShardSource
from .tables import is_manifest

DEFAULT_SCENES_N = {"train": 20000, "val": 2000, "test": 2000}


def open_pairs(spec: str, *, split: str | None = "train", seed: int = 0, caption_key: str | None = None,
               image_key: str | None = None, csv_separator: str | None = None,
               upsampling_factors: list[float] | None = None) -> PairSource:
    """Open an image-text pair source.

    ``spec`` is ``builtin:scenes[?n=20000&size=64&seed=0]``, a manifest (``.csv``, ``.tsv``,
    ``.jsonl``; ``image_key`` / ``caption_key`` / ``csv_separator`` as open_clip's
    ``--csv-img-key`` / ``--csv-caption-key`` / ``--csv-separator``), or WebDataset shards
    (brace pattern ``shards/{00000..00123}.tar``, glob, directory of ``.tar`` files, or a
    ``,``/``::`` separated list; paths, ``https://`` / ``s3://`` / ``gs://`` URLs or
    ``pipe:CMD`` commands, see :mod:`clipforge.data.remote`). ``split`` selects the scenes
    split or filters a manifest's ``split`` column (ignored for shards: they are per-split
    files); ``split=None`` keeps every manifest row (scenes: train). ``seed`` is the scenes
    generator seed (shuffling seeds belong to the loader). ``upsampling_factors`` (shards only,
    one per ``::``-joined source): the weights of the sources in draws with replacement
    (open_clip's ``--train-data-upsampling-factors``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty data spec: {spec!r}")
    spec = spec.strip()
    if upsampling_factors and (spec.startswith("builtin:") or is_manifest(spec)):
        raise ValueError(f"train_data_upsampling_factors: weights '::'-joined WebDataset shard sources; "
                         f"{spec!r} is not shards")
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):].partition("?")[0]
        if name != "scenes":
            raise ValueError(f"unknown builtin pair source {name!r} in {spec!r}; available: builtin:scenes")
        q = parse_scenes_query(spec)
        unknown = set(q) - {"n", "size", "seed", "split"}
        if unknown:
            raise ValueError(f"{spec!r}: unknown option(s) {sorted(unknown)}; known: n, size, seed, split")
        split = q.get("split", split or "train")
        if split not in DEFAULT_SCENES_N:
            raise ValueError(f"{spec!r}: split must be one of {sorted(DEFAULT_SCENES_N)}, got {split!r}")
        try:
            n = int(q.get("n", DEFAULT_SCENES_N[split]))
            size = int(q.get("size", 64))
            s = int(q.get("seed", seed))
        except ValueError as e:
            raise ValueError(f"{spec!r}: options n, size and seed must be integers ({e})") from None
        return ScenesDataset(split=split, n=n, seed=s, image_size=size)
    if is_manifest(spec):
        return ManifestSource(spec, split=split, caption_key=caption_key, image_key=image_key,
                              separator=csv_separator)
    return ShardSource(spec, caption_key=caption_key, upsampling_factors=upsampling_factors)
