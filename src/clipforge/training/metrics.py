"""Training records: per-log-step metrics (JSONL, optional TensorBoard), the curves PNG, peak RSS."""

from __future__ import annotations

import json
import resource
import sys
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

    def __init__(self, path: str | Path, records: Sequence[dict[str, Any]] = (), tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
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
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key.replace(".", "/"), value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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
