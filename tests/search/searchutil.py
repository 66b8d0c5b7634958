"""Helpers for the search tests: small image folders with broken files, synthetic embedding
collections (clustered vectors written in the real shard layout), the micro model."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.embeddings import EMB_DIRS, FORMAT, ShardPaths, rebuild_summary, write_shard


def micro_model(seed: int = 0):
    from conftest import micro_config

    from clipforge.models import create_model

    return create_model(micro_config("vit"), seed=seed).eval()


def photo_index(d: Path, shard_size: int = 5):
    """A micro model and an index of the sample photo folder, under ``d`` (photos/, emb/, idx/): what
    the service tests serve. Returns the model."""
    from clipforge.search.embed import embed_collection  # faiss/pyarrow: only for the tests that serve
    from clipforge.search.index import build_index
    from clipforge.search.sources import ImageFolderSource

    model = micro_model()
    make_image_folder(d / "photos")
    embed_collection(model, ImageFolderSource(d / "photos"), d / "emb", shard_size=shard_size, progress=False,
                     rank=0, world_size=1)
    build_index(d / "emb", d / "idx", n_queries=5, progress=False)
    return model


def pattern_image(i: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A distinct picture per ``i``: coloured stripes and a block whose place depends on ``i``."""
    rng = np.random.default_rng(i)
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    step = 2 + i % 7
    arr[:, ::step] = rng.integers(0, 256, 3)
    x0, y0 = (i * 7) % max(1, w - 12), (i * 5) % max(1, h - 12)
    arr[y0:y0 + 12, x0:x0 + 12] = rng.integers(0, 256, 3)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_image_folder(root: Path, n_good: int = 14) -> dict[str, object]:
    """Nested folder of ``n_good`` images (JPEG/PNG, various sizes, a grey and an RGBA one) plus
    a non-image ``.jpg``, a truncated JPEG and an ignored ``.txt``/hidden file. Returns facts."""
    root.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    for i in range(n_good):
        sub = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        size = (40 + 4 * i, 32 + (i * 3) % 20)
        mode = "L" if i == 4 else "RGBA" if i == 5 else "RGB"
        img = pattern_image(i, size, mode)
        if i % 2:
            path = sub / f"img_{i:02d}.png"
            img.save(path)
        else:
            path = sub / f"img_{i:02d}.jpg"
            path.write_bytes(jpeg_bytes(img))
        sizes[path.relative_to(root).as_posix()] = size
    (root / "b" / "c" / "img_01.txt").write_text("a caption for image one\n", encoding="utf-8")
    (root / "broken.jpg").write_bytes(b"this is not an image at all")
    good = jpeg_bytes(pattern_image(99, (64, 64)))
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / ".hidden.jpg").write_bytes(good)
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    return {"sizes": sizes, "bad": ["a/truncated.jpg", "broken.jpg"]}


def write_webdataset(path: Path, n: int, start: int = 0, corrupt: int | None = None) -> list[str]:
    """A WebDataset tar with ``n`` jpg+txt samples (sample ``corrupt`` gets undecodable bytes)."""
    keys = []
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            key = f"s{i:05d}"
            keys.append(key)
            data = b"\xff\xd8 garbage" if i == corrupt else jpeg_bytes(pattern_image(i, (36, 36)))
            for ext, payload in (("jpg", data), ("txt", f"caption of sample {i}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return keys


def clustered_vectors(n: int, dim: int, seed: int = 0, centres: int = 64, spread: float = 0.35,
                      centre_seed: int = 1234) -> np.ndarray:
    """Unit vectors from a mixture of ``centres`` gaussians on the sphere (fixed by ``centre_seed``,
    so different ``seed`` values draw fresh points from the same distribution)."""
    crng = np.random.default_rng(centre_seed)
    c = crng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, dim)).astype(np.float32) * spread / np.sqrt(dim) * 3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_collection(root: Path, vectors: np.ndarray, shard_size: int, *, start_shard: int = 0,
                     weights: str = "w0", key_prefix: str = "v", kind: str = "image",
                     first_key: int = 0) -> Path:
    """Write ``vectors`` in the real embedding layout (shards ``start_shard``...), as if
    `clipforge embed` had produced them, and (re)build the manifest from the done-markers."""
    root.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    idx = start_shard
    for s in range(0, n, shard_size):
        part = vectors[s:s + shard_size]
        rows = [{"key": f"{key_prefix}{first_key + s + j}", "image_path": None, "member": None,
                 "caption": f"vector {first_key + s + j}", "width": None, "height": None} for j in range(len(part))]
        write_shard(ShardPaths(root, kind, idx), part, rows, [])
        idx += 1
    base = {"format": FORMAT, "kind": kind, "embedding_dir": EMB_DIRS[kind], "dtype": "float16", "dim": dim,
            "model": {"name": "synthetic", "config": {}, "weights_sha256": weights}, "shard_size": shard_size,
            "source": {"type": "synthetic"}, "num_shards": idx}
    rebuild_summary(root, kind, base, expected_shards=idx)
    return root


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ base.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


class LiveServer:
    """An app served by uvicorn on 127.0.0.1 (port 0) in a thread, for clients that need real HTTP,
    with the connection guard and limits of ``clipforge serve`` (``limits``: a ServerLimits)."""

    def __init__(self, app, limits=None, log_level: str = "error") -> None:
        import socket
        import threading
        import time

        from clipforge.search.server import ServerLimits, uvicorn_server

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(app, limits or ServerLimits(), log_level=log_level, access_log=False)
        self.server.config.lifespan = "off"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("uvicorn did not start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
