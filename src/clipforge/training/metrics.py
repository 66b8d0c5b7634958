"""Training records: per-log-step metrics (JSONL, optional TensorBoard), the curves PNG, peak RSS."""

from __future__ import annotations

import json
import resource
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..utils import append_jsonl, atomic_open, atomic_write_text


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class MetricsLog:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard
    when asked for and installed. ``records`` keeps everything logged (checkpoints carry it, so a
    resumed run rewrites the file without the lines logged after its last checkpoint)."""

    def __init__(self, path: str | Path, records: Sequence[dict[str, Any]] = (), tensorboard_dir: str | Path | None = None,
                 wandb_run: Any = None):
        self.path = Path(path)
        self._wandb = wandb_run  # a wandb Run (open_wandb), fed the same scalars as TensorBoard
        self.records: list[dict[str, Any]] = list(records)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write_text(self.path, text)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("TensorBoard logging requested but the tensorboard package is not installed; "
                              "metrics go to metrics.jsonl only (pip install tensorboard)", stacklevel=2)
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        append_jsonl(self.path, record)
        scalars = {key.replace(".", "/"): value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        step = int(record.get("step", 0))
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def import_wandb() -> Any:
    """The ``wandb`` module, or ``ModuleNotFoundError`` (name ``wandb``) saying to install it."""
    try:
        import wandb  # optional, heavy: only with --report-to wandb
    except ImportError:
        e = ModuleNotFoundError("wandb logging (--report-to wandb) needs the wandb package: pip install wandb")
        e.name = "wandb"
        raise e from None
    return wandb


def open_wandb(run_dir: str | Path, project: str, config: dict[str, Any]) -> Any:
    """A wandb Run for ``run_dir`` (its files under ``run_dir/wandb``). The run id is kept in
    ``run_dir/wandb_id.txt``, so a resumed run continues the same wandb run. Raises
    ``ModuleNotFoundError`` (name ``wandb``) when the package is absent: only asked-for runs import it."""
    wandb = import_wandb()
    run_dir = Path(run_dir)
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
    if not run_id:
        run_id = uuid.uuid4().hex[:12]  # a name only: the numerics never see it
        atomic_write_text(id_file, run_id + "\n")
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                          config=config)
    except Exception as e:  # e.g. no API key: wandb's own errors, said in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--report-to wandb: {msg} (WANDB_MODE=offline logs without an account)") from None


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path, title: str = "training") -> Path | None:
    """Loss, temperature, learning rate and any evaluation metrics against the step, as a PNG."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    panels = 3 + (1 if eval_keys else 0)
    fig = Figure(figsize=(4.2 * panels, 3.4))
    axes = fig.subplots(1, panels)
    steps = [r["step"] for r in train]
    for ax, key, label in zip(axes, ("loss", "temperature", "lr"), ("contrastive loss", "exp(logit_scale)", "learning rate")):
        ax.plot(steps, [r.get(key) for r in train], lw=1.2)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if eval_keys:
        ax = axes[-1]
        for key in eval_keys:
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key[5:])
        ax.set_title("evaluation")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


__all__ = ["MetricsLog", "plot_curves", "peak_rss_mb"]
