"""Data throughput: built-in scene generation and PairLoader batches/s (map-style scenes and
WebDataset shard streams, in-process and with worker processes), plus the cost of an exact
stream resume. Writes benchmarks/results/data_loader.json.

    python benchmarks/data_loader.py            # full (~1-2 min on 2 busy cores)
    python benchmarks/data_loader.py --quick    # smoke
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_results  # noqa: E402

from clipforge.config import PreprocessConfig  # noqa: E402
from clipforge.data import ScenesDataset, make_pair_loader, open_pairs  # noqa: E402
from clipforge.preprocess import image_transform  # noqa: E402
from clipforge.tokenizer import tokenize  # noqa: E402


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t)


def bench_scenes(n: int) -> list[dict]:
    rows = []
    for size in (64, 224):
        ds = ScenesDataset("train", n=10**6, image_size=size)
        ds.get(0)
        specs = rate(lambda k: [ds.scene(i) for i in range(k)], n)
        full = rate(lambda k: [ds.get(i) for i in range(k)], n if size == 64 else n // 4)
        rows.append({"what": f"scenes {size}px", "specs_per_s": specs, "per_s": full})
    return rows


def write_scene_shards(root: Path, n_shards: int, per_shard: int) -> str:
    ds = ScenesDataset("train", n=n_shards * per_shard, image_size=64)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(per_shard):
                sample = ds.get(s * per_shard + i)
                buf = io.BytesIO()
                sample.image.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", sample.captions[0].encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


def bench_loader(name: str, source, batch_size: int, batches: int, workers: int, size: int = 64) -> dict:
    loader = make_pair_loader(source, transform=image_transform(PreprocessConfig(image_size=size), train=True),
                              tokenize=lambda t: tokenize(t, truncate=True), batch_size=batch_size,
                              num_workers=workers, shuffle_buffer=500)
    next(loader)  # start-up (worker fork) excluded
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t
    loader.close()
    return {"what": name, "workers": workers, "batch": batch_size, "size": size,
            "per_s": batches * batch_size / dt, "batches_per_s": batches / dt}


def bench_resume(spec: str, batch_size: int, consumed: int) -> dict:
    src = open_pairs(spec)
    kw = dict(transform=image_transform(PreprocessConfig(image_size=64), train=True),
              tokenize=lambda t: tokenize(t, truncate=True), batch_size=batch_size, shuffle_buffer=500)
    ref = make_pair_loader(src, **kw)
    for _ in range(consumed):
        next(ref)
    state = ref.state_dict()
    resumed = make_pair_loader(src, **kw)
    resumed.load_state_dict(state)
    t = time.perf_counter()
    next(resumed)
    return {"what": f"stream resume after {consumed * batch_size} samples", "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, batches = (300, 3) if args.quick else (2000, 15)
    rows = bench_scenes(n)
    print_table(rows, [("what", "source", "s"), ("specs_per_s", "specs/s", ".0f"),
                       ("per_s", "rendered+captioned/s", ".0f")])
    loader_rows = []
    scenes = ScenesDataset("train", n=20000)
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_scene_shards(Path(tmp), 4 if args.quick else 8, 100 if args.quick else 250)
        for workers in (0, 2):
            loader_rows.append(bench_loader("scenes (map-style)", scenes, 128, batches, workers))
            loader_rows.append(bench_loader("scene JPEG shards (stream)", open_pairs(spec), 128, batches, workers))
        resume = bench_resume(spec, 128, 3 if args.quick else 10)
    print()
    print_table(loader_rows, [("what", "loader", "s"), ("workers", "workers", "d"), ("batch", "batch", "d"),
                              ("size", "px", "d"), ("per_s", "samples/s", ".0f"),
                              ("batches_per_s", "batches/s", ".2f")])
    print(f"\n{resume['what']}: first batch in {resume['seconds']:.2f} s")
    path = write_results("data_loader", {"environment": environment(), "quick": args.quick, "scenes": rows,
                                         "loader": loader_rows, "resume": resume})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
