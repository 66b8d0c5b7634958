"""The GPU acceptance script (benchmarks/gpu_acceptance.py) on CPU: every section runs, no row
fails, and every CUDA-only row says so. ``--smoke`` (tiny models, no rows that start clipforge
processes) is in the default suite; the ``--quick`` run (what the docs promise in < 3 min on two
quiet cores, CLI, torchrun and SIGTERM-resume rows included) is marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.py"
SECTIONS = {"correctness", "training", "inference", "plan"}


def _run(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "gpu_acceptance.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Time limits scaled up: they keep a GPU run under 8 minutes, not a shared CI core under load.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *flags, "--limit-scale", "20",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def _check(result: dict) -> None:
    rows = result["rows"]
    assert {r["section"] for r in rows} == SECTIONS
    assert result["device"] == "cpu"
    failed = [(r["section"], r["row"], r["detail"]) for r in rows if r["status"] == "failed"]
    assert not failed, failed
    assert all(r["status"] in ("ok", "skipped") and isinstance(r["detail"], str) for r in rows)
    by_name = {f"{r['section']}/{r['row']}": r for r in rows}
    cuda_only = [n for n in by_name if n.endswith("/amp") or "/fp16/" in n
                 or n in ("plan/memory", "plan/largest_batch", "plan/memory_grad_checkpointing", "plan/step_time")]
    assert len(cuda_only) >= 10
    for name in cuda_only:
        assert by_name[name]["status"] == "skipped" and by_name[name]["detail"] == "no CUDA", by_name[name]
    # what CPU can check, it checks
    for name in ("correctness/tiny-rn/fast/fp32", "correctness/tiny-rn/inference/amp_bf16",
                 "correctness/tiny-rn/save_on_device_load_cpu", "training/max_batch",
                 "training/grad_checkpointing", "training/local_loss", "inference/encode/fp32/b1",
                 "inference/encode/bf16/b4", "plan/flops"):
        assert by_name[name]["status"] == "ok", by_name[name]
    assert by_name["training/max_batch"]["metrics"]["samples_per_s"] > 0
    assert by_name["plan/flops"]["metrics"]["matches_training_count"] is True


def test_smoke_run_on_cpu(tmp_path):
    result = _run(tmp_path, "--smoke")
    assert result["profile"] == "smoke"
    _check(result)


@pytest.mark.slow
def test_quick_run_on_cpu(tmp_path):
    result = _run(tmp_path, "--quick")
    assert result["profile"] == "quick"
    _check(result)
    by_name = {f"{r['section']}/{r['row']}": r for r in result["rows"]}
    for name in ("training/clipforge_train_cli", "training/torchrun_sigterm", "training/torchrun_resume",
                 "inference/embed_cli", "inference/serve_one_query"):
        assert by_name[name]["status"] == "ok", by_name[name]
