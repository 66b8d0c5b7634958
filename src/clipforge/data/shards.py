"""WebDataset tar shards (the layout img2dataset writes) as a streaming :class:`PairSource`.

A shard is read member by member (``tarfile`` stream mode: never a whole shard in memory, never
a seek), so shards can be local files, URLs (``https://``, ``s3://``, ``gs://`` ...) or
``pipe:CMD`` commands (see :mod:`clipforge.data.remote`); consecutive members sharing a key
prefix (``00001.jpg``, ``00001.txt``, ``00001.json``) form one sample. Each (rank, worker)
reads a disjoint subset of the per-epoch shuffled shard list, or, with ``resampled=True``,
draws shards with replacement (the multi-node mode, where epochs are just "about one pass
worth" of shards).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from ..preprocess import ImageLoadError, load_image
from .base import PairSource, Sample, _check_partition, stable_rng
from .remote import TAR_SUFFIXES, ShardOpenError, is_remote, list_remote, local_path, open_stream, read_small, scheme
from .skip import BadSample, SkipStats
from .tables import as_caption_list

logger = logging.getLogger("clipforge.data")

# image members read from shards, in order of preference when a sample has several: WebDataset's usual
# types first, then the other formats Pillow decodes (a .gif member is an image here as in a folder)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm")
#: the types written into shards (what other WebDataset readers decode); others are re-encoded as PNG
PORTABLE_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ----------------------------------------------------------------------------- shard lists
def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``a{00..02}b`` -> a00b a01b a02b (zero padding kept),
    ``{x,y}`` comma lists, several and nested braces. Unbalanced braces stay literal."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        if pattern[end] == "{":
            depth += 1
        elif pattern[end] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        padded = (len(a.lstrip("-")) > 1 and a.lstrip("-").startswith("0")) or \
                 (len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0"))
        width = max(len(a), len(b)) if padded else 0
        alts = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        alts = _split_top(body, ",")
        if len(alts) == 1:  # "{x}" is literal, as in bash
            return [head + "{" + body + "}" + t for t in expand_braces(tail)]
        alts = [x for alt in alts for x in expand_braces(alt)]
    tails = expand_braces(tail)
    return [head + alt + t for alt in alts for t in tails]


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside braces."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _not_a_shard_folder(folder: str) -> str:
    """What to say about a folder given as image-text pairs that holds no ``.tar`` shards."""
    names = [p.name for p in Path(folder).iterdir() if not p.name.startswith(".")]
    manifests = sorted(n for n in names if n.lower().endswith((".csv", ".tsv", ".jsonl")))
    accepted = ("image-text pairs are read from a manifest (.csv/.tsv/.jsonl with image and caption columns), "
                "WebDataset .tar shards (image + .txt/.json caption members, or a folder of them) or builtin:scenes")
    if manifests:
        return f"{folder} holds no .tar shards; give its manifest instead ({', '.join(manifests[:3])}): {accepted}"
    images = sum(1 for n in names if os.path.splitext(n)[1].lower() in
                 (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"))
    subdirs = sum(1 for n in names if (Path(folder) / n).is_dir())
    if images or subdirs:
        return (f"{folder} is a folder of images without captions, not image-text pairs; {accepted} "
                f"(an image folder works for zero-shot classification: class subfolders, `clipforge eval zeroshot`)")
    return f"no .tar shards in directory {folder}; {accepted}"


def resolve_shards(spec: str) -> list[str]:
    """The shards named by ``spec``: brace patterns, globs, directories of ``.tar`` files,
    or a ``,`` / ``::`` separated list of those; each may be a local path, a ``file://``,
    ``http(s)://`` or other fsspec URL, or a ``pipe:CMD`` command (braces expand inside URLs
    and commands too). ``http(s)`` and ``pipe:`` names cannot be listed, so they are kept as
    given and a missing one is reported (naming it) when it is read. Raises naming the
    pattern that matched nothing."""
    items = [p.strip() for part in _split_top(spec, "::") for p in _split_top(part, ",")]
    items = [p for p in items if p]
    if not items:
        raise ValueError(f"empty shard list: {spec!r}")
    out: list[str] = []
    for item in items:
        found: list[str] = []
        names = expand_braces(item)
        missing: list[str] = []
        for name in names:
            local = local_path(name)
            if local is None:
                if scheme(name) in ("pipe", "http", "https") or (
                        name.lower().endswith(TAR_SUFFIXES) and not _GLOB_CHARS.search(name)):
                    found.append(name)
                else:  # an fsspec glob or folder URL
                    listed = list_remote(name)
                    found.extend(listed)
                    if not listed:
                        missing.append(name)
                continue
            name = local
            if _GLOB_CHARS.search(name):
                found.extend(sorted(glob.glob(name)))
            elif os.path.isdir(name):
                tars = sorted(str(p) for p in Path(name).iterdir() if p.name.lower().endswith(TAR_SUFFIXES))
                if not tars:
                    raise FileNotFoundError(_not_a_shard_folder(name))
                found.extend(tars)
            elif os.path.isfile(name):
                found.append(name)
            else:
                missing.append(name)
        if not found:
            if len(names) == 1 and not _GLOB_CHARS.search(item):
                raise FileNotFoundError(f"shard not found: {item}")
            raise FileNotFoundError(f"no shard file matches {item!r}"
                                    + (f" (expanded to {len(names)} names, e.g. {names[0]})" if len(names) > 1 else ""))
        if missing:
            logger.warning("%d of %d shards named by %r do not exist (e.g. %s); using the %d that do",
                           len(missing), len(names), item, missing[0], len(found))
        out.extend(found)
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def split_sources(spec: str) -> list[str]:
    """The ``::``-joined data sources of a shard spec (open_clip's ``--train-data a::b``), in order."""
    return [p.strip() for p in _split_top(spec, "::") if p.strip()]


def source_shard_weights(spec: str, factors: list[float], shards: list[str]) -> list[float]:
    """open_clip's ``--train-data-upsampling-factors``: every shard of source ``i`` gets weight
    ``factors[i]`` in the draws with replacement (so a source's share also grows with its number of
    shards, as in open_clip's ``expand_urls``); a shard named by several sources gets their sum."""
    sources = split_sources(spec)
    if len(sources) != len(factors):
        raise ValueError(f"train_data_upsampling_factors: {len(factors)} factor(s) for {len(sources)} "
                         f"'::'-joined source(s) of {spec!r}")
    weight: dict[str, float] = {}
    for source, factor in zip(sources, factors):
        for shard in resolve_shards(source):
            weight[shard] = weight.get(shard, 0.0) + float(factor)
    return [weight[s] for s in shards]


# ----------------------------------------------------------------------------- records
@dataclass
class ShardRecord:
    """The raw members of one sample (bytes, undecoded), or an error marker for a bad shard."""

    key: str
    shard: str
    files: dict[str, bytes | None] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def read_shard(path: str, wanted: frozenset[str] | set[str] | None, fileobj: BinaryIO | None = None
               ) -> Iterator[ShardRecord]:
    """Stream the samples of one tar shard (from ``fileobj`` if given, else opening ``path``:
    a file, URL or ``pipe:`` command). Members whose extension is in ``wanted`` (``None``:
    every member) are read; others are only noted. A shard that cannot be opened yields one
    ``unreachable_shard`` record; a corrupt or truncated one yields one ``corrupt_shard``
    record and ends (earlier samples are kept)."""
    cur: ShardRecord | None = None
    try:
        with (contextlib.nullcontext(fileobj) if fileobj is not None else open_stream(path)) as fh, \
                tarfile.open(fileobj=fh, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = split_member_name(m.name)
                if parts is None:
                    continue
                key, ext = parts
                if cur is None or key != cur.key:
                    if cur is not None:
                        yield cur
                    cur = ShardRecord(key=key, shard=path)
                if wanted is None or ext in wanted:
                    f = tf.extractfile(m)
                    cur.files[ext] = f.read() if f is not None else b""
                else:
                    cur.files.setdefault(ext, None)
            end = tf.offset
            trailing = _nonzero_tail(tf.fileobj)
            if trailing is None and cur is not None:
                yield cur
        if trailing is not None:  # tarfile stops silently at an unreadable header
            yield ShardRecord(key=os.path.basename(path), shard=path, error="corrupt_shard",
                              detail=f"{path}: unreadable tar header at byte {end} (data follows the archive's end; "
                                     f"the rest of the shard, from sample {cur.key if cur else '?'} on, is skipped)")
    except (ShardOpenError, FileNotFoundError) as e:
        yield ShardRecord(key=os.path.basename(path), shard=path, error="unreachable_shard", detail=str(e))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        yield ShardRecord(key=os.path.basename(path), shard=path, error="corrupt_shard",
                          detail=f"{path}: {type(e).__name__}: {e}")


def _nonzero_tail(stream: BinaryIO) -> int | None:
    """Read a tar stream to its end (draining a pipe or socket); the number of non-zero bytes
    after the archive's end marker, or None when there are none (normal zero padding)."""
    n = 0
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            return n or None
        n += len(chunk) - chunk.count(0)


def shuffle_buffer(items: Iterator, size: int, rng) -> Iterator:
    """Approximate shuffling of a stream with a buffer of ``size`` items (deterministic by rng)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------- source
class ShardSource(PairSource):
    """Streaming pairs from WebDataset shards (``jpg|jpeg|png|webp`` + ``txt`` or ``json``).

    The caption is the ``txt`` member, else the ``caption`` (then ``text``) field of the
    ``json`` member; ``caption_key`` picks another member extension or JSON field. A JSON
    caption that is a list gives several captions.
    """

    is_map_style = False

    def __init__(self, spec: str, *, caption_key: str | None = None, upsampling_factors: list[float] | None = None
                 ) -> None:
        super().__init__()
        self.spec = spec
        self.shards = resolve_shards(spec)
        # per-shard weights of the draws with replacement (None: uniform); see source_shard_weights
        self.weights = source_shard_weights(spec, upsampling_factors, self.shards) if upsampling_factors else None
        self.name = Path(self.shards[0]).parent.name or Path(self.shards[0]).stem
        self.caption_key = caption_key
        self.num_samples = _count_from_stats(self.shards)
        wanted = set(IMAGE_EXTS) | {"txt", "json"}
        if caption_key:
            wanted.add(caption_key.lower())
        self._wanted = frozenset(wanted)
        self._warned: set[tuple[int, int, int, int]] = set()

    # -- partitioning ---------------------------------------------------------------------
    def epoch_order(self, epoch: int, seed: int, shuffle: bool = True) -> list[str]:
        order = list(self.shards)
        if shuffle:
            stable_rng("shards", seed, epoch).shuffle(order)
        return order

    def assigned_shards(self, *, rank: int, world_size: int, worker_id: int, num_workers: int,
                        epoch: int, seed: int, shuffle: bool = True) -> list[str]:
        """Shards read by one (rank, worker) in one epoch: disjoint across ranks and workers,
        together covering every shard."""
        _check_partition(rank, world_size, worker_id, num_workers)
        return self.epoch_order(epoch, seed, shuffle)[rank::world_size][worker_id::num_workers]

    def shards_per_worker(self, *, rank: int, world_size: int, worker_id: int, num_workers: int) -> int:
        n_rank = len(range(rank, len(self.shards), world_size))
        return len(range(worker_id, n_rank, num_workers))

    def warn_if_starved(self, *, rank: int, world_size: int, worker_id: int, num_workers: int) -> bool:
        """Warn (once per partition) when a (rank, worker) gets no shard and will resample."""
        if self.shards_per_worker(rank=rank, world_size=world_size, worker_id=worker_id, num_workers=num_workers):
            return False
        k = (rank, world_size, worker_id, num_workers)
        if k not in self._warned:
            self._warned.add(k)
            logger.warning("%d shard(s) for world_size=%d x num_workers=%d readers: rank %d worker %d gets no "
                           "shard and falls back to resampling shards with replacement (use more shards, "
                           "fewer workers, or resampled=True)", len(self.shards), world_size, num_workers,
                           rank, worker_id)
        return True

    # -- records ----------------------------------------------------------------------------
    def epoch_records(self, *, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1,
                      epoch: int = 0, seed: int = 0, resampled: bool = False, shuffle: bool = True,
                      buffer: int = 0, warn: bool = True) -> Iterator[ShardRecord]:
        """The raw records one (rank, worker) reads in one epoch, deterministic in all arguments.

        Without shards to read (fewer shards than readers) or with ``resampled``, shards are
        drawn with replacement: about as many as a fair share, and at least until one record
        was read. A subset that turns out to hold no sample at all also falls back to draws.
        """
        part = dict(rank=rank, world_size=world_size, worker_id=worker_id, num_workers=num_workers)
        mine = [] if resampled else self.assigned_shards(**part, epoch=epoch, seed=seed, shuffle=shuffle)
        if not resampled and not mine and warn:
            self.warn_if_starved(**part)
        recs = self._records_of(mine, resampled or not mine, part, epoch, seed)
        yield from shuffle_buffer(recs, buffer, stable_rng("buffer", seed, epoch, rank, worker_id))

    def _records_of(self, mine: list[str], draw: bool, part: dict, epoch: int, seed: int) -> Iterator[ShardRecord]:
        n = 0
        dead: dict[str, str] = {}  # shards that could not be opened: never drawn again this epoch
        for shard in mine:
            for rec in read_shard(shard, self._wanted):
                if rec.error == "unreachable_shard":
                    dead[shard] = rec.detail
                else:
                    n += 1
                yield rec
        if n and not draw:
            return
        if mine and not n:
            logger.warning("shards %s %s: rank %d worker %d resamples from all shards this epoch", mine[:3],
                           "cannot be opened" if len(dead) == len(mine) else "hold no sample",
                           part["rank"], part["worker_id"])
        rng = stable_rng("resample", seed, epoch, part["rank"], part["worker_id"])
        fair = max(1, len(self.shards) // (part["world_size"] * part["num_workers"]))
        draws = empty = 0
        while draws < fair or n == 0:
            live = [s for s in self.shards if s not in dead] if dead else self.shards
            if not live:
                raise ValueError(f"none of the {len(self.shards)} shard(s) of {self.spec!r} can be opened; "
                                 f"e.g. {next(iter(dead.values()))}")
            if self.weights is None:
                shard = rng.choice(live)
            else:  # upsampling factors: weighted draws (dead shards left out)
                w = [wt for s, wt in zip(self.shards, self.weights) if s not in dead]
                if not any(w):
                    raise ValueError(f"no shard of {self.spec!r} with a non-zero upsampling factor can be opened")
                shard = rng.choices(live, weights=w)[0]
            draws += 1
            got = 0
            for rec in read_shard(shard, self._wanted):
                if rec.error == "unreachable_shard":
                    dead[shard] = rec.detail
                else:
                    got += 1
                yield rec
            n += got
            empty = 0 if got else empty + 1
            if empty > 2 * len(self.shards) + 10:
                raise RuntimeError(f"no sample could be read from any of the {len(self.shards)} shards of "
                                   f"{self.spec!r} ({empty} consecutive empty draws)")

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, rec: ShardRecord) -> Sample:
        """A record as a :class:`Sample`; raises :class:`BadSample` with the reason."""
        where = f"{os.path.basename(rec.shard)}:{rec.key}"
        if rec.error:
            raise BadSample(rec.error, rec.key, rec.detail)
        img_ext = next((e for e in IMAGE_EXTS if rec.files.get(e) is not None), None)
        if img_ext is None:
            raise BadSample("missing_image", rec.key, f"{where} has members {sorted(rec.files)}")
        captions, meta = self._captions(rec, where)
        try:
            img = load_image(rec.files[img_ext], name=f"{where}.{img_ext}")
        except ImageLoadError as e:
            raise BadSample("decode_error", rec.key, str(e)) from None
        meta.update(shard=rec.shard, width=img.width, height=img.height)
        return Sample(key=rec.key, image=img, captions=captions, meta=meta)

    def _captions(self, rec: ShardRecord, where: str) -> tuple[list[str], dict]:
        meta: dict = {}
        obj = None
        raw_json = rec.files.get("json")
        if raw_json is not None:
            try:
                obj = json.loads(raw_json.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                meta["json"] = obj
        ck = self.caption_key
        text_exts = [ck.lower()] if ck else ["txt"]
        fields = [ck] if ck else ["caption", "text"]
        for ext in text_exts:
            raw = rec.files.get(ext)
            if raw is not None and ext != "json":
                return self._nonempty(as_caption_list(raw.decode("utf-8", errors="replace")), rec, where), meta
        if isinstance(obj, dict):
            for f in fields:
                if f in obj:
                    return self._nonempty(as_caption_list(obj[f]), rec, where), meta
            raise BadSample("missing_caption", rec.key, f"{where}.json has no field {' or '.join(fields)}")
        if raw_json is not None:
            raise BadSample("bad_json", rec.key, f"{where}.json is not a JSON object")
        raise BadSample("missing_caption", rec.key, f"{where} has members {sorted(rec.files)}")

    @staticmethod
    def _nonempty(caps: list[str], rec: ShardRecord, where: str) -> list[str]:
        if not caps:
            raise BadSample("empty_caption", rec.key, where)
        return caps

    # -- iteration --------------------------------------------------------------------------
    def iter_samples(self, *, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1,
                     epoch: int = 0, seed: int = 0, resampled: bool = False, shuffle: bool | None = None,
                     stats: SkipStats | None = None, buffer: int = 0) -> Iterator[Sample]:
        """Good samples of one epoch of this (rank, worker)'s shards; with ``resampled=True``
        an endless stream (epochs chained from ``epoch``). Shard order is shuffled per epoch
        by ``seed`` unless ``shuffle=False``."""
        stats = self.stats if stats is None else stats
        e = epoch
        while True:
            for rec in self.epoch_records(rank=rank, world_size=world_size, worker_id=worker_id,
                                          num_workers=num_workers, epoch=e, seed=seed, resampled=resampled,
                                          shuffle=shuffle is not False, buffer=buffer):
                try:
                    yield self.decode(rec)
                except BadSample as err:
                    stats.add_bad(err)
            if not resampled:
                return
            e += 1


def shard_base(shard: str) -> str:
    """The shard name without its tar suffix (img2dataset's side files share it)."""
    for suf in TAR_SUFFIXES:
        if shard.lower().endswith(suf):
            return shard[: -len(suf)]
    return shard


def shard_sample_count(shard: str) -> int | None:
    """The number of samples in ``shard`` according to img2dataset's side files: ``successes``
    of ``<shard>_stats.json``, else the ``status == "success"`` rows of ``<shard>.parquet``
    (every row if it has no status column; needs pyarrow). None when neither is readable."""
    if scheme(shard) == "pipe":
        return None
    base = shard_base(shard)
    raw = read_small(base + "_stats.json")
    if raw is not None:
        try:
            return int(json.loads(raw)["successes"])
        except (ValueError, KeyError, TypeError):
            pass
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    raw = read_small(base + ".parquet")
    if raw is None:
        return None
    try:
        pf = pq.ParquetFile(pa.BufferReader(raw))
        if "status" not in pf.schema_arrow.names:
            return pf.metadata.num_rows
        status = pf.read(columns=["status"]).column("status").to_pylist()
    except (pa.ArrowException, OSError, ValueError):
        return None
    return sum(1 for v in status if v == "success")


#: Beyond this many remote shards, side files are not fetched for a sample count at startup.
MAX_REMOTE_COUNT = 1024


def _count_from_stats(shards: list[str]) -> int | None:
    """Total sample count from img2dataset's side files, if every shard has one (remote shards:
    fetched in parallel, and only up to :data:`MAX_REMOTE_COUNT` shards; ``pipe:``: never)."""
    if not shards:
        return None
    remote = any(is_remote(s) for s in shards)
    if remote and len(shards) > MAX_REMOTE_COUNT:
        logger.info("%d remote shards: sample count not read from their _stats.json files", len(shards))
        return None
    first = shard_sample_count(shards[0])
    if first is None:
        return None
    if remote:
        with ThreadPoolExecutor(8) as ex:
            rest = list(ex.map(shard_sample_count, shards[1:]))
    else:
        rest = [shard_sample_count(s) for s in shards[1:]]
    if any(n is None for n in rest):
        return None
    return first + sum(rest)  # type: ignore[arg-type]
