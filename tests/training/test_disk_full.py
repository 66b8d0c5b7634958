"""A checkpoint write that fails (a full disk: ENOSPC mid-write) ends training with one line
naming the path and the errno, removes its temporary file, and leaves the previous checkpoint
as the latest (the run resumes from it)."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytest

from clipforge.cli.main import main
from clipforge.training import TrainConfig, train
from clipforge.training import checkpoint as ck
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint

DATA = "builtin:scenes?n=48&size=32"


@pytest.fixture
def disk_full_at_step_4(monkeypatch):
    """The disk fills up 4 KiB into writing the step-4 checkpoint; records the temporary file."""
    real = ck.atomic_open
    temps: list[str] = []

    @contextlib.contextmanager
    def atomic_open(path, mode="wb", encoding=None):
        with real(path, mode, encoding) as f:
            if not Path(path).name.startswith("step_0000004"):
                yield f
                return
            temps.extend(str(t) for t in Path(path).parent.glob(f".{Path(path).name}.*.tmp"))

            class Full:
                written = 0

                def write(self, b):
                    self.written += len(b)
                    if self.written > 4096:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return f.write(b)

            yield Full()

    monkeypatch.setattr(ck, "atomic_open", atomic_open)
    return temps


def _check_left_behind(out: Path, temps: list[str]) -> None:
    assert temps and all(not Path(t).exists() for t in temps)  # a partial file was written, then removed
    assert [s for s, _ in list_checkpoints(out)] == [2]        # the previous checkpoint stays the latest
    assert load_checkpoint(list_checkpoints(out)[-1][1])["step"] == 2
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (out / "final.safetensors").exists()


def test_enospc_while_saving_a_checkpoint(tmp_path, model_json, disk_full_at_step_4, monkeypatch):
    out = tmp_path / "run"
    cfg = TrainConfig(model=model_json, data=DATA, steps=6, batch_size=8, warmup=1, num_workers=0, out=str(out),
                      save_every=2, keep_last=3, log_every=1, progress=False, threads=1)
    with pytest.raises(OSError) as e:
        train(cfg)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(ck.checkpoint_path(out, 4))
    assert "ENOSPC" in e.value.strerror and "No space left on device" in e.value.strerror
    _check_left_behind(out, disk_full_at_step_4)
    # with space again, the run continues from step 2
    monkeypatch.undo()
    resumed = train(TrainConfig.for_resume(out, progress=False))
    assert resumed["status"] == "completed" and resumed["steps_done"] == 6


def test_cli_train_on_a_full_disk_prints_one_line(tmp_path, model_json, disk_full_at_step_4, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", model_json, "--data", DATA, "--steps", "6", "--batch-size", "8", "--warmup", "1",
                 "--workers", "0", "--out", str(out), "--save-every", "2", "--keep-last", "3", "--no-progress",
                 "--threads", "1"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1
    assert "Traceback" not in err + captured.out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert str(ck.checkpoint_path(out, 4)) in lines[0] and "ENOSPC" in lines[0], lines[0]
    _check_left_behind(out, disk_full_at_step_4)
