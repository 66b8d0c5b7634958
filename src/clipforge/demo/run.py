"""``clipforge demo``: train a tiny CLIP on the built-in captioned scenes within a wall-time budget
on a CPU, then measure what it learned on scenes it never saw:

* zero-shot accuracy on held-out colour-shape combinations (never drawn or named in training),
  the seen-combination control, counting and relative position, each beside its chance level;
* text->image and image->text Recall@1/5 on held-out scenes, beside chance;
* image-caption selection on minimal pairs of held-out scenes (swapped attributes / objects,
  replaced relation / position, changed count): text, image and group scores per negative type;

and write a report folder: ``results.json`` (CLIP_benchmark-shaped records), ``curves.png``,
``report.html`` (example retrievals with the scenes inline) and the training run under ``run/``.
Re-running with the same settings reuses a finished run (and resumes an interrupted one).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import loading
from ..data import scene_retrieval_set
from ..eval import open_selection, retrieval_metrics, selection_metrics, selection_similarities
from ..inference import embed_images, embed_texts
from ..models import CLIP
from ..training import (SceneZeroShot, TrainConfig, list_checkpoints, measure_step_time, resolve_model_config,
                        train)
from ..utils import read_json, torch_threads, write_json
from .budget import OVERHEAD_S, plan_steps, thread_candidates
from .report import write_report

DEMO_MODEL = "tiny-vit-p16"
EVAL_SEED = 2024          # the evaluation scenes; training draws from split "train" with its own seeds


@dataclass
class DemoSettings:
    """Knobs of the demo. ``steps=None`` fits the step count to ``minutes`` by timing a few steps."""

    out: str = "runs/demo"
    minutes: float = 8.0
    steps: int | None = None
    quick: bool = False
    model: str = DEMO_MODEL
    batch_size: int = 128
    lr: float = 1e-3
    wd: float = 0.1
    warmup: int = 50
    num_workers: int = 1
    threads: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    eval_per_class: int = 50
    retrieval_n: int = 500
    selection_per_type: int = 50
    progress: bool = True

    def resolved(self) -> "DemoSettings":
        if not self.quick:
            return self
        # ~1 minute: a short run that shows the pipeline end to end (accuracy is not the point).
        return DemoSettings(**{**asdict(self), "minutes": min(self.minutes, 1.0),
                               "steps": self.steps or 60, "batch_size": min(self.batch_size, 64),
                               "warmup": min(self.warmup, 10), "eval_per_class": min(self.eval_per_class, 10),
                               "retrieval_n": min(self.retrieval_n, 100),
                               "selection_per_type": min(self.selection_per_type, 10)})


def _say(settings: DemoSettings, msg: str) -> None:
    if settings.progress:
        tqdm.write(msg)


def scenes_spec(settings: DemoSettings) -> str:
    """Training scenes rendered at the model's input size (no resampling blur); 200k distinct
    scenes, so a demo-length run never repeats one (they are generated on the fly, nothing is stored)."""
    size = resolve_model_config(settings.model).vision.image_size
    return f"builtin:scenes?n=200000&size={size}"


def train_config(settings: DemoSettings, steps: int, time_limit_s: float | None,
                 threads: int | None) -> TrainConfig:
    return TrainConfig(
        model=settings.model, data=scenes_spec(settings), steps=steps, batch_size=settings.batch_size,
        lr=settings.lr, wd=settings.wd, warmup=min(settings.warmup, max(steps // 5, 1)), grad_clip=1.0,
        num_workers=settings.num_workers, seed=settings.seed, out=str(Path(settings.out) / "run"),
        save_every=max(steps // 4, 25), keep_last=1, log_every=max(1, min(20, steps // 30)),
        time_limit_minutes=time_limit_s / 60 if time_limit_s else None, progress=settings.progress,
        threads=threads, device=settings.device, precision=settings.precision)


# --- evaluation -------------------------------------------------------------------------------------


def zeroshot_results(model: CLIP, n_per_class: int, seed: int = EVAL_SEED) -> list[dict[str, Any]]:
    """Each scene task's accuracy beside its chance level, scored as training's periodic
    evaluation scores them (:class:`clipforge.training.SceneZeroShot`) on scenes of ``seed``."""
    scenes = SceneZeroShot(n_per_class=n_per_class, seed=seed)
    tasks = scenes.tasks(model.image_size)
    accuracy = scenes(model, step=0)
    rows = []
    for name, task in tasks.items():
        acc = accuracy[f"{name}_acc"]
        chance = float(task.chance)
        rows.append({"task": name, "classes": len(task.classnames), "n": len(task.labels),
                     "accuracy": acc, "chance": chance, "x_chance": acc / chance})
    return rows


def _flatten_captions(captions: Sequence[Any]) -> tuple[list[str], np.ndarray, list[list[str]]]:
    texts, owner, per_image = [], [], []
    for i, c in enumerate(captions):
        caps = [c] if isinstance(c, str) else list(c)
        per_image.append(caps)
        texts.extend(caps)
        owner.extend([i] * len(caps))
    return texts, np.asarray(owner, dtype=np.int64), per_image


def chance_recall(n_candidates: int, n_relevant: int, k: int) -> float:
    """Probability that a random ranking puts one of ``n_relevant`` items in the top ``k``."""
    if k >= n_candidates:
        return 1.0
    return 1.0 - math.comb(n_candidates - n_relevant, k) / math.comb(n_candidates, k)


@torch.inference_mode()
def retrieval_results(model: CLIP, images: Sequence[Any], captions: Sequence[Any],
                      n_text_examples: int = 4, n_image_examples: int = 4) -> tuple[dict[str, Any], dict[str, Any]]:
    """Recall@1/5 both ways (with exact chance levels) and a few example queries for the report."""
    texts, owner, per_image = _flatten_captions(captions)
    img = embed_images(model, images, batch_size=128)
    txt = embed_texts(model, texts, batch_size=256)  # batched by token length
    m = retrieval_metrics(img, txt, owner, ks=(1, 5))
    n_img, n_txt = img.shape[0], txt.shape[0]
    metrics = {
        "n_images": n_img, "n_texts": n_txt,
        "t2i_R@1": m["image_retrieval_recall@1"], "t2i_R@5": m["image_retrieval_recall@5"],
        "i2t_R@1": m["text_retrieval_recall@1"], "i2t_R@5": m["text_retrieval_recall@5"],
        "chance_t2i_R@1": chance_recall(n_img, 1, 1), "chance_t2i_R@5": chance_recall(n_img, 1, 5),
        "chance_i2t_R@1": float(np.mean([chance_recall(n_txt, len(c), 1) for c in per_image])),
        "chance_i2t_R@5": float(np.mean([chance_recall(n_txt, len(c), 5) for c in per_image])),
    }
    sim = img @ txt.t()                                     # [images, texts]
    rng = np.random.default_rng(0)
    text_q = []
    for j in rng.choice(n_txt, size=min(n_text_examples, n_txt), replace=False):
        top = sim[:, j].topk(min(5, n_img)).indices.tolist()
        text_q.append({"text": texts[j], "images": [images[i] for i in top],
                       "hits": [texts[j] in per_image[i] for i in top]})
    image_q = []
    for i in rng.choice(n_img, size=min(n_image_examples, n_img), replace=False):
        top = sim[i].topk(min(3, n_txt)).indices.tolist()
        image_q.append({"image": images[i], "captions": [texts[j] for j in top],
                        "hits": [texts[j] in per_image[i] for j in top], "truth": per_image[i]})
    return metrics, {"text_queries": text_q, "image_queries": image_q}


#: Scores of random similarities on 2 x 2 groups (Winoground's chance levels).
SELECTION_CHANCE = {"text_acc": 1 / 4, "image_acc": 1 / 4, "acc": 1 / 6}


@torch.inference_mode()
def selection_results(model: CLIP, n_per_type: int, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Image-caption selection on the built-in minimal pairs (``clipforge eval
    image_caption_selection``'s default set) drawn with ``seed``: overall and per negative type."""
    (sset,) = open_selection(f"builtin:scenes-selection?n_per_type={n_per_type}&seed={seed}&size={model.image_size}")
    sims, kept, _ = selection_similarities(model, sset.instances)
    overall, per_type = selection_metrics(sims, [sset.instances[k].type for k in kept])
    return {"metrics": overall, "per_type": per_type, "n": len(sims), "chance": SELECTION_CHANCE}


def _records(model_name: str, zs: list[dict[str, Any]], ret: dict[str, Any],
             sel: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = [{"dataset": f"scenes/{r['task']}", "model": model_name, "task": "zeroshot_classification",
            "metrics": {"acc1": r["accuracy"], "chance": r["chance"], "x_chance": r["x_chance"],
                        "classes": r["classes"], "n": r["n"]}} for r in zs]
    out.append({"dataset": "scenes/retrieval", "model": model_name, "task": "zeroshot_retrieval",
                "metrics": {"image_retrieval_recall@1": ret["t2i_R@1"], "image_retrieval_recall@5": ret["t2i_R@5"],
                            "text_retrieval_recall@1": ret["i2t_R@1"], "text_retrieval_recall@5": ret["i2t_R@5"],
                            **{k: v for k, v in ret.items() if k.startswith(("chance", "n_"))}}})
    if sel is not None:
        out.append({"dataset": "scenes-selection", "model": model_name, "task": "image_caption_selection",
                    "metrics": sel["metrics"], "per_type": sel["per_type"], "n": sel["n"], "chance": sel["chance"]})
    return out


def format_table(zs: list[dict[str, Any]], ret: dict[str, Any], sel: dict[str, Any] | None = None) -> str:
    lines = [f"{'zero-shot task':<24}{'classes':>8}{'accuracy':>10}{'chance':>8}{'x chance':>10}"]
    for r in zs:
        lines.append(f"{r['task']:<24}{r['classes']:>8}{r['accuracy']:>10.3f}{r['chance']:>8.3f}{r['x_chance']:>9.1f}x")
    lines.append("")
    lines.append(f"{'retrieval (' + str(ret['n_images']) + ' scenes)':<24}{'R@1':>8}{'R@5':>8}{'chance@1':>10}{'chance@5':>10}")
    lines.append(f"{'text -> image':<24}{ret['t2i_R@1']:>8.3f}{ret['t2i_R@5']:>8.3f}"
                 f"{ret['chance_t2i_R@1']:>10.3f}{ret['chance_t2i_R@5']:>10.3f}")
    lines.append(f"{'image -> text':<24}{ret['i2t_R@1']:>8.3f}{ret['i2t_R@5']:>8.3f}"
                 f"{ret['chance_i2t_R@1']:>10.3f}{ret['chance_i2t_R@5']:>10.3f}")
    if sel is not None:
        lines.append("")
        lines.append(f"{'caption selection':<24}{'pairs':>8}{'text':>8}{'image':>8}{'group':>8}")
        for name, m in [*sel["per_type"].items(), ("all", {**sel["metrics"], "n": sel["n"]}),
                        ("chance", {**sel["chance"], "n": ""})]:
            lines.append(f"{name:<24}{m['n']:>8}{m['text_acc']:>8.3f}{m['image_acc']:>8.3f}{m['acc']:>8.3f}")
    return "\n".join(lines)


# --- the demo ---------------------------------------------------------------------------------------


def _num(value: Any) -> float:
    """A number read back from JSON, where a non-finite value is stored as null."""
    return float("nan") if value is None else float(value)


def _previous_run(run_dir: Path, settings: DemoSettings) -> str | None:
    """``finished`` / ``interrupted`` for an earlier demo run in ``run_dir`` with the same model,
    batch, learning rate and seed (None if there is none); a different one is an error."""
    if not (run_dir / "config.json").is_file() or not list_checkpoints(run_dir):
        return None
    saved = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    mine = {"model": settings.model, "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed}
    diff = {k: (getattr(saved, k), v) for k, v in mine.items() if getattr(saved, k) != v}
    if diff:
        raise ValueError(f"{run_dir} holds a different training run ({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())}); "
                         "use another --out or delete that folder")
    summary = run_dir / "summary.json"
    if (run_dir / "final.safetensors").is_file() and summary.is_file() \
            and read_json(summary).get("status") != "interrupted":
        return "finished"
    return "interrupted"


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Train, evaluate and report; returns the results dict also written to ``results.json``."""
    settings = settings.resolved()
    started = time.time()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    budget_s = settings.minutes * 60
    run_dir = out / "run"
    previous = _previous_run(run_dir, settings)
    threads, step_s, steps = settings.threads, None, settings.steps
    if previous == "finished":
        _say(settings, f"reusing the finished training run in {run_dir} (delete it to train again)")
        summary = read_json(run_dir / "summary.json")
    elif previous == "interrupted":
        _say(settings, f"resuming the interrupted training run in {run_dir}")
        summary = train(TrainConfig.for_resume(run_dir, progress=settings.progress))
    else:
        if settings.steps is None or threads is None:
            candidates = [threads] if threads else thread_candidates()
            _say(settings, f"timing {settings.model} at batch {settings.batch_size} with {candidates} thread(s)...")
            timing = measure_step_time(train_config(settings, 1000, None, None), candidates)
            threads = min(timing, key=timing.__getitem__)
            step_s = timing[threads]
            _say(settings, "step time: " + ", ".join(f"{t} thread(s) {s:.2f} s" for t, s in timing.items()))
        limit = None
        if steps is None:
            train_s = max(budget_s - OVERHEAD_S - (time.time() - started), 30.0)
            steps = plan_steps(train_s, step_s)
            limit = train_s * 1.25  # a hard stop past the plan keeps the demo near its budget on a slow day
            _say(settings, f"-> {steps} steps in a {train_s / 60:.1f} min training budget")
        summary = train(train_config(settings, steps, limit, threads))
    if summary.get("status") == "interrupted":
        return {"status": "interrupted", "exit_code": summary.get("exit_code", 130), "run_dir": str(run_dir)}
    train_done = time.time()

    model, _ = loading.load(run_dir / "final.safetensors", fast=False)
    size = model.image_size
    _say(settings, "evaluating on held-out scenes...")
    threads = threads or TrainConfig.from_dict(read_json(run_dir / "config.json")).threads
    with torch_threads(threads):
        zs = zeroshot_results(model, settings.eval_per_class)
        images, captions = scene_retrieval_set(n=settings.retrieval_n, seed=EVAL_SEED, image_size=size)
        ret, examples = retrieval_results(model, images, captions)
        sel = selection_results(model, settings.selection_per_type)
    eval_done = time.time()

    if (run_dir / "curves.png").is_file():
        shutil.copyfile(run_dir / "curves.png", out / "curves.png")
    table = format_table(zs, ret, sel)
    wall = time.time() - started
    results = {
        "model": model.config.name, "parameters": model.num_parameters(), "settings": asdict(settings),
        "steps": summary.get("steps_done"), "planned_steps": steps, "calibrated_step_s": step_s, "threads": threads,
        "train_status": summary.get("status"), "final_loss": summary.get("final_loss"),
        "samples_seen": summary.get("samples_seen"),
        "train_time_s": summary.get("wall_time_s"), "eval_time_s": eval_done - train_done, "wall_time_s": wall,
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "zeroshot": zs, "retrieval": ret, "selection": sel,
        "records": _records(model.config.name or settings.model, zs, ret, sel),
        "note": "CPU times on a shared 2-core machine; other jobs may have been running",
    }
    write_json(out / "results.json", results)
    heldout = next((r for r in zs if r["task"] == "heldout_colour_shape"), None)
    lines = [f"model {model.config.name} ({model.num_parameters()['total'] / 1e6:.1f} M parameters), "
             f"{summary.get('steps_done')} steps of batch {settings.batch_size} "
             f"({summary.get('samples_seen')} pairs), final loss {_num(summary.get('final_loss')):.3f}",
             f"wall time {wall / 60:.1f} min (training {summary.get('wall_time_s', 0) / 60:.1f} min)"]
    if heldout:
        lines.append(f"held-out colour-shape accuracy {heldout['accuracy']:.3f} = {heldout['x_chance']:.1f}x chance")
    write_report(out / "report.html", title="clipforge demo: a tiny CLIP trained on built-in scenes",
                 summary_lines=lines,
                 zeroshot_rows=[(r["task"], r["classes"], r["accuracy"], r["chance"], f"{r['x_chance']:.1f}x") for r in zs],
                 retrieval_rows=[("text -> image", ret["t2i_R@1"], ret["t2i_R@5"], ret["chance_t2i_R@1"], ret["chance_t2i_R@5"]),
                                 ("image -> text", ret["i2t_R@1"], ret["i2t_R@5"], ret["chance_i2t_R@1"], ret["chance_i2t_R@5"])],
                 text_queries=examples["text_queries"], image_queries=examples["image_queries"],
                 curves_png=out / "curves.png",
                 selection_rows=[(t, m["n"], m["text_acc"], m["image_acc"], m["acc"])
                                 for t, m in [*sel["per_type"].items(), ("all", {**sel["metrics"], "n": sel["n"]})]])
    results["table"] = table
    results["status"] = "completed"
    results["exit_code"] = 0
    return results


__all__ = ["DemoSettings", "run_demo", "zeroshot_results", "retrieval_results", "selection_results", "format_table",
           "chance_recall", "SELECTION_CHANCE"]
