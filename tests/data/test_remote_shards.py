"""Shards read and written by URL: http(s) (a local server on 127.0.0.1), ``pipe:CMD``,
``file://`` and fsspec ``memory://``; brace patterns on URLs, rank/worker splits, unreachable
and truncated streams, img2dataset side files, and ``clipforge train`` streaming them."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shlex
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from data.datatestutil import colour_of, image_bytes, make_shards, sample_members, write_tar

from clipforge.curation.writer import I2D_COLUMNS, ShardWriter
from clipforge.data import ShardSource, open_labelled, open_pairs, resolve_shards
from clipforge.data import remote
from clipforge.data.shards import read_shard


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def served(tmp_path):
    """A folder served over http://127.0.0.1:<free port>/ for the duration of one test."""
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _no_retry_wait(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.0,))  # one retry, no sleeping


def _read(spec: str, **kw) -> list[tuple[str, list[str], bytes]]:
    src = open_pairs(spec)
    out = [(s.key, s.captions, np.asarray(s.image).tobytes()) for s in src.iter_samples(shuffle=False, **kw)]
    assert src.stats.total == 0, src.stats.to_dict()
    return out


def test_http_pipe_file_and_local_read_the_same_samples(served):
    root, url = served
    make_shards(root / "sh", 4, 3)
    local = _read(str(root / "sh" / "{00000..00003}.tar"))
    assert len(local) == 12
    q = shlex.quote(str(root / "sh"))
    for spec in (f"{url}/sh/{{00000..00003}}.tar", f"pipe:cat {q}/{{00000..00003}}.tar",
                 f"file://{root}/sh/{{00000..00003}}.tar", f"{url}/sh/00000.tar,{url}/sh/{{00001..00003}}.tar"):
        assert _read(spec) == local, spec
    assert resolve_shards(f"{url}/sh/{{00000..00001}}.tar") == [f"{url}/sh/00000.tar", f"{url}/sh/00001.tar"]
    assert resolve_shards(f"pipe:cat {q}/{{00000..00001}}.tar") == [f"pipe:cat {q}/00000.tar",
                                                                     f"pipe:cat {q}/00001.tar"]


def test_rank_and_worker_split_and_shuffle_are_the_same_for_urls(served):
    root, url = served
    make_shards(root / "sh", 5, 2)
    by_url = ShardSource(f"{url}/sh/{{00000..00004}}.tar")
    by_path = ShardSource(str(root / "sh" / "{00000..00004}.tar"))
    seen = []
    for rank in range(2):
        for worker in range(2):
            kw = dict(rank=rank, world_size=2, worker_id=worker, num_workers=2, epoch=3, seed=7)
            a = [s.rsplit("/", 1)[-1] for s in by_url.assigned_shards(**kw)]
            b = [Path(s).name for s in by_path.assigned_shards(**kw)]
            assert a == b
            seen += a
            keys_url = [s.key for s in by_url.iter_samples(**kw, buffer=3)]
            keys_path = [s.key for s in by_path.iter_samples(**kw, buffer=3)]
            assert keys_url == keys_path and keys_url
    assert sorted(seen) == [f"{i:05d}.tar" for i in range(5)]


class _NoSeek(io.RawIOBase):
    """A forward-only stream: seek/tell fail, as on a socket or pipe."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._buf.read(min(len(b), 1000))  # small reads, like a network stream
        b[: len(chunk)] = chunk
        return len(chunk)

    def seekable(self) -> bool:
        return False

    def seek(self, *a):
        raise OSError("not seekable")

    def tell(self):
        raise OSError("not seekable")


def test_shards_are_read_as_forward_only_streams(tmp_path):
    path = make_shards(tmp_path, 1, 4)[0]
    recs = list(read_shard("stream", None, fileobj=_NoSeek(Path(path).read_bytes())))
    assert [r.key for r in recs] == [f"0000000{i:02d}" for i in range(4)] and not any(r.error for r in recs)


def test_unreachable_urls_are_skipped_counted_and_named(served, tmp_path):
    root, url = served
    make_shards(root / "sh", 2, 3)
    src = open_pairs(f"{url}/sh/{{00000..00002}}.tar")  # 00002 is not served: HTTP 404
    got = [s.key for s in src.iter_samples(shuffle=False)]
    assert len(got) == 6
    assert src.stats.counts == {"unreachable_shard": 1}
    assert src.stats.examples[0]["detail"] == f"{url}/sh/00002.tar: HTTP 404 File not found"
    # nothing reachable at all: one clear error naming a URL, not an endless resampling loop
    dead = open_pairs("http://127.0.0.1:9/x/{0..1}.tar")
    with pytest.raises(ValueError, match=r"none of the 2 shard\(s\) .* can be opened; e\.g\. "
                                         r"http://127\.0\.0\.1:9/x/0\.tar: GET failed after 2 attempt"):
        list(dead.iter_samples(shuffle=False))


def test_failing_pipe_command_is_named(tmp_path):
    ok = make_shards(tmp_path, 1, 2)[0]
    src = open_pairs(f"pipe:cat {shlex.quote(ok)} {tmp_path}/missing.tar")
    keys = [s.key for s in src.iter_samples(shuffle=False)]
    assert keys == ["000000000", "000000001"]  # the output before the failure is used
    (ex,) = src.stats.examples
    assert ex["reason"] == "unreachable_shard"
    assert "command exited with status 1" in ex["detail"] and "missing.tar" in ex["detail"]


def test_truncated_stream_keeps_earlier_samples_and_counts_the_rest(served):
    root, url = served
    path = make_shards(root / "full", 1, 6)[0]
    with tarfile.open(path) as tf:
        cut = next(m for m in tf.getmembers() if m.name == "000000003.jpg").offset_data + 5
    (root / "cut").mkdir()
    (root / "cut" / "00000.tar").write_bytes(Path(path).read_bytes()[:cut])  # inside sample 3's image
    src = open_pairs(f"{url}/cut/00000.tar")
    keys = [s.key for s in src.iter_samples(shuffle=False)]
    assert keys == ["000000000", "000000001", "000000002"]
    assert src.stats.counts == {"corrupt_shard": 1}
    assert src.stats.examples[0]["detail"].startswith(f"{url}/cut/00000.tar: ")
    # a damaged header mid-shard: tarfile would just stop there; the data after it is noticed
    with tarfile.open(path) as tf:
        hdr = next(m for m in tf.getmembers() if m.name == "000000004.jpg").offset
    damaged = bytearray(Path(path).read_bytes())
    damaged[hdr: hdr + 100] = b"x" * 100
    (root / "cut" / "00001.tar").write_bytes(bytes(damaged))
    src = open_pairs(f"{url}/cut/00001.tar")
    assert [s.key for s in src.iter_samples(shuffle=False)] == [f"00000000{i}" for i in range(3)]
    assert src.stats.counts == {"corrupt_shard": 1}
    assert f"unreadable tar header at byte {hdr}" in src.stats.examples[0]["detail"]


def test_early_stop_kills_the_pipe_command(tmp_path):
    path = make_shards(tmp_path, 1, 50)[0]
    gen = read_shard(f"pipe:cat {shlex.quote(path)}", None)
    assert next(gen).key == "000000000"
    gen.close()  # must not hang waiting for cat, nor raise


def test_sample_count_from_img2dataset_side_files_over_http(served):
    root, url = served
    make_shards(root / "sh", 2, 3)
    assert open_pairs(f"{url}/sh/{{00000..00001}}.tar").num_samples is None
    for i in range(2):
        (root / "sh" / f"{i:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 3}))
    assert open_pairs(f"{url}/sh/{{00000..00001}}.tar").num_samples == 6
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "sh" / "00001_stats.json").unlink()  # now the parquet answers for shard 1
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "status": ["success", "failed_to_download",
                                                                     "success", "success"]}),
                   root / "sh" / "00001.parquet")
    assert open_pairs(f"{url}/sh/{{00000..00001}}.tar").num_samples == 6
    assert open_pairs(f"pipe:cat {root}/sh/{{00000..00001}}.tar").num_samples is None


def test_missing_fsspec_protocol_package_is_one_clear_error():
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"^s3://bucket/a\.tar: .*s3fs.*clipforge\[remote\]"):
        list(read_shard("s3://bucket/a.tar", None))


def test_missing_fsspec_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec -> ImportError
    with pytest.raises(ValueError, match=r"s3://bucket/a\.tar: s3:// URLs need fsspec: pip install 'clipforge\[remote\]'"):
        list(read_shard("s3://bucket/a.tar", None))
    with pytest.raises(ImportError, match=r"clipforge\[remote\]"):
        resolve_shards("gs://bucket/shards/*.tar")


def _records(n: int, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        files = dict((name.split(".", 1)[1], data) for name, data in
                     sample_members(key, f"caption {key}", img=image_bytes(colour_of(i), size=(9, 7), fmt="JPEG"),
                                    extra_json={"url": f"http://example.com/{i}.jpg"}))
        out.append((key, files))
    return out


def test_write_to_memory_url_and_read_back():
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("pyarrow")
    for s in range(2):
        with ShardWriter(f"memory://cf-test/out/{s:05d}.tar", write_stats=True) as w:
            for key, files in _records(3, start=10 * s):
                w.write(key, files)
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/cf-test/out", detail=False))
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json"]
    for spec in ("memory://cf-test/out/{00000..00001}.tar", "memory://cf-test/out/*.tar", "memory://cf-test/out"):
        src = open_pairs(spec)
        assert src.num_samples == 6, spec
        assert [s.captions for s in src.iter_samples(shuffle=False)] == \
            [[f"caption {k:09d}"] for k in (0, 1, 2, 10, 11, 12)]
    fs.rm("/cf-test", recursive=True)


def test_write_to_file_url_is_atomic_and_in_img2dataset_layout(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    target = tmp_path / "o" / "00000.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(f"file://{target}") as w:
            w.write(*_records(1)[0])
            raise RuntimeError("killed half-way")
    assert not target.parent.exists() or not any(target.parent.iterdir())  # no partial shard, no temp file
    with ShardWriter(f"file://{target}", write_stats=True) as w:
        for key, files in _records(2):
            w.write(key, files)
    with tarfile.open(target) as tf:  # webdataset TarWriter order: extensions sorted
        assert tf.getnames() == ["000000000.jpg", "000000000.json", "000000000.txt",
                                 "000000001.jpg", "000000001.json", "000000001.txt"]
    table = pq.read_table(tmp_path / "o" / "00000.parquet")
    assert table.column_names == ["url", "caption", *I2D_COLUMNS]
    assert table.column("url").to_pylist() == ["http://example.com/0.jpg", "http://example.com/1.jpg"]
    assert table.column("width").to_pylist() == [9, 9] and table.column("status").to_pylist() == ["success"] * 2
    stats = json.loads((tmp_path / "o" / "00000_stats.json").read_text())
    assert set(stats) == {"count", "successes", "failed_to_download", "failed_to_resize", "duration",
                          "start_time", "end_time", "status_dict"}
    assert stats["successes"] == 2 and stats["status_dict"] == {"success": 2}


def test_write_through_a_pipe_command(tmp_path):
    dest = tmp_path / "piped.tar"
    with ShardWriter(f"pipe:cat > {shlex.quote(str(dest))}") as w:
        for key, files in _records(2):
            w.write(key, files)
    assert [s.key for s in open_pairs(str(dest)).iter_samples(shuffle=False)] == ["000000000", "000000001"]
    with pytest.raises(remote.ShardOpenError, match=r"pipe:exit 3: command exited with status 3"):
        with ShardWriter("pipe:exit 3") as w:
            w.write(*_records(1)[0])


def test_labelled_eval_shards_over_http_match_local(served):
    root, url = served
    for s in range(2):
        members = []
        for i in range(3):
            key = f"s{s}_{i}"
            members += [(f"{key}.png", image_bytes(colour_of(3 * s + i))), (f"{key}.cls", str((s + i) % 2).encode())]
        write_tar(root / "ds" / "test" / f"{s}.tar", members)
    (root / "ds" / "classnames.txt").write_text("cat\ndog\n")  # CLIP_benchmark layout: one folder up
    local = open_labelled(str(root / "ds" / "test" / "{0..1}.tar"))
    streamed = open_labelled(f"{url}/ds/test/{{0..1}}.tar")
    assert streamed.classnames == local.classnames == ["cat", "dog"]
    assert streamed.labels.tolist() == local.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(streamed, local))
    with pytest.raises(ValueError, match=r"cannot read eval shard: .*/ds/test/7\.tar: HTTP 404"):
        open_labelled(f"{url}/ds/test/{{0,7}}.tar")


@pytest.fixture(scope="module")
def micro_json(tmp_path_factory) -> str:
    from conftest import micro_config

    path = tmp_path_factory.mktemp("cfg") / "micro.json"
    path.write_text(micro_config("vit").to_json())
    return str(path)


def test_train_streams_http_and_pipe_shards_like_local_files(served, micro_json, tmp_path):
    """``clipforge train`` over http://127.0.0.1:PORT/...{000..003}.tar and pipe:cat reads the same
    samples in the same order as from the local files: the deterministic runs end bit-identical."""
    import torch

    from clipforge.checkpoints import load_model
    from clipforge.cli.main import main

    root, url = served
    make_shards(root / "sh", 4, 4)
    for i in range(4):
        (root / "sh" / f"{i:05d}.tar").rename(root / "sh" / f"{i:03d}.tar")
    specs = {"local": str(root / "sh" / "{000..003}.tar"), "http": f"{url}/sh/{{000..003}}.tar",
             "pipe": f"pipe:cat {shlex.quote(str(root / 'sh'))}/{{000..003}}.tar"}
    weights = {}
    for name, spec in specs.items():
        out = tmp_path / name
        rc = main(["train", "--model", micro_json, "--data", spec, "--steps", "3", "--batch-size", "4",
                   "--workers", "0", "--out", str(out), "--save-every", "0", "--deterministic", "--threads", "1",
                   "--no-progress", "--warmup", "1", "--device", "cpu"])
        assert rc == 0, name
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps_done"] == 3 and summary["skip_stats"]["total"] == 0, summary
        weights[name] = load_model(out / "final.safetensors").state_dict()
    for name in ("http", "pipe"):
        assert all(torch.equal(v, weights[name][k]) for k, v in weights["local"].items()), name


def test_curation_reads_urls_and_pipes_and_writes_shards_to_urls(served, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("pyarrow")
    from clipforge.curation import BalanceStep, RunOptions, open_pool, run_step

    root, url = served
    make_shards(root / "sh", 3, 3)

    def run(spec: str, state: Path, shards_to: str | None = None) -> dict:
        return run_step(BalanceStep(["caption"], max_per_query=4), open_pool(spec), state,
                        RunOptions(progress=False, shards_to=shards_to))

    run(str(root / "sh"), tmp_path / "local")
    written = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert written == ["00000.tar", "00001.tar"]  # 4 kept: 3 + 1, shard 00002 keeps nothing
    run(f"{url}/sh/{{00000..00002}}.tar", tmp_path / "s1", shards_to="memory://cf-cur/out")
    run(f"pipe:cat {shlex.quote(str(root / 'sh'))}/{{00000..00002}}.tar", tmp_path / "s2",
        shards_to=f"file://{tmp_path}/piped")
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/cf-cur/out", detail=False)) == \
        ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    for name in written:
        ref = (tmp_path / "local" / name).read_bytes()
        assert fs.cat(f"/cf-cur/out/{name}") == ref == (tmp_path / "piped" / name).read_bytes()
    stats = json.loads(fs.cat("/cf-cur/out/00001_stats.json"))
    assert (stats["count"], stats["successes"]) == (3, 1) and "fingerprint" not in stats
    fs.rm("/cf-cur", recursive=True)


def test_loader_worker_processes_and_resume_over_http_match_local(served):
    """Two DataLoader worker processes stream the URLs; a resumed loader continues exactly."""
    import torch
    from data.datatestutil import char_tokenize, tiny_transform

    from clipforge.data import make_pair_loader

    root, url = served
    make_shards(root / "sh", 5, 4)
    kw = dict(transform=tiny_transform, tokenize=char_tokenize, batch_size=3, shuffle_buffer=4, seed=3, num_workers=2)

    def take(loader, n):
        return [next(loader) for _ in range(n)]

    local = make_pair_loader(open_pairs(str(root / "sh" / "{00000..00004}.tar")), **kw)
    expected = take(local, 9)
    local.close()
    ref = make_pair_loader(open_pairs(f"{url}/sh/{{00000..00004}}.tar"), **kw)
    first = take(ref, 4)
    state = json.loads(json.dumps(ref.state_dict()))
    ref.close()
    resumed = make_pair_loader(open_pairs(f"{url}/sh/{{00000..00004}}.tar"), **kw)
    resumed.load_state_dict(state)
    rest = take(resumed, 5)
    resumed.close()
    got = first + rest
    assert len(got) == len(expected) == 9
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    assert resumed.stats.total == 0
