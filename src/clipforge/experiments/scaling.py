"""``clipforge experiment scaling``: the paper's Figure 9 on the built-in scenes. Does zero-shot
error fall as a power law of training compute?

A family of ViTs (``SCALING_FAMILY``: width and depth grown together from 32-wide, 2-layer towers,
the demo model ``tiny-vit-p16`` among them) is trained with one recipe (data, images, optimiser,
schedule, seed). Each run's training compute is *counted*: :func:`clipforge.plan.count_model_flops`
(forward + backward of both towers, the plain model: every token, the full text context) x images,
plus the contrastive loss at the batch size, x steps. Each finished model is then measured on
fresh held-out scenes (more per class than training's periodic check): zero-shot error on every
scene task, their mean (the paper averages its datasets), and the contrastive validation loss. The
fits: error (and loss) = a * compute^b by least squares in log-log space, the exponent's 95%
confidence interval, and the test that matters: fitted on all but the largest model, how well does
the line predict the largest?

Learning rate per size (one rate for every size made the larger models worse than smaller ones,
so no fit could predict them): ``lr_rule="width"`` scales the peak rate as ``lr * lr_base_width /
width`` (the 1/width rule muP gives Adam's hidden-layer rate, applied here to the whole model: a
simplification), and ``lr_multipliers`` sweeps a few multiples of each size's rate, keeping the
run with the lowest validation loss (never the zero-shot test scenes). A harder target that does
not saturate at the smallest size: the built-in image-caption selection pairs
(``clipforge eval image_caption_selection``'s default set), group and text error.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import loading
from ..config import CLIPConfig, get_model_config
from ..demo import EVAL_SEED, selection_results
from ..plan import count_loss_flops, count_model_flops
from ..training import SceneZeroShot, TrainConfig, ValRetrieval
from ..utils import atomic_write_text, read_json, write_json
from .curves import fit_power_law, holdout_prediction
from .runs import Budget, Recipe, is_complete, train_or_resume

# name -> (width, layers, heads) of both towers (embed_dim = width); ViT patch 16 at 64 px as the
# demo model. Widths grow ~1.4x per size, depth every other size: compute ~2-3x per size.
SCALING_FAMILY: dict[str, tuple[int, int, int]] = {
    "s32": (32, 2, 1), "s48": (48, 2, 1), "s64": (64, 3, 1), "s96": (96, 3, 2), "s128": (128, 3, 2),
    "s192": (192, 4, 3), "s256": (256, 4, 4), "s384": (384, 6, 6),
}
DEFAULT_SIZES = ("s32", "s48", "s64", "s96", "s128", "s192")
LR_RULES = ("fixed", "width")


def family_config(name: str) -> CLIPConfig:
    """The architecture of size ``name`` (the demo model's config with width/depth/heads replaced)."""
    if name not in SCALING_FAMILY:
        raise ValueError(f"unknown size {name!r}; the family: {', '.join(SCALING_FAMILY)}")
    width, layers, heads = SCALING_FAMILY[name]
    base = get_model_config("tiny-vit-p16")
    return dataclasses.replace(
        base, name=f"scaling-{name}", embed_dim=width,
        vision=dataclasses.replace(base.vision, width=width, layers=layers, heads=heads),
        text=dataclasses.replace(base.text, width=width, layers=layers, heads=heads))


@dataclass
class ScalingConfig(Recipe):
    """One scaling experiment: ``sizes`` of the family trained for ``steps`` x ``batch_size``
    images each with the same recipe and ``seed``; measured on ``eval_per_class`` fresh scenes
    per class, ``val_pairs`` held-out pairs and ``selection_per_type`` caption-selection pairs per
    negative type (0: not measured). ``lr_rule`` / ``lr_base_width`` / ``lr_multipliers``: the
    learning rate per size (module docstring)."""

    out: str = "runs/scaling"
    steps: int = 600
    sizes: tuple[str, ...] = DEFAULT_SIZES
    seed: int = 0
    eval_per_class: int = 100
    val_pairs: int = 1000
    lr_rule: str = "fixed"
    lr_base_width: int = 128
    lr_multipliers: tuple[float, ...] = (1.0,)
    selection_per_type: int = 0

    def __post_init__(self) -> None:
        self.check_recipe()
        self.sizes = tuple(self.sizes)
        self.lr_multipliers = tuple(float(m) for m in self.lr_multipliers)
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule: must be one of {', '.join(LR_RULES)} (got {self.lr_rule!r})")
        if self.lr_base_width < 1:
            raise ValueError(f"lr_base_width: must be >= 1 (got {self.lr_base_width})")
        if not self.lr_multipliers or min(self.lr_multipliers) <= 0 or len(set(self.lr_multipliers)) < len(self.lr_multipliers):
            raise ValueError(f"lr_multipliers: distinct values > 0 are needed (got {list(self.lr_multipliers)})")
        if self.selection_per_type < 0:
            raise ValueError(f"selection_per_type: must be >= 0 (got {self.selection_per_type})")
        for s in self.sizes:
            family_config(s)
        if len(set(self.sizes)) != len(self.sizes) or len(self.sizes) < 3:
            raise ValueError(f"sizes: >= 3 distinct sizes are needed for a fit with an interval "
                             f"(got {list(self.sizes)})")

    def model_file(self, size: str) -> Path:
        return Path(self.out) / "configs" / f"{size}.json"

    def size_lr(self, size: str) -> float:
        """The peak learning rate the rule gives ``size`` (before any sweep multiplier)."""
        if self.lr_rule == "fixed":
            return self.lr
        return self.lr * self.lr_base_width / family_config(size).vision.width

    def run_config(self, size: str, multiplier: float = 1.0) -> TrainConfig:
        """The run of ``size`` at ``multiplier`` x its rule rate (folder ``<size>``; with a sweep
        ``<size>-x<multiplier>``)."""
        sweep = self.lr_multipliers != (1.0,)
        run_dir = Path(self.out) / (f"{size}-x{multiplier:g}" if sweep else size)
        return self.train_config(str(self.model_file(size)), self.seed, run_dir, lr=self.size_lr(size) * multiplier)


def training_flops(arch: CLIPConfig, steps: int, batch_size: int) -> dict[str, float]:
    """Counted FLOPs of a contrastive run: both towers' forward + backward per image x images, and
    the loss (its ``N x N`` logits) per step x steps."""
    per_image = count_model_flops(arch).train
    loss = count_loss_flops(batch_size, batch_size, arch.embed_dim)
    return {"per_image": per_image, "loss_per_step": loss, "total": per_image * steps * batch_size + loss * steps}


def measure(config: ScalingConfig, run_dir: Path, data: str) -> dict[str, Any]:
    """The finished model's held-out measurements (cached in ``run_dir/scaling_eval.json``):
    zero-shot on fresh scenes of the demo's evaluation seed, loss on ``data``'s validation split."""
    cached = run_dir / "scaling_eval.json"
    key = {"eval_per_class": config.eval_per_class, "val_pairs": config.val_pairs, "seed": EVAL_SEED,
           **({"selection_per_type": config.selection_per_type} if config.selection_per_type else {})}
    if cached.is_file():
        saved = read_json(cached)
        if saved.get("key") == key:
            return saved
    model, _ = loading.load(run_dir / "final.safetensors", fast=False)
    acc = SceneZeroShot(n_per_class=config.eval_per_class, seed=EVAL_SEED)(model, step=0)
    errors = {k.removesuffix("_acc"): 1.0 - v for k, v in acc.items()}
    val = ValRetrieval(data, seed=EVAL_SEED, n=config.val_pairs)(model, 0)
    result = {"key": key, "zeroshot_error": errors, "mean_zeroshot_error": float(np.mean(list(errors.values()))),
              "val_loss": val["val_loss"], "val_t2i_R@1": val["val_t2i_R@1"], "val_i2t_R@1": val["val_i2t_R@1"]}
    if config.selection_per_type:
        sel = selection_results(model, config.selection_per_type)
        result["selection"] = {"group_error": 1.0 - sel["metrics"]["acc"], "text_error": 1.0 - sel["metrics"]["text_acc"],
                               "per_type": sel["per_type"], "n": sel["n"]}
    write_json(cached, result)
    return result


def targets(measured: dict[str, Any]) -> dict[str, float]:
    """What is fitted against compute: the mean zero-shot error, each scene task's error
    (``<task>_error``) and the validation loss."""
    out = {"mean_zeroshot_error": measured["mean_zeroshot_error"], "val_loss": measured["val_loss"],
           **{f"{task}_error": e for task, e in measured["zeroshot_error"].items()}}
    if "selection" in measured:
        out["selection_group_error"] = measured["selection"]["group_error"]
        out["selection_text_error"] = measured["selection"]["text_error"]
    return out


def fits(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Power-law fit of each target vs total training FLOPs over the measured sizes, and the
    hold-out test (fit on all but the largest, predict the largest)."""
    done = [r for r in rows if r.get("measured")]
    out: dict[str, Any] = {}
    if len(done) < 3:
        return out
    x = [r["flops"]["total"] for r in done]
    values = [targets(r["measured"]) for r in done]
    for target in values[0]:
        y = [v[target] for v in values]
        if min(y) <= 0:
            out[target] = {"error": f"a value of {min(y)} has no logarithm (error 0 at this eval size)"}
            continue
        out[target] = {"all": fit_power_law(x, y).to_dict(), "holdout_largest": holdout_prediction(x, y)}
    return out


def plot(rows: list[dict[str, Any]], fitted: dict[str, Any], path: Path, title: str) -> Path:
    """Three panels: the mean zero-shot error and the validation loss (points, the fit on all
    sizes with its exponent CI, the fit without the largest and its prediction interval there),
    and every task's error with its fit."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    done = [r for r in rows if r.get("measured")]
    fig = Figure(figsize=(13, 4.4))
    x = np.array([r["flops"]["total"] for r in done])
    values = [targets(r["measured"]) for r in done]
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 50) if len(x) else np.array([])

    def line(ax: Any, fit: dict[str, Any], **kw: Any) -> None:
        ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], **kw)

    panels = (("mean_zeroshot_error", "mean zero-shot error (scene tasks)"), ("val_loss", "validation loss"))
    for i, (target, label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        y = np.array([v[target] for v in values])
        ax.loglog(x, y, "o", color="tab:blue")
        for r, xi, yi in zip(done, x, y):
            ax.annotate(r["size"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        f = fitted.get(target, {})
        if "all" in f:
            a, h = f["all"], f["holdout_largest"]
            ci = a["exponent_ci"]
            line(ax, a, color="tab:blue", lw=1,
                 label=f"fit all: b={a['exponent']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            line(ax, h["fit"], color="tab:orange", lw=1, ls="--",
                 label=f"fit without largest: predicts {h['predicted']:.3g} ({h['relative_error']:+.0%})")
            if h["prediction_interval"]:
                lo, hi = h["prediction_interval"]
                ax.errorbar([h["x"]], [h["predicted"]], yerr=[[h["predicted"] - lo], [hi - h["predicted"]]],
                            fmt="s", color="tab:orange", ms=4, capsize=3)
        ax.set_ylabel(label)
    ax = fig.add_subplot(1, 3, 3)
    tasks = [t for t in (values[0] if values else {}) if t not in ("mean_zeroshot_error", "val_loss")]
    for j, target in enumerate(tasks):
        colour = f"C{j}"
        ax.loglog(x, [v[target] for v in values], "o", ms=4, color=colour)
        f = fitted.get(target, {})
        if "all" in f:
            line(ax, f["all"], color=colour, lw=1,
                 label=f"{target.removesuffix('_error').replace('_', ' ')}: b={f['all']['exponent']:.3f}")
    ax.set_ylabel("zero-shot error per task")
    for ax in fig.axes:
        ax.set_xlabel("training compute (FLOPs)")
        ax.xaxis.set_minor_formatter(NullFormatter())
        for which in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            which(FuncFormatter(lambda v, _: f"{v:.3g}"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_scaling(config: ScalingConfig) -> dict[str, Any]:
    """Train (or reuse / resume) every size, measure the finished ones, fit, and write
    ``results.json`` + ``scaling.png`` into ``config.out`` (``status`` ``partial`` when the budget
    ran out: the fit then uses the sizes that finished)."""
    budget = Budget(config.minutes)
    out = Path(config.out)
    rows: list[dict[str, Any]] = []
    for i, size in enumerate(config.sizes, 1):
        arch = family_config(size)
        path = config.model_file(size)
        if not path.is_file():
            atomic_write_text(path, arch.to_json())
        flops = training_flops(arch, config.steps, config.batch_size)
        t = time.time()
        sweep: list[dict[str, Any]] = []
        for m in config.lr_multipliers:
            run = config.run_config(size, m)
            if config.progress:
                tqdm.write(f"[{i}/{len(config.sizes)}] {size} (width {arch.vision.width}, {arch.vision.layers} layers) "
                           f"lr {run.lr:.3g}: {config.steps} steps x {config.batch_size}, {flops['total']:.3g} FLOPs "
                           f"-> {run.out}")
            summary = train_or_resume(run, budget)
            entry = {"lr": run.lr, "multiplier": m, "status": summary.get("status"), "run_dir": run.out,
                     "reused": bool(summary.get("reused")),
                     "parameters": (summary.get("parameters") or {}).get("total")}
            if is_complete(run.out):
                entry["measured"] = measure(config, Path(run.out), run.data)
            sweep.append(entry)
            if entry["status"] == "interrupted":
                break
        done = [e for e in sweep if e.get("measured")]
        complete = len(done) == len(config.lr_multipliers)
        best = min(done, key=lambda e: e["measured"]["val_loss"]) if complete else None
        shown = best or sweep[-1]
        row: dict[str, Any] = {"size": size, "width": arch.vision.width, "layers": arch.vision.layers,
                               "heads": arch.vision.heads, "flops": flops, "lr": shown["lr"],
                               "parameters": shown["parameters"],
                               "status": "completed" if complete else next(e["status"] for e in sweep if not e.get("measured")),
                               "reused": all(e["reused"] for e in sweep),
                               "train_wall_s": time.time() - t, "run_dir": shown["run_dir"]}
        if len(config.lr_multipliers) > 1:
            row["lr_sweep"] = [{"lr": e["lr"], "status": e["status"],
                                "val_loss": (e.get("measured") or {}).get("val_loss")} for e in sweep]
        if best is not None:
            row["measured"] = best["measured"]
        rows.append(row)
        if row["status"] == "interrupted":
            break  # a signal: stop here (the run resumes on the next call)
    fitted = fits(rows)
    lr_note = "one lr" if config.lr_rule == "fixed" else f"lr x {config.lr_base_width}/width"
    if len(config.lr_multipliers) > 1:
        lr_note += f", best of x{'/'.join(f'{m:g}' for m in config.lr_multipliers)} by val loss"
    png = plot(rows, fitted, out / "scaling.png",
               f"built-in scenes, {config.steps} x {config.batch_size} images per size, seed {config.seed}, {lr_note}")
    complete = len(rows) == len(config.sizes) and all(r.get("measured") for r in rows)
    result = {"experiment": "scaling", "status": "complete" if complete else "partial", "config": asdict(config),
              "interrupted": any(r["status"] == "interrupted" for r in rows),
              "rows": rows, "fits": fitted, "plot": str(png), "wall_s": time.time() - budget.started}
    write_json(out / "results.json", result)
    return result


def combine_seeds(results: list[dict[str, Any]], plot_path: Path | None = None) -> dict[str, Any]:
    """Several seeds' :func:`run_scaling` results (same sizes, steps, batch, lr rule) as one:
    each size's targets averaged over the seeds, fitted as one run is, and each seed's own
    hold-out prediction beside it (how much of a miss is seed noise)."""
    if len(results) < 2:
        raise ValueError(f"combining seeds needs >= 2 results, got {len(results)}")
    keys = ("sizes", "steps", "batch_size", "lr_rule", "lr_multipliers", "selection_per_type")
    first = results[0]["config"]
    for r in results[1:]:
        diff = [k for k in keys if r["config"].get(k) != first.get(k)]
        if diff:
            raise ValueError(f"the results differ in {diff}: only seeds may differ")
    seeds = [r["config"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the same seed twice: {seeds}")
    rows: list[dict[str, Any]] = []
    for size_rows in zip(*(r["rows"] for r in results)):
        if not all(row.get("measured") for row in size_rows):
            break  # fit the sizes every seed finished
        per_seed = [targets(row["measured"]) for row in size_rows]
        mean = {t: float(np.mean([v[t] for v in per_seed])) for t in per_seed[0]}
        measured = {"mean_zeroshot_error": mean["mean_zeroshot_error"], "val_loss": mean["val_loss"],
                    "zeroshot_error": {t.removesuffix("_error"): v for t, v in mean.items()
                                       if t.endswith("_error") and not t.startswith(("mean_", "selection_"))}}
        if "selection_group_error" in mean:
            measured["selection"] = {"group_error": mean["selection_group_error"],
                                     "text_error": mean["selection_text_error"]}
        spread = {t: float(np.std([v[t] for v in per_seed])) for t in per_seed[0]}
        rows.append({**{k: size_rows[0][k] for k in ("size", "width", "layers", "heads", "flops", "lr", "parameters")},
                     "status": "completed", "measured": measured, "seed_sd": spread})
    fitted = fits(rows)
    per_seed_holdout = {t: [(r["fits"].get(t) or {}).get("holdout_largest", {}).get("relative_error") for r in results]
                        for t in fitted}
    cfg = {**first, "seeds": seeds}
    cfg.pop("seed", None)
    out = {"experiment": "scaling", "status": "complete" if len(rows) == len(first["sizes"]) else "partial",
           "config": cfg, "rows": rows, "fits": fitted, "per_seed_holdout_relative_error": per_seed_holdout}
    if plot_path is not None:
        out["plot"] = str(plot(rows, fitted, plot_path,
                               f"built-in scenes, {first['steps']} x {first['batch_size']} images per size, "
                               f"mean of seeds {', '.join(map(str, seeds))}, lr rule {first['lr_rule']}"))
    return out


def format_scaling(result: dict[str, Any]) -> str:
    """The table ``clipforge experiment scaling`` prints."""
    lines = [f"{'size':<6}{'width':>6}{'layers':>7}{'params':>10}{'FLOPs':>11}{'lr':>9}{'mean err':>10}"
             f"{'held-out err':>13}{'val loss':>10}{'status':>11}"]
    for r in result["rows"]:
        m = r.get("measured") or {}
        err = f"{m['mean_zeroshot_error']:.3f}" if m else "-"
        held = f"{m['zeroshot_error']['heldout_colour_shape']:.3f}" if m else "-"
        loss = f"{m['val_loss']:.3f}" if m else "-"
        params = f"{r['parameters'] / 1e6:.2f}M" if r.get("parameters") else "-"
        lr = f"{r['lr']:.3g}" if r.get("lr") else "-"
        lines.append(f"{r['size']:<6}{r['width']:>6}{r['layers']:>7}{params:>10}{r['flops']['total']:>11.3g}{lr:>9}"
                     f"{err:>10}{held:>13}{loss:>10}{r['status']:>11}")
    for target, f in result.get("fits", {}).items():
        if "all" not in f:
            lines.append(f"{target}: {f.get('error')}")
            continue
        a, h = f["all"], f["holdout_largest"]
        ci = a["exponent_ci"]
        pi = h["prediction_interval"]
        lines.append(f"{target}: exponent {a['exponent']:.3f} (95% CI {ci[0]:.3f} to {ci[1]:.3f}), R^2 {a['r2']:.3f}; "
                     f"fit without the largest predicts {h['predicted']:.4g} vs measured {h['measured']:.4g} "
                     f"({h['relative_error']:+.1%}" + (f", 95% PI {pi[0]:.3g}-{pi[1]:.3g})" if pi else ")"))
    return "\n".join(lines)


__all__ = ["ScalingConfig", "run_scaling", "format_scaling", "family_config", "training_flops", "SCALING_FAMILY",
           "DEFAULT_SIZES", "targets", "fits", "LR_RULES", "combine_seeds"]
