"""The demo: a tiny in-process run writes the report folder; the CLI --quick smoke test is slow."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from clipforge.demo import DemoSettings, chance_recall, plan_steps, run_demo


def test_chance_recall_is_exact():
    assert chance_recall(10, 1, 1) == pytest.approx(0.1)
    assert chance_recall(10, 2, 5) == pytest.approx(1 - math.comb(8, 5) / math.comb(10, 5))
    assert chance_recall(4, 1, 5) == 1.0


def test_plan_steps_fits_the_budget():
    assert plan_steps(60.0, 0.5) == 120
    assert plan_steps(5.0, 1.0) == 20            # never fewer than the minimum
    assert plan_steps(5.0, 1.0, minimum=1) == 5


def test_tiny_demo_writes_report_and_reuses_finished_run(tmp_path):
    # threads=1: the demo's own switch (training and evaluation run on one thread)
    settings = DemoSettings(out=str(tmp_path / "demo"), steps=6, quick=True, batch_size=16, threads=1,
                            eval_per_class=4, retrieval_n=20, progress=False)
    res = run_demo(settings)
    out = tmp_path / "demo"
    assert res["status"] == "completed" and res["steps"] == 6 and res["threads"] == 1
    for name in ("results.json", "report.html", "curves.png", "run/final.safetensors", "run/summary.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    tasks = {r["task"]: r for r in saved["zeroshot"]}
    from clipforge.data import SCENE_TASKS

    assert set(tasks) == set(SCENE_TASKS) >= {"heldout_colour_shape", "seen_colour_shape", "counting", "position"}
    assert tasks["heldout_colour_shape"]["chance"] == pytest.approx(1 / 8)
    assert tasks["counting"]["chance"] == pytest.approx(1 / 3) and tasks["position"]["chance"] == pytest.approx(1 / 4)
    for r in tasks.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 4 * r["classes"]
    ret = saved["retrieval"]
    assert ret["n_images"] == 20 and ret["chance_t2i_R@1"] == pytest.approx(1 / 20)
    assert {rec["task"] for rec in saved["records"]} == {"zeroshot_classification", "zeroshot_retrieval",
                                                         "image_caption_selection"}
    sel = saved["selection"]  # quick: 10 minimal pairs per negative type
    from clipforge.data.scene_pairs import SELECTION_TYPES

    assert sel["n"] == 10 * len(SELECTION_TYPES) and list(sel["per_type"]) == list(SELECTION_TYPES)
    for m in [sel["metrics"], *sel["per_type"].values()]:
        assert 0.0 <= m["acc"] <= min(m["text_acc"], m["image_acc"]) <= 1.0
    assert "caption selection" in res["table"] and "Image-caption selection" in (out / "report.html").read_text()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 * 5 + 4 + 1  # text queries x top-5, image queries, curves
    assert "heldout_colour_shape" in html and "text -&gt; image" in html
    assert "heldout_colour_shape" in res["table"] and "chance" in res["table"]
    # a second run with the same settings reuses the finished training run
    before = (out / "run" / "final.safetensors").stat().st_mtime_ns
    again = run_demo(settings)
    assert (out / "run" / "final.safetensors").stat().st_mtime_ns == before
    assert again["zeroshot"] == res["zeroshot"]
    with pytest.raises(ValueError, match="different training run"):
        run_demo(DemoSettings(**{**settings.__dict__, "lr": 0.5}))


@pytest.mark.slow
def test_cli_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "clipforge.cli.main", "demo", "--quick", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heldout_colour_shape" in proc.stdout and "text -> image" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 60
    assert (out / "report.html").is_file() and (out / "curves.png").is_file()
