"""The training run: build everything from a :class:`TrainConfig`, loop over optimiser steps with
logging, periodic evaluation and checkpoints, stop cleanly on a signal, and leave a run folder:

```
<out>/config.json           the resolved TrainConfig (incl. the concrete linear_backend)
<out>/model_config.json     the CLIPConfig
<out>/metrics.jsonl         one record per log step (and per evaluation)
<out>/checkpoints/step_*.pt  the last keep_last training checkpoints (resume from the newest)
<out>/final.safetensors     the trained model (clipforge.load / load_model read it); a folder
                            <out>/final/ for a family model with its own tokenizer files
<out>/summary.json          status, steps, loss, samples/s, wall time, peak RSS, skip statistics
<out>/curves.png            loss, temperature, learning rate (and evaluation) against the step
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import fast, loading
from ..checkpoints import save_model
from ..config import CLIPConfig, get_model_config
from ..data import SkipStats, make_pair_loader, open_pairs
from ..families import FolderTokenizer, tokenizer_for
from ..precision import cast_weights
from ..models import CLIP, create_model, with_objective
from ..tokenizer import get_tokenizer
from ..utils import read_json, torch_threads, write_json
from . import checkpoint as ckpt
from .config import TrainConfig, merge_for_resume
from .distributed import DistEnv, all_gather_object, any_rank, barrier, init_distributed, shutdown_distributed
from ..data.mirror import MirrorCompanions
from .evaluation import Evaluator, default_evaluator, with_zeroshot
from .hard_negatives import SwapNegatives, TokenizeWithNegatives, hard_negative_modes
from .metrics import MetricsLog, import_wandb, open_wandb, peak_rss_mb, plot_curves
from .token_losses import freeze_unused
from .optim import CosineWarmup, build_optimizer
from .recipes import apply_recipes, attach_distillation, finish_recipes, lr_scales, train_transform
from .remote_sync import RemoteSync
from .schedule import make_schedule
from .signals import StopRequest, exit_code, signals_blocked
from .sigmoid_loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from .step import TrainStep, make_grad_scaler, make_train_step, objective_module


@dataclass(frozen=True)
class TokenizeCaptions:
    """Picklable caption -> ids function for the data loader's workers (long captions truncated):
    OpenAI's BPE, or with ``folder`` the tokenizer files of a family model's checkpoint folder
    (SentencePiece / Hugging Face ``tokenizers``, cleaned as ``clean``), read once per process."""

    context_length: int = 77
    folder: str | None = None
    clean: str = "whitespace"
    strip_sep_token: bool = False

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "TokenizeCaptions":
        """The tokenizer ``model``'s text tower was trained with (:func:`clipforge.families.tokenizer_for`)."""
        tok = tokenizer_for(model)  # refuses a family model whose tokenizer files are not attached
        if isinstance(tok, FolderTokenizer):
            return cls(model.context_length, str(tok.folder), tok.clean_mode, tok.strip_sep_token)  # type: ignore[arg-type]
        return cls(model.context_length)  # type: ignore[arg-type]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.folder is None:
            return get_tokenizer(self.context_length).tokenize(list(texts), self.context_length, truncate=True)
        tok = _folder_tokenizer(self.folder, self.context_length, self.clean, self.strip_sep_token)
        return tok.tokenize(list(texts), self.context_length, truncate=True)


@functools.lru_cache(maxsize=4)
def _folder_tokenizer(folder: str, context_length: int, clean: str, strip_sep_token: bool) -> FolderTokenizer:
    return FolderTokenizer(folder, context_length, clean, strip_sep_token)


def caption_tokenizer(config: TrainConfig, model: torch.nn.Module | int) -> Callable[[list[str]], Any]:
    """The loader's captions -> text batch function: ids from ``model``'s own tokenizer (a family
    model's folder tokenizer, else OpenAI's BPE; a context length: OpenAI's BPE), or ids with the
    rule-built hard negatives of ``config.hard_negatives`` (drawn with the run's seed)."""
    tokenize = TokenizeCaptions(model) if isinstance(model, int) else TokenizeCaptions.for_model(model)
    if "swap" not in hard_negative_modes(config.hard_negatives):
        return tokenize
    return TokenizeWithNegatives(tokenize, SwapNegatives(config.hard_negatives_per_caption, config.seed))


def resolve_model_config(spec: str) -> CLIPConfig:
    """A zoo name, or a path to a CLIPConfig JSON file."""
    p = Path(spec)
    if spec.endswith(".json"):
        if not p.is_file():
            raise FileNotFoundError(f"model config file not found: {p}")
        return CLIPConfig.from_json(p)
    try:
        return get_model_config(spec)
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def build_model(config: TrainConfig) -> CLIP:
    """A fresh model of ``config.model`` (seeded), or the weights of ``config.init`` (any format),
    of ``config.objective``: for bow / caption the CLIP subclass with that head (a fresh, seeded
    head when the ``init`` weights have none or another objective's)."""
    if config.init:
        model = with_objective(loading.load(config.init, fast=False, trust_torchscript=config.trust_torchscript)[0], config.objective, seed=config.seed)
        if config.loss == "siglip" and model.logit_bias is None:  # the weights keep their learned temperature
            model.add_logit_bias(SIGLIP_INIT_LOGIT_BIAS)
        return model
    arch = dataclasses.replace(resolve_model_config(config.model), objective=config.objective)
    if config.loss == "siglip" and arch.init_logit_bias is None:  # the paper's init: t = 10, b = -10
        arch = dataclasses.replace(arch, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS,
                                   init_logit_scale=SIGLIP_INIT_LOGIT_SCALE)
    return create_model(arch, seed=config.seed)


def check_loss(model: CLIP, loss: str) -> None:
    """A model with a learned logit bias is a sigmoid-loss model: the softmax loss would leave the
    bias untrained (and DDP waiting for its gradient), so it is refused in one line."""
    if loss != "siglip" and model.logit_bias is not None:
        raise ValueError(f"the model has a logit_bias (a sigmoid-loss model, init {model.config.init_logit_bias}); "
                         f"train it with --loss siglip (or --siglip), not loss={loss!r}")


def open_training_data(config: TrainConfig) -> tuple[Any, Any | None]:
    """Open (and so validate) the data specs before any model is built: a missing manifest or an
    empty shard pattern fails in a second, not after minutes of set-up."""
    opts = config.data_options()
    train_source = open_pairs(config.data, split="train", seed=config.seed, **opts,
                              upsampling_factors=config.train_data_upsampling_factors)
    val_source = open_pairs(config.val_data, split="val", seed=config.seed, **opts) if config.val_data else None
    return train_source, val_source


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Run:
    def __init__(self, config: TrainConfig, env: DistEnv, should_stop: Callable[[int], bool] | None,
                 evaluator: Evaluator | None, precision_why: str = "as requested") -> None:
        self.config, self.env, self.should_stop = config, env, should_stop
        self.precision_why = precision_why
        self.evaluator = evaluator
        self.run_dir = Path(config.resume or config.out)
        self.main = env.is_main
        self.remote: RemoteSync | None = None

    # --- set-up -------------------------------------------------------------------------------
    def _check_run_dir(self) -> Path | None:
        """The checkpoint to resume from (or None); refuses to overwrite another run."""
        cfg = self.config
        if cfg.resume:
            saved_path = self.run_dir / "config.json"
            if not saved_path.is_file():
                raise FileNotFoundError(f"--resume {self.run_dir}: no config.json (not a clipforge training run)")
            saved = TrainConfig.from_dict(read_json(saved_path), source=str(saved_path))
            merge_for_resume(saved, cfg.to_dict(), str(self.run_dir))  # raises on incompatible changes
            latest = ckpt.latest_checkpoint(self.run_dir)
            if latest is None:
                raise FileNotFoundError(f"--resume {self.run_dir}: no checkpoints in {ckpt.checkpoint_dir(self.run_dir)}")
            return latest
        if ckpt.list_checkpoints(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds a training run (checkpoints/); continue it with "
                             f"--resume {self.run_dir} or choose another --out")
        return None

    def _backend(self) -> dict[str, Any]:
        """What the run computes with: kernels (``fast.backend_record``) and precision, with why."""
        return {**fast.backend_record(), "precision": self.config.precision, "precision_why": self.precision_why}

    def _say(self, msg: str) -> None:
        if self.main and self.config.progress:
            tqdm.write(msg)

    def run(self) -> dict[str, Any]:
        cfg, env = self.config, self.env
        started = time.time()
        resume_from = self._check_run_dir()
        # --remote-sync: opened (and so checked) before any work
        self.remote = RemoteSync(self.run_dir, cfg.remote_sync) if (cfg.remote_sync and self.main) else None
        if cfg.wandb and self.main:
            import_wandb()  # --report-to wandb without the package: one line now, not after the set-up
        train_source, _ = open_training_data(cfg)  # the validation spec is only checked here
        _seed_everything(cfg.seed + env.rank)

        state = ckpt.load_checkpoint(resume_from) if resume_from else None
        if state is not None:  # the checkpoint carries architecture and weights (--init may be gone)
            model = create_model(CLIPConfig.from_dict(state["config"]))
            if not cfg.lora_rank:  # with LoRA the state has the adapters: loaded once they exist
                model.load_state_dict(state["model"])
        else:
            model = build_model(cfg)
        if model.config.objective != cfg.objective:  # only reachable with a hand-edited run folder
            raise ValueError(f"{resume_from}: the checkpoint's model has objective {model.config.objective!r}, "
                             f"the run's config {cfg.objective!r}")
        check_loss(model, cfg.loss)
        model = cast_weights(model.to(env.device), cfg.precision).train()  # bf16/fp16: weights cast
        if cfg.fast_paths:  # same Parameters and state_dict; gradients equal within float rounding
            fast.enable(model)
        if cfg.accum_steps > 1 and model.config.vision.kind == "resnet" and not cfg.lock_image:
            warnings.warn("gradient accumulation with a ResNet image tower: BatchNorm sees each micro-batch "
                          "separately when features are recomputed, so the gradient only approximates the "
                          "full-batch one (exact for ViT towers)", stacklevel=2)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        apply_recipes(model, cfg)  # patch dropout, locking, LoRA (docs/recipes.md)
        if state is not None and cfg.lora_rank:
            model.load_state_dict(state["model"])
        freeze_unused(model)  # bow/caption: what the objective never reads (text tower parts, temperature)
        module: torch.nn.Module = objective_module(model)
        if env.distributed:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        optimizer = build_optimizer(model, cfg.lr, cfg.wd, cfg.betas, cfg.eps, lr_scales(model, cfg))
        schedule = make_schedule(optimizer, cfg)  # --lr-scheduler cosine | const | const-cooldown
        scaler = make_grad_scaler(cfg.precision, env.device)
        step_fn = make_train_step(model, module, optimizer, precision=cfg.precision, grad_clip=cfg.grad_clip,
                                  scaler=scaler, env=env, local_loss=cfg.local_loss,
                                  gather_with_grad=cfg.gather_with_grad, loss=cfg.loss)
        attach_distillation(step_fn, model, cfg, env)  # --distill-model: the teacher, loaded once
        if self.precision_why != "as requested":
            self._say(f"precision {cfg.precision} ({self.precision_why})")

        loader = make_pair_loader(train_source, transform=train_transform(model.config.preprocess, cfg),
                                  tokenize=caption_tokenizer(cfg, model), batch_size=cfg.batch_size,
                                  seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                                  num_workers=cfg.num_workers, resampled=cfg.resampled,
                                  companion=MirrorCompanions(cfg.hard_negatives_other)
                                  if "mirror" in hard_negative_modes(cfg.hard_negatives) else None)
        step, records = 0, []
        if state is not None:
            step, records = self._restore(state, optimizer, schedule, scaler, loader)
            self._say(f"resuming {self.run_dir} from step {step} ({resume_from.name})")
        if self.main:
            write_json(self.run_dir / "config.json", cfg.to_dict())
            write_json(self.run_dir / "model_config.json", model.config.to_dict())
        log = MetricsLog(self.run_dir / "metrics.jsonl", records,
                         self.run_dir / "tensorboard" if (cfg.tensorboard and self.main) else None,
                         open_wandb(self.run_dir, cfg.wandb_project_name, cfg.to_dict()) if cfg.wandb else None) \
            if self.main else None
        try:
            status, signum = self._loop(model, step_fn, schedule, loader, log, step, started)
        finally:
            if log is not None:
                log.close()
            close = getattr(loader, "close", None)
            if callable(close):
                close()
        return self._finish(model, loader, log, status, signum, started)

    def _restore(self, state: dict[str, Any], optimizer: torch.optim.Optimizer, schedule: CosineWarmup,
                 scaler: Any, loader: Any) -> tuple[int, list[dict[str, Any]]]:
        ranks = state["rank_states"]
        if len(ranks) != self.env.world_size:
            raise ValueError(f"checkpoint was written by {len(ranks)} process(es) but this job has "
                             f"{self.env.world_size}; resume with the same number of processes")
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        mine = ranks[self.env.rank]
        loader.load_state_dict(mine["loader"])
        ckpt.restore_rng(mine["rng"])
        return int(state["step"]), list(state.get("metrics", []))

    # --- the loop -----------------------------------------------------------------------------
    def _loop(self, model: CLIP, step_fn: TrainStep, schedule: CosineWarmup, loader: Any,
              log: MetricsLog | None, step: int, started: float) -> tuple[str, int | None]:
        cfg, env = self.config, self.env
        k = cfg.accum_steps
        per_step = cfg.batch_size * k * env.world_size
        deadline = started + cfg.time_limit_minutes * 60 if cfg.time_limit_minutes else None
        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.main and cfg.progress))
        status, signum = "completed", None
        window_t, window_steps, window_loss = time.time(), 0, 0.0
        saved_at = step
        it = iter(loader)
        try:
            with StopRequest() as stop:
                while step < cfg.steps:
                    with signals_blocked():  # workers forked here must not inherit the handlers
                        batches = [next(it) for _ in range(k)]
                    lr = schedule(step)
                    result = step_fn(batches)
                    step += 1
                    if not math.isfinite(result.loss):
                        raise FloatingPointError(f"the loss became {result.loss} at step {step}; lower --lr, "
                                                 "add --grad-clip, or use fp32")
                    window_steps += 1
                    window_loss += result.loss
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        now = time.time()
                        rate = per_step * window_steps / max(now - window_t, 1e-9)
                        loss, skipped = _across_ranks(window_loss / window_steps, loader, env)
                        record = {"step": step, "loss": loss, "lr": lr,
                                  "temperature": float(model.logit_scale.detach().exp()),
                                  "samples_per_s": rate, "skipped": skipped,
                                  "epoch": int(getattr(loader, "epoch", 0)), "time_s": now - started}
                        if model.logit_bias is not None:
                            record["logit_bias"] = float(model.logit_bias.detach())
                        if result.grad_norm is not None:
                            record["grad_norm"] = result.grad_norm
                        if log is not None:
                            log.log(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{rate:.0f}",
                                        T=f"{record['temperature']:.1f}")
                        window_t, window_steps, window_loss = now, 0, 0.0
                    if self.evaluator is not None and self._eval_due(step):
                        self._evaluate(model, step, log)
                    reason = "interrupted" if stop.requested else (
                        "stopped" if self.should_stop is not None and self.should_stop(step) else (
                            "time_limit" if deadline is not None and time.time() >= deadline else None))
                    halt = any_rank(reason is not None, env)
                    if (cfg.save_every and step % cfg.save_every == 0) or halt or step == cfg.steps:
                        self._save(model, step_fn, schedule, loader, log, step)
                        saved_at = step
                    elif self.remote is not None and cfg.remote_sync_frequency and step % cfg.remote_sync_frequency == 0:
                        self.remote.sync()  # --remote-sync-frequency: by steps, never by the clock
                    if halt:
                        signum = stop.signum
                        status = reason or "interrupted"  # another rank's signal
                        self._say(f"stopping at step {step}/{cfg.steps} ({status}); checkpoint written")
                        break
        finally:
            bar.close()
        if saved_at != step:  # only reachable if the loop ended without a final save
            self._save(model, step_fn, schedule, loader, log, step)
        self.step = step
        return status, signum

    def _eval_due(self, step: int) -> bool:
        """At ``eval_every``, or as a :class:`~.evaluation.Scheduled` evaluator says (zero-shot cadence)."""
        due = getattr(self.evaluator, "due", None)
        return due(step) if due is not None else bool(self.config.eval_every and step % self.config.eval_every == 0)

    def _evaluate(self, model: CLIP, step: int, log: MetricsLog | None) -> None:
        if self.main and self.evaluator is not None:
            metrics = self.evaluator(model, step)
            model.train()
            if log is not None and metrics:
                log.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
            self._say(f"step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        barrier(self.env)

    def _save(self, model: CLIP, step_fn: TrainStep, schedule: CosineWarmup, loader: Any,
              log: MetricsLog | None, step: int) -> None:
        rank_state = {"rng": ckpt.capture_rng(), "loader": ckpt.to_plain(loader.state_dict(), "loader state"),
                      "skip_stats": ckpt.to_plain(_stats_dict(loader), "skip stats")}
        rank_states = all_gather_object(rank_state, self.env)
        if self.main:
            ckpt.save_checkpoint(ckpt.checkpoint_path(self.run_dir, step), {
                "model": model.state_dict(),
                "config": model.config.to_dict(),
                "train_config": self.config.to_dict(),
                "optimizer": step_fn.optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "scaler": step_fn.scaler.state_dict() if step_fn.scaler is not None else None,
                "step": step,
                "rank_states": rank_states,
                "metrics": list(log.records) if log is not None else [],
                "backend": self._backend(),
            })
            ckpt.prune_checkpoints(self.run_dir, self.config.keep_last)
            if self.remote is not None:  # --remote-sync: the finished checkpoint and records
                self.remote.sync()
        barrier(self.env)

    # --- the end ------------------------------------------------------------------------------
    def _finish(self, model: CLIP, loader: Any, log: MetricsLog | None, status: str, signum: int | None,
                started: float) -> dict[str, Any]:
        cfg, env = self.config, self.env
        stats = all_gather_object(_stats_dict(loader), env)
        if not self.main:
            return {"status": status, "steps_done": self.step, "rank": env.rank, "exit_code": exit_code(signum)}
        records = log.records if log is not None else []
        train_records = [r for r in records if "loss" in r]
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        final_model = None
        if status != "interrupted":  # a signal means "resume later"; anything else ends the run
            # a family model with its own tokenizer files is saved as a folder (weights, config, tokenizer)
            name = "final" if TokenizeCaptions.for_model(model).folder else "final.safetensors"
            final_model = str(save_model(finish_recipes(model, cfg, self.run_dir), self.run_dir / name))
        curves = plot_curves(records, self.run_dir / "curves.png", title=f"{model.config.name or cfg.model}")
        rates = [r["samples_per_s"] for r in train_records]
        summary = {
            "status": status,
            "signal": signum,
            "exit_code": exit_code(signum),
            "steps_done": self.step,
            "steps": cfg.steps,
            "model": model.config.name or cfg.model,
            "objective": cfg.objective,
            "loss": cfg.loss,
            "final_logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
            "parameters": model.num_parameters(),
            "data": cfg.data,
            "world_size": env.world_size,
            "global_batch": cfg.batch_size * cfg.accum_steps * env.world_size,
            "samples_seen": self.step * cfg.batch_size * cfg.accum_steps * env.world_size,
            "final_loss": train_records[-1]["loss"] if train_records else None,
            "final_temperature": float(model.logit_scale.detach().exp()),
            "samples_per_s_median": float(np.median(rates)) if rates else None,
            "epoch": int(getattr(loader, "epoch", 0)),
            "wall_time_s": time.time() - started,
            "peak_rss_mb": peak_rss_mb(),
            "skip_stats": _merge_stats(stats),
            "last_eval": {k: v for k, v in evals[-1].items()} if evals else None,
            "run_dir": str(self.run_dir),
            "final_model": final_model,
            "last_checkpoint": str(ckpt.latest_checkpoint(self.run_dir)),
            "curves": str(curves) if curves else None,
            "backend": self._backend(),
        }
        write_json(self.run_dir / "summary.json", summary)
        if self.remote is not None:
            self.remote.sync()  # final model, curves, summary
            summary["remote_sync"] = {"remote": cfg.remote_sync, "files_copied": self.remote.copies}
        return summary


def _stats_dict(loader: Any) -> dict[str, Any]:
    stats = getattr(loader, "stats", None)
    if stats is None:
        return {}
    return stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)


def _across_ranks(loss: float, loader: Any, env: DistEnv) -> tuple[float, int]:
    """Mean loss (ranks differ with ``local_loss``) and total skipped samples over all ranks."""
    skipped = int(getattr(getattr(loader, "stats", None), "total", 0) or 0)
    if not env.distributed:
        return loss, skipped
    values = all_gather_object((loss, skipped), env)
    return float(np.mean([v[0] for v in values])), int(sum(v[1] for v in values))


def _merge_stats(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the per-rank skip statistics (counts by reason, a few example keys)."""
    merged = SkipStats()
    for stats in per_rank:
        merged.merge(stats)
    return merged.to_dict()


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device):
    """Deterministic kernels for the duration of the run (restored afterwards: ``train`` may be
    called in a process that does other things)."""
    if not enabled:
        yield
        return
    import os

    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.deterministic
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.mkldnn.deterministic = previous[1]


def run_linear_backend(config: TrainConfig) -> str:
    """The run's concrete fp32 linear kernel: ``torch`` when deterministic, else the config's; for
    a resumed run left at ``auto``, the one its run folder recorded; else this process's choice
    (``clipforge.fast.linear_backend``: set_backend, CLIPFORGE_LINEAR or the machine's cache)."""
    if config.deterministic:
        return "torch"
    choice = config.linear_backend
    saved = Path(config.resume) / "config.json" if config.resume else None
    if choice == "auto" and saved is not None and saved.is_file():
        choice = read_json(saved).get("linear_backend", "auto")
    return fast.linear_backend() if choice == "auto" else choice


def run_precision(config: TrainConfig, device: torch.device) -> tuple[str, str]:
    """The run's concrete precision and why. ``auto``: for a resumed run, what its run folder
    recorded; on a CPU ``amp_bf16`` where the machine's stored matmul probe
    (``fast.matmul_speed_by_precision``) finds bf16 >= 1.3x fp32, else ``fp32``; on a CUDA GPU
    ``amp_bf16`` where it has bf16, else ``amp``; elsewhere ``fp32``."""
    choice = config.precision
    if choice != "auto":
        if choice in ("amp_bf16", "amp_bfloat16") and device.type == "cpu" and fast.fastest_precision() != "bf16":
            speed = fast.matmul_speed_by_precision()
            warnings.warn(f"--precision {choice}: this CPU's stored matmul probe finds bf16 no faster than fp32 "
                          f"({speed['bf16']:.0f} vs {speed['fp32']:.0f} GFLOP/s); fp32 or auto may train faster",
                          stacklevel=2)
        return choice, "as requested"
    saved = Path(config.resume) / "config.json" if config.resume else None
    if saved is not None and saved.is_file():
        recorded = read_json(saved).get("precision", "auto")
        if recorded != "auto":
            return recorded, f"auto, resolved when the run started ({saved})"
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ("amp_bf16", "auto: CUDA GPU with bf16") if bf16 else ("amp", "auto: CUDA GPU without bf16")
    if device.type != "cpu":
        return "fp32", f"auto: no reduced-precision training path chosen for {device.type}"
    speed = fast.matmul_speed_by_precision()
    ratio = speed["bf16"] / max(speed["fp32"], 1e-9)
    measured = f"bf16 {speed['bf16']:.0f} vs fp32 {speed['fp32']:.0f} GFLOP/s ({ratio:.2f}x, this machine's stored probe)"
    if fast.fastest_precision() == "bf16":
        return "amp_bf16", f"auto: {measured}"
    return "fp32", f"auto: kept fp32, this CPU has no bf16 gain: {measured}"


def train(config: TrainConfig, *, should_stop: Callable[[int], bool] | None = None,
          evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Run (or resume, ``config.resume``) a training job (``config.objective``: contrastive, bow or
    caption); returns the summary dict.

    ``should_stop(step)`` is polled after every step (True: checkpoint and return, like a signal);
    ``evaluator(model, step) -> {name: value}`` replaces the default periodic evaluation (zero-shot
    scene tasks for ``builtin:scenes``, validation loss/recall for ``val_data``) run every
    ``config.eval_every`` steps. Under torchrun every process calls this.
    """
    config.validate()
    backend = run_linear_backend(config)
    config = config.replace(linear_backend=backend)  # recorded in the run folder's config.json
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    env = init_distributed(config.device)
    try:
        with _deterministic(config.deterministic, env.device), torch_threads(config.threads), \
                fast.using_backend(backend):
            precision, why = run_precision(config, env.device)
            config = config.replace(precision=precision)  # the concrete name, recorded in config.json
            if evaluator is None and config.eval_every:
                evaluator = default_evaluator(config)
            evaluator = with_zeroshot(config, evaluator)  # --zeroshot-data at --zeroshot-frequency
            return _Run(config, env, should_stop, evaluator, precision_why=why).run()
    finally:
        if env.distributed and not had_group:
            shutdown_distributed(env)


__all__ = ["train", "TokenizeCaptions", "caption_tokenizer", "build_model", "resolve_model_config", "open_training_data",
           "run_linear_backend", "run_precision"]
