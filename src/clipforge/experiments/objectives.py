"""``clipforge experiment objectives``: the paper's Figure 2 on your data. Which objective learns
zero-shot transfer from the fewest images: contrastive (CLIP), bag-of-words prediction, or
predicting the caption word by word?

Every run trains the same image tower on the same data with the same optimiser, schedule, batch
and seed (the demo's recipe), for the same number of images, differing only in ``objective``;
every ``eval_every`` steps it scores zero-shot accuracy through ``ZeroShotClassifier`` (one
interface for the three). Reported (``results.json`` + ``objectives.png``): accuracy vs images seen
per objective and seed, and the images each objective needed to first reach the accuracy every
run reached, as ratios to contrastive (the paper: bag-of-words ~3x fewer than a caption model,
contrastive another ~4x).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from ..data import SCENE_TASKS, scene_tasks
from ..training import LabelledZeroShot, SceneZeroShot, TrainConfig
from ..utils import read_json, write_json
from .curves import Curve, first_reach, reach_ratio, read_curve
from .runs import Budget, Recipe, train_or_resume

OBJECTIVES = ("contrastive", "bow", "caption")
# what decides which curves an experiment folder's runs carry (the runs' own identity: runs.RUN_IDENTITY)
EXPERIMENT_IDENTITY = ("task", "zeroshot", "zeroshot_n", "templates", "classnames", "eval_every", "first_eval")
CALIBRATED = "bow-calibrated"  # the bow runs' curve with the token prior removed from the score


@dataclass
class ObjectivesConfig(Recipe):
    """One objectives experiment. ``data=None``: the built-in scenes at the model's input size,
    scored on the scene task ``task`` (default: colour-shape combinations never seen in
    training); ``zeroshot``: a labelled dataset spec instead (e.g. CIFAR-10's ``.npz``) scored on
    ``zeroshot_n`` fixed images with ``templates`` / ``classnames`` (``clipforge eval``'s names)."""

    out: str = "runs/objectives"
    objectives: tuple[str, ...] = OBJECTIVES
    seeds: tuple[int, ...] = (0,)
    model: str = "tiny-vit-p16"
    data: str | None = None
    zeroshot: str | None = None
    task: str = "heldout_colour_shape"
    zeroshot_n: int = 500
    templates: str | None = None
    classnames: str | None = None
    eval_every: int = 50
    first_eval: int | None = None

    def __post_init__(self) -> None:
        self.check_recipe()
        self.objectives, self.seeds = tuple(self.objectives), tuple(int(s) for s in self.seeds)
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ValueError(f"objectives: {unknown or 'none given'}; choose from {', '.join(OBJECTIVES)}")
        if len(set(self.objectives)) != len(self.objectives) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("objectives and seeds must not repeat")
        if not self.seeds:
            raise ValueError("seeds: at least one")
        if self.eval_every < 1 or self.eval_every > self.steps:
            raise ValueError(f"eval_every: must be in 1..steps ({self.steps}) (got {self.eval_every})")
        if self.first_eval is not None and not (1 <= self.first_eval < self.eval_every
                                                and self.eval_every % self.first_eval == 0):
            raise ValueError(f"first_eval: must divide eval_every ({self.eval_every}) and be smaller "
                             f"(got {self.first_eval})")
        if self.zeroshot is None and self.task not in SCENE_TASKS:
            raise ValueError(f"task: {self.task!r} is not a scene task ({', '.join(SCENE_TASKS)})")
        if self.data is not None and not self.data.startswith("builtin:scenes") and self.zeroshot is None:
            raise ValueError("zeroshot: a labelled dataset is needed to score runs trained on --data "
                             f"{self.data!r} (the scene tasks only exist for the built-in scenes)")

    @property
    def metric(self) -> str:
        return "eval/zeroshot_acc" if self.zeroshot else f"eval/{self.task}_acc"

    @property
    def calibrated_metric(self) -> str:
        """bow runs' second score (``ZeroShotClassifier(bow_prior="scored")``)."""
        return self.metric.removesuffix("_acc") + "_calibrated_acc"

    def eval_steps(self) -> list[int]:
        """When the runs are scored: every ``eval_every`` steps, and with ``first_eval`` also at
        ``first_eval`` x 1, 2, 4, ... below that (a log-x curve needs its early points)."""
        early, k = [], self.first_eval
        while k is not None and k < self.eval_every:
            early.append(k)
            k *= 2
        return early + list(range(self.eval_every, self.steps + 1, self.eval_every))

    def run_config(self, objective: str, seed: int) -> TrainConfig:
        """The recipe with this experiment's model, data and objective (training's evaluation
        cadence: ``first_eval`` when set, the evaluator skipping the steps off the schedule)."""
        data = {"data": self.data} if self.data else {}
        return self.train_config(self.model, seed, Path(self.out) / f"{objective}-s{seed}", objective=objective,
                                 eval_every=self.first_eval or self.eval_every, **data)

    def evaluator(self, seed: int) -> Callable[[Any, int], dict[str, float]]:
        """The scene task ``task`` (only it: a caption model's scoring is the slow part of its
        run), or ``zeroshot_n`` images of the labelled dataset; scored at :meth:`eval_steps`."""
        if self.zeroshot is None:
            score: Any = SceneZeroShot(names=[self.task])
        else:
            score = LabelledZeroShot(self.zeroshot, n=self.zeroshot_n, seed=seed, templates=self.templates,
                                     classnames=self.classnames)
        steps = set(self.eval_steps())

        def evaluate(model: Any, step: int) -> dict[str, float]:
            return score(model, step) if step in steps else {}  # training logs nothing for {}

        evaluate.task = getattr(score, "task", None)  # type: ignore[attr-defined]
        return evaluate

    def check_folder(self) -> None:
        """The experiment folder's runs were scored with this config's schedule and task (their
        curves are read, not recomputed): refuse a folder written with other ones."""
        path = Path(self.out) / "experiment.json"
        mine = {k: getattr(self, k) for k in EXPERIMENT_IDENTITY}
        if path.is_file():
            saved = read_json(path)
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            if diff:
                shown = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
                raise ValueError(f"{self.out} holds runs scored otherwise ({shown}); use another --out")
        else:
            write_json(path, mine)


def _say(config: ObjectivesConfig, msg: str) -> None:
    if config.progress:
        tqdm.write(msg)


def _at_level(full: dict[str, dict[int, Curve]], level: float) -> dict[str, Any]:
    """Images each curve needed to first reach ``level``, and the ratios to contrastive of the same
    seed (median and range over seeds)."""
    reach = {o: {s: first_reach(c, level) for s, c in by_seed.items()} for o, by_seed in full.items() if by_seed}
    ratios: dict[str, Any] = {}
    if "contrastive" in reach:
        for o in reach:
            per_seed = {s: (reach_ratio(r, reach["contrastive"][s]) if o != "contrastive" or r.images is None
                            else {"ratio": 1.0, "bound": "="}) for s, r in reach[o].items() if s in reach["contrastive"]}
            values = [p["ratio"] for p in per_seed.values() if p["ratio"] is not None]
            ratios[o] = {"per_seed": per_seed,
                         "median": float(np.median(values)) if values else None,
                         "min": min(values) if values else None, "max": max(values) if values else None,
                         "bounds": sorted({p["bound"] for p in per_seed.values() if p["bound"]})}
    return {"reach": {o: {s: r.to_dict() for s, r in by.items()} for o, by in reach.items()}, "ratios": ratios}


LEVEL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the way from chance up to the common level


def summarise(curves: dict[str, dict[int, Curve]], chance: float | None = None) -> dict[str, Any]:
    """The common level (the lowest of the runs' best accuracies: every curve reaches it), the
    images each run needed to first reach it, and the ratios to contrastive of the same seed
    (median and range over seeds); the same at ``LEVEL_FRACTIONS`` of the way up from chance
    (``levels``: which objective is ahead can change with the level). Curves that never rose
    above ``chance`` are left out (listed in ``never_above_chance``): a level at chance would
    compare noise."""
    full = {o: {s: c for s, c in by_seed.items() if c} for o, by_seed in curves.items()}
    floor = chance if chance is not None else -1.0
    flat = sorted(f"{o}-s{s}" for o, by in full.items() for s, c in by.items() if max(v for _, v in c) <= floor)
    full = {o: {s: c for s, c in by.items() if max(v for _, v in c) > floor} for o, by in full.items()}
    bests = [max(v for _, v in c) for by_seed in full.values() for c in by_seed.values()]
    if not bests:
        return {"common_level": None, "reach": {}, "ratios": {}, "levels": [], "never_above_chance": flat}
    level = min(bests)
    levels = []
    if chance is not None:
        for f in LEVEL_FRACTIONS:
            at = chance + f * (level - chance)
            levels.append({"fraction": f, "level": at, **_at_level(full, at)})
    return {"common_level": level, **_at_level(full, level), "levels": levels, "never_above_chance": flat}


def plot(config: ObjectivesConfig, curves: dict[str, dict[int, Curve]], level: float | None,
         chance: float | None, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.8, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    colours = {"contrastive": "tab:blue", "bow": "tab:orange", "caption": "tab:green", CALIBRATED: "tab:red"}
    for o, by_seed in curves.items():
        runs = [c for c in by_seed.values() if c]
        for c in runs:
            xs, ys = zip(*c)
            one = len(runs) == 1
            ax.plot(xs, ys, color=colours.get(o), lw=1.6 if one else 0.8, alpha=1 if one else 0.45,
                    marker="o" if one else None, ms=3, label=o if one else None)
        common = min(len(c) for c in runs) if runs else 0
        if len(runs) > 1 and common:
            xs = [n for n, _ in runs[0][:common]]
            ys = np.mean([[v for _, v in c[:common]] for c in runs], axis=0)
            ax.plot(xs, ys, color=colours.get(o), lw=2, label=f"{o} (mean of {len(runs)} seeds)")
    if level is not None:
        ax.axhline(level, color="grey", lw=0.8, ls=":", label=f"common level: every curve above chance reached it ({level:.2f})")
    if chance is not None:
        ax.axhline(chance, color="black", lw=0.6, ls="--", label=f"chance ({chance:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("images seen")
    what = f"zero-shot on {Path(config.zeroshot).stem}" if config.zeroshot else config.task.replace("_", " ")
    ax.set_ylabel(f"zero-shot accuracy ({what})" if config.zeroshot is None else "zero-shot accuracy")
    where = Path(config.data.split("?")[0]) if config.data else None
    data = "built-in scenes" if where is None else f"{where.parent.name}/{where.name}"
    ax.set_title(f"{what}: trained on {data} ({config.model}, batch {config.batch_size})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _chance(config: ObjectivesConfig, evaluator: Any) -> float | None:
    if config.zeroshot is not None:
        return 1.0 / len(evaluator.task().classnames)
    task = scene_tasks(seed=0, n_per_class=1, names=[config.task]).get(config.task)
    return None if task is None else task.chance


def run_objectives(config: ObjectivesConfig) -> dict[str, Any]:
    """Train (or reuse / resume) every objective x seed run, then write ``results.json`` and
    ``objectives.png`` into ``config.out``; returns the results (``status``: ``complete``, or
    ``partial`` when the budget ran out first; curves then hold what was measured so far)."""
    budget = Budget(config.minutes)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    config.check_folder()
    runs: dict[str, dict[int, dict[str, Any]]] = {o: {} for o in config.objectives}
    curves: dict[str, dict[int, Curve]] = {o: {} for o in config.objectives}
    evaluator = None
    total = len(config.seeds) * len(config.objectives)
    done = 0
    for seed, objective in ((s, o) for s in config.seeds for o in config.objectives):
        if done and runs_stopped(runs):
            break  # a signal stopped the last run: the user wants the experiment to stop, not go on
        if done % len(config.objectives) == 0:
            evaluator = config.evaluator(seed)
        done += 1
        run = config.run_config(objective, seed)
        _say(config, f"[{done}/{total}] {objective}, seed {seed}: {config.steps} steps x {run.batch_size} images "
                     f"-> {run.out}")
        t = time.time()
        summary = train_or_resume(run, budget, evaluator)
        per_step = run.batch_size * run.accum_steps
        curves[objective][seed] = read_curve(run.out, config.metric, per_step)
        runs[objective][seed] = {"run_dir": run.out, "status": summary.get("status"),
                                 "reused": bool(summary.get("reused")), "wall_s": time.time() - t,
                                 "train_wall_s": summary.get("wall_time_s"),
                                 "steps_done": summary.get("steps_done"), "final_loss": summary.get("final_loss"),
                                 "curve": curves[objective][seed]}
        calibrated = read_curve(run.out, config.calibrated_metric, per_step) if objective == "bow" else []
        if calibrated:  # the same runs scored with the token prior removed (a second curve, no second run)
            curves.setdefault(CALIBRATED, {})[seed] = calibrated
            runs[objective][seed]["curve_calibrated"] = calibrated
    complete = done == total and all(r["status"] == "completed" for by in runs.values() for r in by.values())
    chance = _chance(config, evaluator)
    stats = summarise(curves, chance)
    if CALIBRATED in curves:  # the level every *other* curve reaches is usually far above the bow score's
        stats["with_bow_calibrated_only"] = summarise({k: v for k, v in curves.items() if k != "bow"}, chance)
    png = plot(config, curves, stats["common_level"], chance, out / "objectives.png")
    series: dict[str, dict[int, dict[str, Any]]] = {}
    for name, by_seed in curves.items():
        objective = "bow" if name == CALIBRATED else name
        series[name] = {s: {"status": runs[objective][s]["status"], "final_acc": c[-1][1] if c else None,
                            "best_acc": max(v for _, v in c) if c else None} for s, c in by_seed.items()}
    for o, by in runs.items():
        for s, r in by.items():
            r.update(final_acc=series[o][s]["final_acc"], best_acc=series[o][s]["best_acc"])
    result = {"experiment": "objectives", "status": "complete" if complete else "partial",
              "interrupted": runs_stopped(runs),
              "config": asdict(config), "metric": config.metric, "chance": chance,
              "images_per_run": config.steps * config.batch_size, "runs": runs, "series": series, **stats,
              "plot": str(png), "wall_s": time.time() - budget.started}
    write_json(out / "results.json", result)
    return result


def runs_stopped(runs: dict[str, dict[int, dict[str, Any]]]) -> bool:
    """A run was stopped by a signal (SIGINT/SIGTERM; it resumes on the next call)."""
    return any(r["status"] == "interrupted" for by in runs.values() for r in by.values())


def _levels_table(stats: dict[str, Any], title: str) -> list[str]:
    """Median (over seeds) images-to-level ratios to contrastive, one row per level."""
    if not stats.get("levels"):
        return []
    lines = [f"{title} (median over seeds; >= where contrastive was there by its first evaluation):"]
    names = list(stats["levels"][0]["reach"])
    lines.append(f"  {'level':>7}" + "".join(f"{n:>16}" for n in names))
    for lv in stats["levels"]:
        cells = []
        for n in names:
            r = lv["ratios"].get(n, {})
            bound = ">=" if ">=" in r.get("bounds", []) else ""
            cells.append("-" if r.get("median") is None else f"{bound}{r['median']:.2f}")
        lines.append(f"  {lv['level']:>7.3f}" + "".join(f"{c:>16}" for c in cells))
    return lines


def format_objectives(result: dict[str, Any]) -> str:
    """The table ``clipforge experiment objectives`` prints."""
    level = result.get("common_level")
    head = f"images to {level:.3f}" if level is not None else "images to level"
    lines = [f"{'objective':<15}{'seed':>5}{'final acc':>10}{'best acc':>10}{head:>20}{'x contrastive':>15}"
             "  status"]
    for o, by in result["series"].items():
        for s, r in by.items():
            reach = result.get("reach", {}).get(o, {}).get(s)
            ratio = result.get("ratios", {}).get(o, {}).get("per_seed", {}).get(s, {})
            n = "-" if not reach or reach["images"] is None else \
                ("<=" if reach["upper_bound"] else "") + f"{reach['images']:,.0f}"
            x = "-" if not ratio or ratio.get("ratio") is None else \
                ("" if ratio["bound"] == "=" else ratio["bound"]) + f"{ratio['ratio']:.2f}"
            fin = "-" if r["final_acc"] is None else f"{r['final_acc']:.3f}"
            best = "-" if r["best_acc"] is None else f"{r['best_acc']:.3f}"
            lines.append(f"{o:<15}{s:>5}{fin:>10}{best:>10}{n:>20}{x:>15}  {r['status']}")
    lines += _levels_table(result, "images to reach each level, x contrastive")
    alt = result.get("with_bow_calibrated_only")
    if alt and alt.get("common_level") is not None:
        lines += _levels_table(alt, f"without bow's uncalibrated score every curve reaches {alt['common_level']:.3f}; "
                                    "images to each level, x contrastive")
    for o, r in result.get("ratios", {}).items():
        if o != "contrastive" and r["median"] is not None and len(r["per_seed"]) > 1:
            lines.append(f"{o}: x contrastive median {r['median']:.2f} (range {r['min']:.2f}-{r['max']:.2f})")
    if result.get("never_above_chance"):
        lines.append("never above chance (left out of the level): " + ", ".join(result["never_above_chance"]))
    if result.get("chance") is not None:
        lines.append(f"chance {result['chance']:.3f}; metric {result['metric']}")
    return "\n".join(lines)


__all__ = ["ObjectivesConfig", "run_objectives", "format_objectives", "summarise", "OBJECTIVES"]
