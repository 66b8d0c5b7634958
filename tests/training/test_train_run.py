"""The training run end to end on a micro model: files written, exact resumption, SIGTERM,
configuration and data-spec errors, the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge.cli.main import main
from clipforge.fast.linear import onednn_available
from clipforge.training import TrainConfig, train
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint

DATA = "builtin:scenes?n=48&size=32"   # 48 scenes: batch 8 -> 6 steps per epoch, so runs cross epochs
STEPS = 14


def _config(model_json: str, out: Path, **kw) -> TrainConfig:
    base = dict(model=model_json, data=DATA, steps=STEPS, batch_size=8, lr=2e-3, warmup=3, num_workers=0,
                out=str(out), save_every=0, log_every=1, deterministic=True, progress=False, grad_clip=1.0,
                threads=1)  # bit-exact comparisons need the same thread count (reduction order)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run)[-1][1])["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_json) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = train(_config(model_json, out))
    assert summary["status"] == "completed" and summary["steps_done"] == STEPS
    return out


def test_run_folder_contents(reference):
    for name in ("config.json", "model_config.json", "metrics.jsonl", "summary.json", "curves.png", "final.safetensors"):
        assert (reference / name).is_file(), name
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "temperature", "samples_per_s", "skipped", "epoch"):
        assert key in records[0], key
    assert records[-1]["epoch"] >= 2  # 14 steps of 6 per epoch
    assert records[-1]["loss"] < records[0]["loss"]
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["skip_stats"]["total"] == 0 and summary["peak_rss_mb"] > 0 and summary["wall_time_s"] > 0
    from clipforge.checkpoints import load_model

    model = load_model(reference / "final.safetensors")
    final = _weights(reference)
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert float(model.logit_scale.detach().exp()) <= 100.0
    ckpt = load_checkpoint(list_checkpoints(reference)[-1][1])
    for key in ("optimizer", "scheduler", "rank_states", "train_config", "metrics", "config"):
        assert key in ckpt, key
    assert set(ckpt["rank_states"][0]) >= {"rng", "loader", "skip_stats"}
    # a training checkpoint is itself loadable as a model (any-format loader)
    assert torch.equal(load_model(list_checkpoints(reference)[-1][1]).logit_scale, model.logit_scale)


def test_interrupted_and_resumed_run_is_exact(tmp_path, model_json, reference):
    out = tmp_path / "run"
    first = train(_config(model_json, out), should_stop=lambda step: step == 5)
    assert first["status"] == "stopped" and first["steps_done"] == 5
    assert [s for s, _ in list_checkpoints(out)] == [5]
    resumed = train(TrainConfig.for_resume(out, progress=False))
    assert resumed["status"] == "completed" and resumed["steps_done"] == STEPS
    ref, got = _weights(reference), _weights(out)
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ref_loss = [json.loads(x)["loss"] for x in (reference / "metrics.jsonl").read_text().splitlines()]
    got_loss = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert got_loss == ref_loss


def test_resume_refuses_changed_optimisation_and_existing_run(tmp_path, model_json, reference):
    with pytest.raises(ValueError, match="lr"):
        TrainConfig.for_resume(reference, lr=1.0)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(_config(model_json, reference))
    assert TrainConfig.for_resume(reference, log_every=5).log_every == 5
    with pytest.raises(FileNotFoundError, match="config.json"):
        TrainConfig.for_resume(tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/pairs.csv", "pairs.csv"),
    ("{tmp}/empty/shard-{{000..003}}.tar", "shard"),
    ("builtin:nothing", "unknown builtin"),
])
def test_bad_data_spec_fails_before_training(tmp_path, capsys, model_json, spec, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    code = main(["train", "--model", model_json, "--data", spec.format(tmp=tmp_path), "--out", str(out),
                 "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("clipforge train: error:") and message in err, err
    assert not list_checkpoints(out)


def test_config_errors_are_clear(tmp_path, capsys, model_json):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 1
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", "--model", model_json, "--precision", "amp", "--data", DATA, "--steps", "1",
                 "--out", str(tmp_path / "r2"), "--no-progress"]) == 1
    assert "amp" in (err := capsys.readouterr().err) and "needs a CUDA GPU" in err
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert main(["train", "--model", "no-such-model", "--steps", "1", "--out", str(tmp_path / "r3")]) == 1
    assert "no-such-model" in capsys.readouterr().err


def test_cli_train_with_config_file_and_workers(tmp_path, capsys, model_json):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {model_json}\ndata: '{DATA}'\nsteps: 100\nbatch-size: 8\nlr: 0.001\nwarmup: 1\n"
                   "save_every: 2\nkeep_last: 2\nlog_every: 1\n")
    out = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--steps", "4", "--workers", "1", "--accum-steps", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "completed" and printed["steps_done"] == 4
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 4 and saved["lr"] == 0.001 and saved["accum_steps"] == 2 and saved["num_workers"] == 1
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]  # keep_last=2 of 2, 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert (out / "final.safetensors").is_file() and (out / "curves.png").stat().st_size > 1000


def test_sigterm_writes_checkpoint_and_resume_matches(tmp_path, model_json, reference):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipforge.cli.main", "train", "--model", model_json, "--data", DATA,
           "--steps", str(STEPS), "--batch-size", "8", "--lr", "2e-3", "--warmup", "3", "--workers", "0",
           "--out", str(out), "--save-every", "0", "--log-every", "1", "--deterministic", "--no-progress",
           "--grad-clip", "1.0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().strip():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signal.SIGTERM
    k = summary["steps_done"]
    assert 1 <= k < STEPS
    assert [s for s, _ in list_checkpoints(out)] == [k]
    assert not (out / "final.safetensors").exists()
    resumed = train(TrainConfig.for_resume(out, progress=False))
    assert resumed["steps_done"] == STEPS
    ref, got = _weights(reference), _weights(out)
    assert all(torch.equal(ref[n], got[n]) for n in ref)


def test_init_lock_image_grad_checkpointing_bf16(tmp_path, model_json, reference):
    from clipforge.checkpoints import load_model

    init = reference / "final.safetensors"
    out = tmp_path / "lit"
    summary = train(_config(model_json, out, init=str(init), lock_image=True, grad_checkpointing=True,
                            precision="amp_bf16", steps=2, deterministic=False))
    assert summary["status"] == "completed"
    before, after = load_model(init), load_model(out / "final.safetensors")
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        if name.startswith("visual."):
            assert torch.equal(a, b), f"locked image tower changed: {name}"
    changed = [n for (n, a), b in zip(before.state_dict().items(), after.state_dict().values())
               if n.startswith("text.") and not torch.equal(a, b)]
    assert changed, "the text tower did not train"
    ckpt = load_checkpoint(list_checkpoints(out)[-1][1])
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert n_opt == sum(1 for n, _ in after.named_parameters() if not n.startswith("visual."))


def test_periodic_evaluation_scenes_and_validation(tmp_path, model_json):
    out = tmp_path / "eval"
    summary = train(_config(model_json, out, steps=2, eval_every=2, val_data="builtin:scenes?n=24&size=32",
                            deterministic=False))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert len(evals) == 1 and evals[0]["step"] == 2
    keys = set(evals[0])
    for k in ("eval/val_loss", "eval/val_t2i_R@1", "eval/val_i2t_R@5", "eval/heldout_colour_shape_acc",
              "eval/counting_acc", "eval/position_acc"):
        assert k in keys, k
    assert all(0.0 <= evals[0][k] <= 1.0 for k in keys if k.endswith(("_acc", "R@1", "R@5")))
    assert summary["last_eval"]["eval/val_loss"] == evals[0]["eval/val_loss"]


def test_tensorboard_flag_without_tensorboard_warns(tmp_path):
    import importlib.util

    from clipforge.training.metrics import MetricsLog

    if importlib.util.find_spec("tensorboard") is not None:
        log = MetricsLog(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
        log.log({"step": 1, "loss": 2.0})
        log.close()
        assert any((tmp_path / "tb").iterdir())
    else:
        with pytest.warns(UserWarning, match="tensorboard"):
            log = MetricsLog(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
        log.log({"step": 1, "loss": 2.0})
        assert json.loads((tmp_path / "m.jsonl").read_text())["loss"] == 2.0


def test_public_entry_point(tmp_path):
    """``clipforge.train(TrainConfig(...))`` is the Python API (also after submodule imports)."""
    import clipforge
    import clipforge.training.loop  # noqa: F401  (importing submodules must not shadow the function)

    assert clipforge.train is train and clipforge.TrainConfig is TrainConfig
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        clipforge.train(TrainConfig(data=str(tmp_path / "missing.csv"), out=str(tmp_path / "run"), progress=False))


def test_run_folder_records_the_linear_backend(reference):
    """--deterministic pins torch's kernels; config.json, checkpoints and summary say so."""
    assert json.loads((reference / "config.json").read_text())["linear_backend"] == "torch"
    record = load_checkpoint(list_checkpoints(reference)[-1][1])["backend"]
    assert record["linear"] == "torch" and record["deterministic"] and record["machine"]["torch"]
    assert json.loads((reference / "summary.json").read_text())["backend"]["linear"] == "torch"


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN linear in this torch")
def test_resumed_run_uses_the_backend_its_run_folder_recorded(tmp_path, model_json, reference, monkeypatch):
    """A run made with oneDNN's kernels resumes with them although this process now asks for
    torch's: the resumed weights equal the uninterrupted oneDNN run bit for bit."""
    monkeypatch.setenv("CLIPFORGE_LINEAR", "onednn")
    full = tmp_path / "full"
    train(_config(model_json, full, deterministic=False))
    out = tmp_path / "run"
    train(_config(model_json, out, deterministic=False), should_stop=lambda step: step == 5)
    assert json.loads((out / "config.json").read_text())["linear_backend"] == "onednn"
    monkeypatch.setenv("CLIPFORGE_LINEAR", "torch")
    resumed = train(TrainConfig.for_resume(out, progress=False))
    assert resumed["steps_done"] == STEPS and resumed["backend"]["linear"] == "onednn"
    ref, got = _weights(full), _weights(out)
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    # The backend matters (so the equality above is a real check): torch's kernels round differently.
    assert not all(torch.equal(ref[n], v) for n, v in _weights(reference).items())


def test_prune_removes_checkpoints_beyond_keep_and_stray_temporaries(tmp_path):
    """A kill during a checkpoint write leaves `.step_*.pt.*.tmp`; the next save's prune removes it."""
    from clipforge.training.checkpoint import checkpoint_dir, checkpoint_path, prune_checkpoints

    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    for step in (1, 2, 3):
        checkpoint_path(tmp_path, step).write_bytes(b"x")
    stray = folder / ".step_0000004.pt.k3j9x.tmp"
    stray.write_bytes(b"")
    other = folder / "notes.txt"
    other.write_text("kept")
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == sorted([checkpoint_path(tmp_path, 1).name, stray.name])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [checkpoint_path(tmp_path, 2).name, checkpoint_path(tmp_path, 3).name, "notes.txt"])
