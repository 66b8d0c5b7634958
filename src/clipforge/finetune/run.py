"""The fine-tuning run and its WiSE-FT sweep, leaving a run folder:

```
<out>/config.json              the FinetuneConfig (a re-run with the same settings continues the run)
<out>/metrics.jsonl            one record per log step: loss, train accuracy, lr, samples/s
<out>/checkpoints/step_*.pt    resumable training state (training's checkpoint format)
<out>/finetuned/               the fine-tuned classifier (model.safetensors + head.safetensors) + done.json
<out>/wise/alpha_A/            the interpolated classifier at alpha A + record.json (its evaluation)
<out>/wise.json                every alpha's record (CLIP_benchmark-like, task "robustness") + the run summary
<out>/wise.txt, wise.png, wise.html   the table, the curve, a page with both
```

Re-running the same command skips what is finished: training resumes from its newest checkpoint
(or is skipped when ``finetuned/done.json`` exists), and an alpha whose ``record.json`` belongs to
this fine-tuned model is not evaluated again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import loading
from ..device import resolve_device
from ..eval import classification_metrics, extract_features, make_record, parse_shifts
from ..inference import optimize_for_inference
from ..preprocess import image_transform
from ..families import tokenizer_for
from ..training import (CosineWarmup, DistillLoss, MetricsLog, StopRequest, Teacher, apply_model_recipes,
                        build_optimizer, capture_rng, checkpoint_path, contrastive_loss, finish_recipes,
                        latest_checkpoint, load_checkpoint, lr_scales, make_schedule, prune_checkpoints, restore_rng,
                        save_checkpoint)
from ..utils import read_json, read_marker, torch_threads, write_json, write_marker
from .classifier import ImageClassifier
from .config import FinetuneConfig
from .report import plot_wise, wise_table, write_html
from .splits import Positions, Splits, batch_positions, load_batch, open_splits, total_steps
from .wise import wise_ft


@dataclass
class FinetuneResult:
    """What a run produced. ``records``: one evaluation record per alpha (empty without alphas)."""

    out: Path
    status: str                      # "completed" | "interrupted" | "stopped"
    steps_done: int
    steps: int
    finetuned: Path | None           # folder of the fine-tuned classifier (None until training finished)
    records: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""
    files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    signal: int | None = None        # the signal that interrupted it (exit code 128 + signal, as train's)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def alpha_label(alpha: float) -> str:
    return f"alpha_{alpha:.2f}"


def _class_text(name: Any) -> str:
    return name if isinstance(name, str) else str(list(name)[0])


def initial_model(zs: ImageClassifier, cfg: FinetuneConfig) -> ImageClassifier:
    """The model at step 0: a copy of the zero-shot classifier (head at zero for ``head="linear"``),
    with only what the recipe trains left trainable: image tower + head (CE); image tower, text
    tower and temperature (FLYP, whose head is rebuilt from the text tower); then the model recipes
    of ``cfg`` (locking, LoRA: fewer trainable parameters; patch dropout)."""
    ft = copy.deepcopy(zs)
    if cfg.head == "linear":
        with torch.no_grad():
            ft.head.weight.zero_()
            ft.head.bias.zero_()
    for p in ft.clip.visual.parameters():
        p.requires_grad_(True)
    for p in ft.clip.text.parameters():  # lock_text (train's meaning: .lock) acts below
        p.requires_grad_(cfg.recipe == "flyp")
    ft.clip.logit_scale.requires_grad_(cfg.recipe == "flyp")
    ft.head.requires_grad_(cfg.recipe == "ce")
    apply_model_recipes(ft.clip, cfg)  # patch dropout, locking, LoRA (train's recipes; the head stays trainable)
    return ft


class _Run:
    def __init__(self, cfg: FinetuneConfig, should_stop: Callable[[int], bool] | None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.should_stop = should_stop
        self.device = resolve_device(cfg.device)
        self.fingerprint = _fingerprint(cfg.training_fields())

    def say(self, msg: str) -> None:
        if self.cfg.progress:
            tqdm.write(msg)

    # --- set-up --------------------------------------------------------------------------------------
    def check_out(self) -> None:
        """A folder holding another run (other training settings) is refused, not overwritten."""
        saved_path = self.out / "config.json"
        if saved_path.is_file():
            saved = FinetuneConfig.from_dict(read_json(saved_path), source=str(saved_path))
            a, b = saved.training_fields(), self.cfg.training_fields()
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            if diff:
                k = diff[0]
                raise ValueError(f"{self.out} holds a fine-tuning run with other settings ({k}: {a.get(k)!r} there, "
                                 f"{b.get(k)!r} now); re-run with its settings to continue it, or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(saved_path, self.cfg.to_dict())

    # --- training ------------------------------------------------------------------------------------
    def train(self, zs: ImageClassifier, splits: Splits, preprocess: Callable) -> tuple[ImageClassifier, str, int, int]:
        cfg = self.cfg
        total = total_steps(cfg, len(splits.train))
        ft = initial_model(zs, cfg).to(self.device)
        optimizer = build_optimizer(ft, cfg.lr, cfg.wd, tuple(cfg.betas), cfg.eps,  # type: ignore[arg-type]
                                    lr_scales(ft.clip, cfg, prefix="clip."))
        schedule = make_schedule(optimizer, cfg, total)  # --lr-scheduler cosine | const | const-cooldown
        distill = DistillLoss(contrastive_loss, Teacher(cfg.distill_model, ft.clip, self.device, cfg.distill_precision),
                              cfg.distill_weight) if cfg.distill_model else None  # FLYP only (config check)
        step, records = 0, []
        torch.manual_seed(cfg.seed)  # torch's draws (patch dropout) from the seed; a checkpoint carries them on
        latest = latest_checkpoint(self.out)
        if latest is not None:
            state = load_checkpoint(latest)
            if state.get("fingerprint") != self.fingerprint:
                raise ValueError(f"{latest} was written by a run with other settings; remove {self.out / 'checkpoints'} "
                                 "or choose another --out")
            ft.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["scheduler"])
            restore_rng(state["rng"])
            step, records = int(state["step"]), list(state.get("metrics", []))
            self.say(f"resuming {self.out} from step {step} ({latest.name})")
        log = MetricsLog(self.out / "metrics.jsonl", records)
        tok = tokenizer_for(ft.clip)  # the model's own (a family model's SentencePiece / HF tokenizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bar = tqdm(total=total, initial=step, desc="finetune", unit="step", dynamic_ncols=True, disable=not cfg.progress)
        status = "completed"
        started, window = time.time(), [time.time(), 0, 0.0, 0.0, 0]  # t0, steps, loss, correct, seen
        skipped = 0
        try:
            with StopRequest() as stop:
                while step < total:
                    pos = batch_positions(step, len(splits.train), cfg.batch_size, cfg.seed)
                    x, y, bad = load_batch(splits.train, pos, preprocess)
                    skipped += len(bad)
                    x, y = x.to(self.device), y.to(self.device)
                    lr = schedule(step)
                    ft.train()
                    if cfg.recipe == "flyp":
                        rng = np.random.default_rng([cfg.seed, step, 1])
                        texts = [splits.templates[int(rng.integers(len(splits.templates)))].replace(
                            "{}", _class_text(splits.classnames[int(c)]), 1) for c in y.tolist()]
                        ids = tok.tokenize(texts, ft.clip.context_length, truncate=True).to(self.device)
                        img = ft.features(x)
                        txt = F.normalize(ft.clip.encode_text(ids), dim=-1)
                        if distill is not None:  # + weight x CE(teacher's logits, student's) over this batch
                            distill.prepare([(x, ids)])
                        loss = (distill or contrastive_loss)(img, txt, ft.clip.logit_scale.exp())
                        correct = float("nan")
                    else:
                        if step < cfg.lp_steps:  # LP-FT: the head alone first (frozen features, BatchNorm too)
                            ft.clip.visual.eval()
                            with torch.no_grad():
                                feats = ft.features(x)
                            logits = ft.head(feats)
                        else:
                            logits = ft(x)
                        loss = F.cross_entropy(logits, y)
                        correct = float((logits.argmax(dim=1) == y).sum())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    if cfg.recipe == "flyp":
                        ft.clip.clamp_logit_scale()
                    step += 1
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise FloatingPointError(f"the loss became {value} at step {step}; lower --lr")
                    window[1] += 1
                    window[2] += value
                    window[3] += correct
                    window[4] += len(y)
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == total:
                        now = time.time()
                        rec: dict[str, Any] = {"step": step, "loss": window[2] / window[1], "lr": lr,
                                               "samples_per_s": window[4] / max(now - window[0], 1e-9),
                                               "time_s": now - started, "skipped": skipped,
                                               "phase": "lp" if step <= cfg.lp_steps else "ft"}
                        if cfg.recipe == "ce":
                            rec["train_acc"] = window[3] / window[4]
                        log.log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"acc": f"{rec['train_acc']:.3f}"}
                                                                       if "train_acc" in rec else {}))
                        window = [now, 0, 0.0, 0.0, 0]
                    self.signum = stop.signum
                    reason = "interrupted" if stop.requested else (
                        "stopped" if self.should_stop is not None and self.should_stop(step) else None)
                    if (cfg.save_every and step % cfg.save_every == 0) or reason or step == total:
                        self.save(ft, optimizer, schedule, step, log)
                    if reason:
                        status = reason
                        self.say(f"stopping at step {step}/{total} ({reason}); checkpoint written - re-run to continue")
                        break
        finally:
            bar.close()
            log.close()
        return ft, status, step, total

    def save(self, ft: ImageClassifier, optimizer: torch.optim.Optimizer, schedule: CosineWarmup, step: int,
             log: MetricsLog) -> None:
        save_checkpoint(checkpoint_path(self.out, step), {
            "model": ft.state_dict(), "config": ft.clip.config.to_dict(), "finetune_config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint, "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "step": step, "rng": capture_rng(), "metrics": list(log.records)})
        prune_checkpoints(self.out, self.cfg.keep_last)

    # --- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, clf: ImageClassifier, splits: Splits, preprocess: Callable, alpha: float,
                 pretrained: str) -> dict[str, Any]:
        """Clean and shifted test accuracy of ``clf`` (changed in place for fast inference)."""
        cfg = self.cfg
        weight = clf.head.weight.detach().float().cpu()
        bias = clf.head.bias.detach().float().cpu()
        model = optimize_for_inference(clf.clip)
        t0 = time.perf_counter()
        test = splits.test
        rows = []
        for shift in [None, *parse_shifts(cfg.shifts, cfg.seed)]:
            label = "clean" if shift is None else shift.label
            fs = extract_features(model, test, test.labels, preprocess=preprocess, transform=shift,
                                  batch_size=cfg.eval_batch_size, progress=cfg.progress,
                                  desc=f"eval alpha={alpha:g} ({label})")
            scores = fs.tensor() @ weight.t() + bias
            m = classification_metrics(scores, fs.labels, splits.num_classes)
            rows.append({"shift": label, "n": len(fs), "skipped": fs.skipped, **m})
        clean, shifted = rows[0], rows[1:]
        metrics: dict[str, Any] = {"acc1": clean["acc1"], "acc5": clean["acc5"],
                                   "mean_per_class_recall": clean["mean_per_class_recall"]}
        if shifted:
            metrics["mean_shift_acc1"] = float(np.mean([r["acc1"] for r in shifted]))
            metrics["mean_shift_drop"] = clean["acc1"] - metrics["mean_shift_acc1"]
        for r in shifted:
            metrics[f"{r['shift']}_acc1"] = r["acc1"]
        return make_record(splits.name, str(clf.clip.config.name or "model"), "robustness", metrics,
                           pretrained=pretrained, method="wise-ft", alpha=alpha, recipe=cfg.recipe, head=cfg.head,
                           zeroshot_model=cfg.model, shifts=rows, protocol=splits.protocol,
                           num_classes=splits.num_classes, classnames=[str(c) for c in splits.classnames],
                           templates=[t.replace("{}", "{c}") for t in splits.templates],
                           timings={"eval": time.perf_counter() - t0})

    def sweep(self, zs: ImageClassifier, ft: ImageClassifier, ft_fingerprint: str, splits: Splits,
              preprocess: Callable) -> list[dict[str, Any]]:
        records = []
        for alpha in sorted(self.cfg.wise_alphas):
            folder = self.out / "wise" / alpha_label(alpha)
            marker = folder / "record.json"
            eval_fp = _fingerprint({"ft": ft_fingerprint, "alpha": alpha, "shifts": self.cfg.shifts,
                                    "max_test": self.cfg.max_test})
            done = read_marker(marker, eval_fp)
            if done is not None:
                records.append(done["record"])
                continue
            model = wise_ft(zs, ft, alpha)
            pretrained = str(folder) if self.cfg.save_wise_models else f"{self.cfg.model} (WiSE-FT alpha={alpha:g})"
            if self.cfg.save_wise_models:
                model.save(folder, extra={"alpha": alpha, "zeroshot_model": self.cfg.model,
                                          "finetuned_model": str(self.out / "finetuned")})
            rec = self.evaluate(model, splits, preprocess, alpha, pretrained)
            write_marker(marker, {"fingerprint": eval_fp, "record": rec})
            records.append(rec)
            m = rec["metrics"]
            self.say(f"alpha={alpha:g}: clean acc1={m['acc1']:.3f}"
                     + (f", mean shifted acc1={m['mean_shift_acc1']:.3f}" if "mean_shift_acc1" in m else ""))
        return records

    # --- the run -------------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        cfg = self.cfg
        started = time.time()
        splits = open_splits(cfg, log=self.say)
        self.check_out()
        base, _ = loading.load(cfg.model, device=self.device, fast=False, trust_torchscript=cfg.trust_torchscript)
        preprocess = image_transform(base.config.preprocess)
        zs = ImageClassifier.zeroshot(base, splits.classnames, splits.templates, recipe=cfg.recipe)
        self.say(f"{len(splits.train)} train / {len(splits.test)} test images, {splits.num_classes} classes, "
                 f"{len(splits.templates)} template(s); {splits.protocol}")
        ft_dir = self.out / "finetuned"
        done = read_marker(ft_dir / "done.json", self.fingerprint)
        total = total_steps(cfg, len(splits.train))
        if done is not None:
            ft = ImageClassifier.load(ft_dir, device=self.device)
            status, steps_done = "completed", int(done["steps"])
            self.say(f"fine-tuning already finished ({ft_dir}); evaluating")
        else:
            ft, status, steps_done, total = self.train(zs, splits, preprocess)
            if status != "completed":
                return FinetuneResult(self.out, status, steps_done, total, None,
                                      signal=getattr(self, "signum", None) if status == "interrupted" else None)
            finish_recipes(ft.clip, cfg, ft_dir)  # LoRA: ft_dir/lora.safetensors (adapters alone), then merged
            if cfg.recipe == "flyp":
                ft.refresh_head()
            ft.eval()
            ft.save(ft_dir, extra={"zeroshot_model": cfg.model, "steps": steps_done})
            write_marker(ft_dir / "done.json", {"fingerprint": self.fingerprint, "steps": steps_done})
        train_seconds = time.time() - started
        ft_fp = _fingerprint({"run": self.fingerprint, "steps": steps_done})
        records = self.sweep(zs, ft, ft_fp, splits, preprocess)
        result = FinetuneResult(self.out, status, steps_done, total, ft_dir, records)
        if records:
            result.table = wise_table(records)
            title = f"WiSE-FT: {Path(cfg.model).name} on {splits.name} ({cfg.recipe}, head {cfg.head}, {steps_done} steps)"
            png = plot_wise(records, self.out / "wise.png", title)
            notes = [f"zero-shot model: {cfg.model}", f"data: {splits.protocol}",
                     f"recipe {cfg.recipe}, head {cfg.head}, {steps_done} steps, lr {cfg.lr}, batch {cfg.batch_size}",
                     "shifts: " + ", ".join(s.label for s in parse_shifts(cfg.shifts, cfg.seed))]
            html_path = write_html(self.out / "wise.html", title, result.table, png, notes)
            (self.out / "wise.txt").write_text(result.table + "\n", encoding="utf-8")
            result.files = {"json": str(self.out / "wise.json"), "table": str(self.out / "wise.txt"),
                            "html": str(html_path), **({"png": str(png)} if png else {})}
        by_alpha = {r["alpha"]: r["metrics"] for r in records}
        result.summary = {
            "status": status, "steps_done": steps_done, "steps": total, "model": cfg.model, "dataset": cfg.dataset,
            "recipe": cfg.recipe, "head": cfg.head, "num_classes": splits.num_classes,
            "n_train": len(splits.train), "n_test": len(splits.test), "protocol": splits.protocol,
            "finetuned": str(ft_dir), "wall_time_s": time.time() - started, "train_and_load_s": train_seconds,
            "zeroshot": by_alpha.get(0.0), "finetuned_metrics": by_alpha.get(1.0),
        }
        write_json(self.out / "wise.json", {"summary": result.summary, "records": records})
        write_json(self.out / "summary.json", result.summary)
        return result


def finetune(config: FinetuneConfig, *, should_stop: Callable[[int], bool] | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.dataset`` and sweep WiSE-FT over ``config.wise_alphas``.

    ``should_stop(step)`` is polled after every step (True: checkpoint and return, like SIGINT);
    calling again with the same config continues where the run stopped."""
    config.validate()
    with torch_threads(config.threads):
        return _Run(config, should_stop).run()


def load_classifier(folder: str | Path, device: str = "cpu") -> ImageClassifier:
    """A classifier folder written by a run (``<out>/finetuned``, ``<out>/wise/alpha_A``)."""
    return ImageClassifier.load(folder, device=device)


def evaluate_positions(clf: ImageClassifier, ds: Positions, preprocess: Callable, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``clf`` on ``ds`` (plain forward, no shifts)."""
    correct = 0
    clf.eval()
    with torch.no_grad():
        for s in range(0, len(ds), batch_size):
            x, y, _ = load_batch(ds, np.arange(s, min(s + batch_size, len(ds))), preprocess)
            correct += int((clf(x.to(clf.head.weight.device)).argmax(1).cpu() == y).sum())
    return correct / max(1, len(ds))


__all__ = ["finetune", "initial_model", "FinetuneResult", "load_classifier", "evaluate_positions", "alpha_label"]
