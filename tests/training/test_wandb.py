"""``--report-to wandb``: wandb is imported only when asked (one line naming the package when it is
absent), and a run logs the same scalars as TensorBoard (offline: WANDB_MODE=offline, no network)."""

from __future__ import annotations

import json
import sys

import pytest

from clipforge.cli.main import main
from clipforge.training import TrainConfig, train
from clipforge.training.metrics import MetricsLog

DATA = "builtin:scenes?n=16&size=32"


def test_absent_wandb_is_one_line_naming_the_package(tmp_path, model_json, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, as when not installed
    code = main(["train", "--model", model_json, "--data", DATA, "--steps", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "r"), "--no-progress", "--report-to", "wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "'wandb'" in err[0] and "clipforge[wandb]" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before any training


def test_report_to_sets_the_fields_and_plain_runs_do_not_import_wandb(tmp_path, model_json, monkeypatch, capsys):
    from clipforge.cli.train import config_from_args
    from clipforge.cli.main import build_parser

    args = build_parser().parse_args(["train", "--report-to", "tensorboard,wandb", "--wandb-project-name", "p"])
    cfg = config_from_args(args)
    assert (cfg.tensorboard, cfg.wandb, cfg.wandb_project_name) == (True, True, "p")
    assert main(["train", "--report-to", "neptune"]) == 2
    assert "--report-to" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "wandb", None)  # a run without --report-to wandb never imports it
    assert train(TrainConfig(model=model_json, data=DATA, steps=1, batch_size=8, num_workers=0, progress=False,
                             out=str(tmp_path / "plain"), threads=1))["status"] == "completed"


class _FakeRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, data: dict, step: int) -> None:
        self.logged.append((dict(data), step))

    def finish(self) -> None:
        pass


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, key, value, step) -> None:
        self.scalars.append((key, value, step))

    def close(self) -> None:
        pass


def test_wandb_gets_what_tensorboard_gets(tmp_path):
    run, tb = _FakeRun(), _FakeWriter()
    log = MetricsLog(tmp_path / "m.jsonl", wandb_run=run)
    log._tb = tb
    log.log({"step": 3, "loss": 1.5, "lr": 1e-3, "ok": True, "epoch": 0, "eval/zeroshot_acc": 0.25, "name": "x"})
    assert run.logged == [({"loss": 1.5, "lr": 1e-3, "epoch": 0, "eval/zeroshot_acc": 0.25}, 3)]
    assert [(k, v, s) for k, v, s in tb.scalars] == [(k, v, 3) for k, v in run.logged[0][0].items()]


def test_offline_wandb_run(tmp_path, model_json, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logged: list[tuple[dict, int]] = []
    real_init = wandb.init

    def init(**kw):  # the real offline run, with its log calls recorded
        r = real_init(**kw)
        real_log = r.log

        def log(data, step=None, **k):
            logged.append((dict(data), step))
            return real_log(data, step=step, **k)

        r.log = log
        return r

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    summary = train(TrainConfig(model=model_json, data=DATA, steps=3, batch_size=8, num_workers=0, progress=False,
                                out=str(out), threads=1, log_every=1, wandb=True, wandb_project_name="clipforge-test"))
    assert summary["status"] == "completed"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for _, step in logged] == [r["step"] for r in records] == [1, 2, 3]
    for (data, _), rec in zip(logged, records):
        assert data == {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
                        and not isinstance(v, bool)}
    run_id = (out / "wandb_id.txt").read_text().strip()
    offline = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), list((out / "wandb").iterdir())


def test_wandb_init_errors_are_one_line(tmp_path, model_json, capsys, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def init(**kw):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.\nmore detail")

    monkeypatch.setattr(wandb, "init", init)
    code = main(["train", "--model", model_json, "--data", DATA, "--steps", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "r"), "--no-progress", "--report-to", "wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No API key" in err[0] and "WANDB_MODE=offline" in err[0], err
