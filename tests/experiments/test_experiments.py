"""``clipforge experiment objectives|scaling`` end to end on tiny models: results and plots are
written, finished runs are reused, a budget stops and a re-run resumes, a folder of another recipe
is refused, FLOPs are the planner's count, and the CLI's choices match the library's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.experiments import (SCALING_FAMILY, Budget, ObjectivesConfig, ScalingConfig, family_config, run_objectives,
                                   run_scaling, training_flops)
from clipforge.plan import count_loss_flops, count_model_flops
from clipforge.training import LabelledZeroShot

from ..conftest import micro_config


@pytest.fixture
def micro_file(tmp_path):
    cfg = micro_config("vit")
    path = tmp_path / "micro.json"
    path.write_text(cfg.to_json())
    return str(path)


def _objectives(tmp_path, micro_file, **kw):
    base = dict(out=str(tmp_path / "obj"), model=micro_file, steps=4, batch_size=8, eval_every=2, warmup=1,
                threads=1, num_workers=0, device="cpu", progress=False)
    return ObjectivesConfig(**{**base, **kw})


def test_objectives_experiment_writes_curves_ratios_and_plot(tmp_path, micro_file):
    result = run_objectives(_objectives(tmp_path, micro_file))
    assert result["status"] == "complete"
    for objective in ("contrastive", "bow", "caption"):
        run = result["runs"][objective][0]
        assert run["status"] == "completed" and not run["reused"]
        assert [n for n, _ in run["curve"]] == [16, 32]            # evaluated at steps 2 and 4, x batch 8
        assert all(0.0 <= a <= 1.0 for _, a in run["curve"])
    calibrated = result["runs"]["bow"][0]["curve_calibrated"]   # bow runs are also scored without the token prior
    assert [n for n, _ in calibrated] == [16, 32] and result["series"]["bow-calibrated"][0]["final_acc"] == calibrated[-1][1]
    level = result["common_level"]
    bests = [r[0]["best_acc"] for r in result["series"].values()]
    above = [b for b in bests if b > 1 / 8]                   # curves at chance are left out of the level
    assert level == (min(above) if above else None)
    assert len(result["never_above_chance"]) == len(bests) - len(above)
    if "contrastive" in result["reach"]:                       # the ratio of contrastive to itself
        assert result["ratios"]["contrastive"]["median"] in (1.0, None)
    saved = json.loads((tmp_path / "obj" / "results.json").read_text())
    assert saved["metric"] == "eval/heldout_colour_shape_acc" and saved["chance"] == pytest.approx(1 / 8)
    assert (tmp_path / "obj" / "objectives.png").stat().st_size > 1000
    # same command again: every run reused, nothing retrained
    final = tmp_path / "obj" / "caption-s0" / "final.safetensors"
    before = final.stat().st_mtime_ns
    again = run_objectives(_objectives(tmp_path, micro_file))
    assert all(r[0]["reused"] for r in again["runs"].values())
    assert final.stat().st_mtime_ns == before
    assert again["runs"]["bow"][0]["curve"] == result["runs"]["bow"][0]["curve"]


def test_objectives_budget_stops_and_a_rerun_resumes(tmp_path, micro_file, monkeypatch):
    # The clock made deterministic: the first run is given a sliver of time (its time limit ends it
    # after its first step, whatever the machine's speed), then the budget is spent.
    left = iter([1e-9])
    monkeypatch.setattr(Budget, "remaining_minutes", lambda self: next(left, 0.0))
    cfg = _objectives(tmp_path, micro_file, objectives=("contrastive", "bow"), steps=6, minutes=1.0)
    partial = run_objectives(cfg)
    monkeypatch.undo()
    assert partial["status"] == "partial"
    first = partial["runs"]["contrastive"][0]
    assert first["status"] == "time_limit" and first["steps_done"] == 1
    assert partial["runs"]["bow"][0]["status"] == "not_started"
    done = run_objectives(_objectives(tmp_path, micro_file, objectives=("contrastive", "bow"), steps=6))
    assert done["status"] == "complete"
    for objective in ("contrastive", "bow"):
        assert done["runs"][objective][0]["steps_done"] == 6
        assert [n for n, _ in done["runs"][objective][0]["curve"]] == [16, 32, 48]


def test_objectives_run_killed_before_its_first_checkpoint_starts_again(tmp_path, micro_file):
    """SIGKILL before a run's first checkpoint leaves config.json (and a metrics line) but nothing
    to resume from: a re-run must train that run from the start, not refuse it forever."""
    import shutil

    from clipforge.training import list_checkpoints

    cfg = _objectives(tmp_path, micro_file, objectives=("contrastive",))
    first = run_objectives(cfg)["runs"]["contrastive"][0]
    run = tmp_path / "obj" / "contrastive-s0"
    assert list_checkpoints(run)
    # the half-made folder: what the trainer writes before its first checkpoint
    for p in run.iterdir():
        if p.name not in ("config.json", "model_config.json", "metrics.jsonl"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 123.0}\n')
    assert not list_checkpoints(run) and (run / "config.json").is_file()
    again = run_objectives(cfg)
    redone = again["runs"]["contrastive"][0]
    assert again["status"] == "complete" and redone["status"] == "completed" and not redone["reused"]
    assert redone["steps_done"] == 4 and redone["curve"] == first["curve"]  # the same run, from step 0
    assert "123.0" not in (run / "metrics.jsonl").read_text()
    # a half-made folder of another recipe is still refused
    for p in run.iterdir():
        if p.name != "config.json":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(ValueError, match=r"holds another run \(lr: 0.001 there, 0.002 asked\)"):
        run_objectives(_objectives(tmp_path, micro_file, objectives=("contrastive",), lr=2e-3))


def test_objectives_stop_at_a_signal(tmp_path, micro_file, monkeypatch):
    from clipforge.experiments import objectives

    calls = []

    def interrupted(config, budget=None, evaluator=None):
        calls.append(config.out)
        return {"status": "interrupted", "steps_done": 1}

    monkeypatch.setattr(objectives, "train_or_resume", interrupted)
    result = run_objectives(_objectives(tmp_path, micro_file))
    assert len(calls) == 1 and result["interrupted"] and result["status"] == "partial"


def test_level_leaves_out_curves_at_chance():
    from clipforge.experiments.objectives import summarise

    curves = {"contrastive": {0: [(10, 0.2), (20, 0.6)]}, "caption": {0: [(10, 0.1), (20, 0.1)]},
              "bow": {0: [(10, 0.1), (20, 0.3)]}}
    stats = summarise(curves, chance=0.1)
    assert stats["never_above_chance"] == ["caption-s0"]
    assert stats["common_level"] == 0.3 and set(stats["reach"]) == {"contrastive", "bow"}
    assert stats["reach"]["contrastive"][0]["images"] == pytest.approx(12.5)
    assert stats["ratios"]["bow"]["per_seed"][0] == {"ratio": pytest.approx(20 / 12.5), "bound": "="}
    assert summarise({"caption": {0: [(10, 0.1)]}}, chance=0.1)["common_level"] is None
    # the same at fractions of the way up from chance: 0.15 (contrastive between 0 and 10 images: an upper bound)
    levels = {lv["fraction"]: lv for lv in stats["levels"]}
    assert levels[0.25]["level"] == pytest.approx(0.15) and levels[1.0]["level"] == pytest.approx(0.3)
    assert levels[0.25]["reach"]["contrastive"][0] == {"level": pytest.approx(0.15), "images": 10.0, "upper_bound": True}
    assert levels[0.25]["ratios"]["bow"]["per_seed"][0]["bound"] == ">="
    assert levels[1.0]["ratios"]["contrastive"]["median"] == 1.0


def test_objectives_refuses_a_folder_of_another_recipe(tmp_path, micro_file):
    run_objectives(_objectives(tmp_path, micro_file, objectives=("bow",)))
    with pytest.raises(ValueError, match=r"holds another run \(lr: 0.001 there, 0.002 asked\)"):
        run_objectives(_objectives(tmp_path, micro_file, objectives=("bow",), lr=2e-3))


def test_objectives_early_evaluations_and_folder_identity(tmp_path, micro_file):
    cfg = _objectives(tmp_path, micro_file, objectives=("contrastive",), steps=8, eval_every=4, first_eval=1)
    assert cfg.eval_steps() == [1, 2, 4, 8]
    result = run_objectives(cfg)
    assert [n for n, _ in result["runs"]["contrastive"][0]["curve"]] == [8, 16, 32, 64]
    metrics = (tmp_path / "obj" / "contrastive-s0" / "metrics.jsonl").read_text()
    assert '"step": 3, "eval/' not in metrics                     # off the schedule: not scored
    assert "eval/seen_colour_shape_acc" not in metrics            # only the experiment's task is scored
    with pytest.raises(ValueError, match=r"scored otherwise \(first_eval: 1 there, 2 asked\)"):
        run_objectives(_objectives(tmp_path, micro_file, objectives=("contrastive",), steps=8, eval_every=4,
                                   first_eval=2))


@pytest.mark.parametrize("kw,match", [({"objectives": ("contrastive", "mse")}, "mse"),
                                      ({"first_eval": 3}, "first_eval: must divide"),
                                      ({"task": "colour"}, "not a scene task"),
                                      ({"eval_every": 0}, "eval_every"),
                                      ({"data": "pairs.jsonl"}, "zeroshot: a labelled dataset is needed"),
                                      ({"seeds": (1, 1)}, "must not repeat")])
def test_objectives_config_refuses_bad_settings(tmp_path, micro_file, kw, match):
    with pytest.raises(ValueError, match=match):
        _objectives(tmp_path, micro_file, **kw)


def _labelled_npz(path, per_class=(5, 3, 4)):
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    rng.shuffle(labels)
    images = rng.integers(0, 255, size=(len(labels), 16, 16, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=labels, class_names=np.array(["cat", "dog", "ship"]))
    return labels


def test_labelled_zeroshot_sample_is_stratified_and_fixed(tmp_path):
    labels = _labelled_npz(tmp_path / "d.npz")
    z = LabelledZeroShot(str(tmp_path / "d.npz"), n=7, seed=3, templates=["a {}."])
    task = z.task()
    counts = np.bincount(task.labels, minlength=3)
    assert counts.tolist() == [3, 2, 2] or sorted(counts.tolist()) == [2, 2, 3]
    assert counts.max() - counts.min() <= 1
    assert task.classnames == ["cat", "dog", "ship"] and task.templates == ["a {}."]
    again = LabelledZeroShot(str(tmp_path / "d.npz"), n=7, seed=3).task()
    assert np.array_equal(again.labels, task.labels) and again.templates == ["a photo of a {}."]
    assert len(labels) == 12


def test_objectives_scored_on_a_labelled_dataset(tmp_path, micro_file):
    _labelled_npz(tmp_path / "d.npz")
    result = run_objectives(_objectives(tmp_path, micro_file, objectives=("contrastive", "caption"),
                                        zeroshot=str(tmp_path / "d.npz"), zeroshot_n=6))
    assert result["metric"] == "eval/zeroshot_acc" and result["chance"] == pytest.approx(1 / 3)
    for objective in ("contrastive", "caption"):
        accs = [a for _, a in result["runs"][objective][0]["curve"]]
        assert len(accs) == 2 and all(round(a * 6) == a * 6 for a in accs)  # k of 6 images right


def test_family_grows_and_flops_are_the_planners_count():
    widths = [family_config(s).vision.width for s in SCALING_FAMILY]
    assert widths == sorted(widths) and len(widths) >= 5
    arch = family_config("s64")
    assert arch.text.width == arch.embed_dim == 64 and arch.vision.layers == SCALING_FAMILY["s64"][1]
    f = training_flops(arch, steps=10, batch_size=32)
    assert f["per_image"] == count_model_flops(arch).train
    assert f["total"] == f["per_image"] * 320 + count_loss_flops(32, 32, 64) * 10
    flops = [training_flops(family_config(s), 1, 1)["per_image"] for s in SCALING_FAMILY]
    assert flops == sorted(flops)
    with pytest.raises(ValueError, match="unknown size 's40'"):
        family_config("s40")


def test_scaling_experiment_fits_and_predicts(tmp_path):
    cfg = ScalingConfig(out=str(tmp_path / "sc"), sizes=("s32", "s48", "s64"), steps=3, batch_size=8, warmup=1,
                        eval_per_class=2, val_pairs=16, threads=1, num_workers=0, device="cpu", progress=False)
    result = run_scaling(cfg)
    assert result["status"] == "complete"
    rows = result["rows"]
    assert [r["size"] for r in rows] == ["s32", "s48", "s64"]
    for r in rows:
        m = r["measured"]
        assert set(m["zeroshot_error"]) >= {"heldout_colour_shape", "seen_colour_shape"}
        assert m["mean_zeroshot_error"] == pytest.approx(np.mean(list(m["zeroshot_error"].values())))
        assert m["val_loss"] > 0
    fit = result["fits"]["val_loss"]
    x = [r["flops"]["total"] for r in rows]
    y = [r["measured"]["val_loss"] for r in rows]
    slope = np.polyfit(np.log10(x), np.log10(y), 1)[0]
    assert fit["all"]["exponent"] == pytest.approx(slope, rel=1e-6)
    assert fit["holdout_largest"]["x"] == max(x)
    assert (tmp_path / "sc" / "scaling.png").stat().st_size > 1000
    again = run_scaling(cfg)                        # reused, and the measurements come from the cache
    assert all(r["reused"] for r in again["rows"])
    assert again["fits"]["val_loss"]["all"]["exponent"] == fit["all"]["exponent"]


def test_scaling_config_needs_three_sizes(tmp_path):
    with pytest.raises(ValueError, match=">= 3 distinct sizes"):
        ScalingConfig(out=str(tmp_path), sizes=("s32", "s48"))


def test_cli_choices_match_the_library():
    from clipforge.cli import experiment as cli
    from clipforge.experiments import OBJECTIVES

    assert cli.SIZES == tuple(SCALING_FAMILY) and cli.OBJECTIVES == OBJECTIVES


def test_cli_objectives_runs_and_prints_the_table(tmp_path, micro_file, capsys):
    from clipforge.cli.main import main

    code = main(["experiment", "objectives", "--out", str(tmp_path / "o"), "--model", micro_file, "--steps", "2",
                 "--eval-every", "2", "--batch-size", "4", "--objectives", "contrastive,bow", "--workers", "0",
                 "--threads", "1", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "contrastive" in out and "bow" in out and "x contrastive" in out
    assert (tmp_path / "o" / "results.json").is_file()


def test_cli_scaling_runs_and_prints_the_fits(tmp_path, capsys):
    from clipforge.cli.main import main

    code = main(["experiment", "scaling", "--out", str(tmp_path / "s"), "--sizes", "s32,s48,s64", "--steps", "2",
                 "--warmup", "1", "--batch-size", "4", "--eval-per-class", "1", "--val-pairs", "8", "--workers", "0",
                 "--threads", "1", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "val_loss: exponent" in out and "s64" in out
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert saved["config"]["sizes"] == ["s32", "s48", "s64"] and saved["config"]["steps"] == 2


@pytest.mark.slow  # six short runs, each measured
def test_scaling_width_rule_sweep_and_selection_target(tmp_path):
    cfg = ScalingConfig(out=str(tmp_path / "sc"), sizes=("s32", "s48", "s64"), steps=2, batch_size=4, warmup=1,
                        eval_per_class=1, val_pairs=8, threads=1, num_workers=0, device="cpu", progress=False,
                        lr=1e-3, lr_rule="width", lr_base_width=64, lr_multipliers=(0.5, 2.0), selection_per_type=2)
    assert cfg.size_lr("s32") == pytest.approx(2e-3) and cfg.size_lr("s64") == pytest.approx(1e-3)
    result = run_scaling(cfg)
    assert result["status"] == "complete"
    for r in result["rows"]:
        width = family_config(r["size"]).vision.width
        rates = [e["lr"] for e in r["lr_sweep"]]
        assert rates == pytest.approx([1e-3 * 64 / width * m for m in (0.5, 2.0)])
        for m, e in zip((0.5, 2.0), r["lr_sweep"]):  # each sweep run trained at its own rate
            saved = json.loads((tmp_path / "sc" / f"{r['size']}-x{m:g}" / "config.json").read_text())
            assert saved["lr"] == pytest.approx(e["lr"])
        best = min(r["lr_sweep"], key=lambda e: e["val_loss"])
        assert r["lr"] == best["lr"] and r["measured"]["val_loss"] == best["val_loss"]
        sel = r["measured"]["selection"]
        assert sel["n"] == 10 and 0.0 <= sel["group_error"] <= 1.0
    assert "selection_group_error" in result["fits"] and "selection_text_error" in result["fits"]
    from clipforge.experiments.scaling import format_scaling

    assert "lr" in format_scaling(result).splitlines()[0]
    with pytest.raises(ValueError, match="lr_rule"):
        ScalingConfig(out=str(tmp_path), sizes=("s32", "s48", "s64"), lr_rule="sqrt")
    with pytest.raises(ValueError, match="lr_multipliers"):
        ScalingConfig(out=str(tmp_path), sizes=("s32", "s48", "s64"), lr_multipliers=(1.0, 1.0))


def _seed_result(seed: int, losses: list[float], errors: list[float]) -> dict:
    """A run_scaling result as written (three sizes), with the given targets and no training."""
    from clipforge.experiments.scaling import fits

    sizes = ("s32", "s48", "s64")
    rows = []
    for size, loss, err in zip(sizes, losses, errors):
        measured = {"val_loss": loss, "mean_zeroshot_error": err,
                    "zeroshot_error": {"position": err, "relation": err}, "selection": {"group_error": err / 2,
                                                                                       "text_error": err / 3}}
        rows.append({"size": size, "width": 1, "layers": 1, "heads": 1, "lr": 1e-3, "parameters": 1,
                     "flops": training_flops(family_config(size), 10, 4), "measured": measured})
    config = {"seed": seed, "sizes": list(sizes), "steps": 10, "batch_size": 4, "lr_rule": "width",
              "lr_multipliers": [1.0], "selection_per_type": 5}
    return {"config": config, "rows": rows, "fits": fits(rows)}


def test_scaling_seeds_are_averaged_then_fitted(tmp_path):
    from clipforge.experiments.scaling import combine_seeds

    a = _seed_result(0, [2.0, 1.6, 1.2], [0.5, 0.4, 0.3])
    b = _seed_result(1, [2.2, 1.4, 1.0], [0.7, 0.4, 0.1])
    out = combine_seeds([a, b], tmp_path / "mean.png")
    assert out["config"]["seeds"] == [0, 1] and out["status"] == "complete"
    assert [r["measured"]["val_loss"] for r in out["rows"]] == pytest.approx([2.1, 1.5, 1.1])
    assert [r["measured"]["zeroshot_error"]["position"] for r in out["rows"]] == pytest.approx([0.6, 0.4, 0.2])
    assert [r["measured"]["selection"]["group_error"] for r in out["rows"]] == pytest.approx([0.3, 0.2, 0.1])
    assert [r["seed_sd"]["val_loss"] for r in out["rows"]] == pytest.approx([0.1, 0.1, 0.1])
    x = [r["flops"]["total"] for r in out["rows"]]
    slope = np.polyfit(np.log10(x), np.log10([2.1, 1.5, 1.1]), 1)[0]
    assert out["fits"]["val_loss"]["all"]["exponent"] == pytest.approx(slope, rel=1e-6)
    assert out["per_seed_holdout_relative_error"]["val_loss"] == [
        a["fits"]["val_loss"]["holdout_largest"]["relative_error"], b["fits"]["val_loss"]["holdout_largest"]["relative_error"]]
    assert (tmp_path / "mean.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="the same seed twice"):
        combine_seeds([a, a])
    c = _seed_result(2, [2.0, 1.6, 1.2], [0.5, 0.4, 0.3])
    c["config"]["steps"] = 20
    with pytest.raises(ValueError, match=r"differ in \['steps'\]"):
        combine_seeds([a, c])
