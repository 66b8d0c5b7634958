"""One training run of an experiment: started, resumed or reused, within the experiment's budget.

Each run lives in its own folder (``clipforge train``'s layout). Re-running an experiment reuses
every run that completed, resumes one that stopped (budget, signal, crash after a checkpoint), starts
again one that was killed before its first checkpoint (nothing to resume), and
refuses a folder that holds a different run (another model, objective, seed, schedule...), so an
experiment folder can never mix recipes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..demo import DemoSettings, scenes_spec, train_config
from ..training import TrainConfig, list_checkpoints, train
from ..utils import read_json

# The fields that define what a run computes; the rest (cadence, workers, threads, progress, the
# time limit, the folder) may differ between the first attempt and a resume.
RUN_IDENTITY = ("model", "init", "objective", "data", "steps", "batch_size", "accum_steps", "lr", "wd", "betas",
                "eps", "warmup", "grad_clip", "seed", "eval_every", "hard_negatives", "lock_image", "resampled")


@dataclass
class Recipe:
    """What every run of an experiment shares: the demo's recipe (AdamW, cosine schedule with
    warm-up, gradient clipping at 1) at these settings, and how the runs execute. ``minutes``:
    a wall-clock budget for the whole experiment (unfinished runs resume on the next call)."""

    out: str = "runs/experiment"
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    wd: float = 0.1
    warmup: int = 50
    precision: str = "fp32"
    threads: int | None = None
    num_workers: int = 1
    device: str = "auto"
    minutes: float | None = None
    progress: bool = True

    def check_recipe(self) -> None:
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes: must be > 0 (got {self.minutes})")

    def train_config(self, model: str, seed: int, run_dir: Path, **changes: Any) -> TrainConfig:
        """The run's ``TrainConfig``: the demo's recipe for ``model`` (a zoo name or CLIPConfig
        .json), the built-in scenes at its input size unless ``changes`` give ``data``."""
        settings = DemoSettings(out=self.out, model=model, batch_size=self.batch_size, lr=self.lr, wd=self.wd,
                                warmup=self.warmup, num_workers=self.num_workers, device=self.device,
                                precision=self.precision, seed=seed, progress=self.progress)
        config = train_config(settings, self.steps, None, self.threads)
        return config.replace(**{"data": scenes_spec(settings), **changes, "out": str(run_dir)})


@dataclass
class Budget:
    """A wall-clock budget for a whole experiment (``minutes=None``: unlimited), counted from
    construction. Runs get the time that is left as their ``time_limit_minutes``."""

    minutes: float | None = None
    started: float = field(default_factory=time.time)

    def remaining_minutes(self) -> float | None:
        if self.minutes is None:
            return None
        return self.minutes - (time.time() - self.started) / 60

    def exhausted(self) -> bool:
        left = self.remaining_minutes()
        return left is not None and left <= 0


def run_state(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's summary.json (None if it never finished an attempt)."""
    path = Path(run_dir) / "summary.json"
    return read_json(path) if path.is_file() else None


def is_complete(run_dir: str | Path) -> bool:
    summary = run_state(run_dir)
    return bool(summary and summary.get("status") == "completed" and (Path(run_dir) / "final.safetensors").is_file())


def check_same_run(config: TrainConfig, run_dir: Path) -> None:
    """Raise ``ValueError`` naming the differing fields if ``run_dir`` holds another run."""
    saved = TrainConfig.from_dict(read_json(run_dir / "config.json"), source=str(run_dir / "config.json"))
    keys = RUN_IDENTITY + (("precision",) if config.precision != "auto" else ())
    diff = {k: (getattr(saved, k), getattr(config, k)) for k in keys if getattr(saved, k) != getattr(config, k)}
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
        raise ValueError(f"{run_dir} holds another run ({shown}); use another --out or remove it")


def train_or_resume(config: TrainConfig, budget: Budget | None = None,
                    evaluator: Callable[[Any, int], dict[str, float]] | None = None) -> dict[str, Any]:
    """Train ``config`` into ``config.out``: reuse it if it completed (``reused: True`` in the
    returned summary), resume it if it stopped, else start it; the budget's remaining time is the
    attempt's time limit (status ``time_limit`` when it ran out; the next call resumes). With the
    budget already spent nothing runs: the last attempt's summary (or ``{"status": "not_started"}``)
    with ``budget_exhausted: True``."""
    budget = budget or Budget()
    run_dir = Path(config.out)
    if (run_dir / "config.json").is_file():
        check_same_run(config, run_dir)
        if is_complete(run_dir):
            return {**(run_state(run_dir) or {}), "reused": True}
    # a run killed before its first checkpoint left config.json and nothing to resume from: start it again
    started = (run_dir / "config.json").is_file() and bool(list_checkpoints(run_dir))
    left = budget.remaining_minutes()
    if left is not None and left <= 0:  # nothing runs: the last attempt's summary, if any, says where it stands
        return {**(run_state(run_dir) or {"status": "not_started", "steps_done": 0}), "budget_exhausted": True}
    if started:
        config = TrainConfig.for_resume(run_dir, progress=config.progress, time_limit_minutes=left,
                                        threads=config.threads, num_workers=config.num_workers)
    else:
        config = config.replace(time_limit_minutes=left)
    return {**train(config, evaluator=evaluator), "reused": False}


__all__ = ["Recipe", "Budget", "train_or_resume", "is_complete", "run_state", "check_same_run", "RUN_IDENTITY"]
