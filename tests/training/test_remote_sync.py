"""``--remote-sync`` (open_clip's option, here triggered by steps and checkpoints, not the clock):
the remote copy of a run folder (a local folder, or an fsspec ``memory://`` URL), atomic copies,
pruned checkpoints removed, and a run resumed from the remote copy alone."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from clipforge.cli.main import main
from clipforge.training import TrainConfig, train
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint
from clipforge.training.remote_sync import RemoteSync

DATA = "builtin:scenes?n=32&size=32"


def _config(model_json: str, out: Path, **kw) -> TrainConfig:
    base = dict(model=model_json, data=DATA, steps=6, batch_size=8, lr=2e-3, warmup=1, num_workers=0, out=str(out),
                save_every=2, keep_last=2, log_every=1, deterministic=True, progress=False, threads=1)
    return TrainConfig(**{**base, **kw})


def _memory_url() -> str:
    return f"memory://clipforge-tests/{uuid.uuid4().hex}/run"  # the memory filesystem is process-wide


def _remote_files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    return {str(p)[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _local_files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_remote_holds_the_run_folder(tmp_path, model_json, kind):
    url = str(tmp_path / "remote") if kind == "local" else _memory_url()
    summary = train(_config(model_json, tmp_path / "run", remote_sync=url))
    assert summary["status"] == "completed"
    remote = _local_files(tmp_path / "remote") if kind == "local" else _remote_files(url)
    local = _local_files(tmp_path / "run")
    assert remote == local  # every finished file, byte for byte; nothing else (no temporaries)
    assert {"config.json", "metrics.jsonl", "summary.json", "final.safetensors"} <= set(remote)
    # pruned checkpoints left the remote too (keep_last 2 of steps 2, 4, 6)
    assert sorted(k for k in remote if k.startswith("checkpoints/")) == ["checkpoints/step_0000004.pt",
                                                                         "checkpoints/step_0000006.pt"]


def test_sync_by_steps_not_clock(tmp_path, model_json):
    """--remote-sync-frequency 2 without intermediate checkpoints: after step 2 and 4 the remote has the
    records up to that step (seen from should_stop, which runs before the step's own sync)."""
    url = _memory_url()
    seen = {}

    def probe(step: int) -> bool:
        files = _remote_files(url)
        seen[step] = len(files.get("metrics.jsonl", b"").splitlines())
        return False

    train(_config(model_json, tmp_path / "run", save_every=0, remote_sync=url, remote_sync_frequency=2, steps=5),
          should_stop=probe)
    assert seen == {1: 0, 2: 0, 3: 2, 4: 2, 5: 4}
    assert len(_remote_files(url)["metrics.jsonl"].splitlines()) == 5  # the end syncs everything


def test_a_failed_copy_leaves_no_file_on_the_remote(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_0000001.pt").write_bytes(b"x" * 1000)
    url = _memory_url()
    sync = RemoteSync(run, url)
    real = sync.fs.put_file

    def half_then_fail(lpath, rpath, **kw):
        sync.fs.pipe_file(rpath, b"x" * 500)  # half written under its temporary name ...
        raise OSError("connection reset")  # ... then the copy fails

    sync.fs.put_file = half_then_fail
    with pytest.raises(OSError, match="connection reset"):
        sync.sync()
    assert _remote_files(url) == {}  # neither the final name nor the temporary
    sync.fs.put_file = real
    assert sync.sync() == ["checkpoints/step_0000001.pt"]
    assert _remote_files(url) == {"checkpoints/step_0000001.pt": b"x" * 1000}
    assert sync.sync() == []  # unchanged files are not copied again


def test_resume_from_the_remote_copy_alone(tmp_path, model_json, capsys):
    straight = tmp_path / "straight"
    train(_config(model_json, straight))
    url = _memory_url()
    first = train(_config(model_json, tmp_path / "first", remote_sync=url), should_stop=lambda s: s == 3)
    assert first["steps_done"] == 3
    shutil.rmtree(tmp_path / "first")  # the machine is gone; the remote copy is all there is
    code = main(["train", "--resume", url, "--out", str(tmp_path / "second"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    a = load_checkpoint(list_checkpoints(straight)[-1][1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "second")[-1][1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "second" / "config.json").read_text())
    assert saved["remote_sync"] == url  # the continued run keeps syncing there
    assert "checkpoints/step_0000006.pt" in _remote_files(url)


def test_bad_remote_options_are_one_line_errors(tmp_path, model_json, capsys):
    with pytest.raises(ValueError, match="remote_sync_protocol"):
        _config(model_json, tmp_path / "r", remote_sync="x", remote_sync_protocol="s3")
    out = tmp_path / "r"
    assert main(["train", "--model", model_json, "--data", DATA, "--steps", "1", "--out", str(out),
                 "--no-progress", "--remote-sync", "nosuchprotocol://bucket/run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "remote_sync" in err[0], err
    assert main(["train", "--resume", _memory_url(), "--out", str(tmp_path / "s"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0], err
