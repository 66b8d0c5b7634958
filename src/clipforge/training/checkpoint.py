"""Training checkpoints: everything needed to continue a run bit-for-bit.

A checkpoint is ``<run>/checkpoints/step_XXXXXXX.pt`` (``torch.save``, written atomically, the
last ``keep_last`` kept) holding ``model`` (state dict) and ``config`` (the model's CLIPConfig, so
:func:`clipforge.checkpoints.load_model` reads it like any other checkpoint), plus the optimiser,
schedule, gradient scaler, step, per-rank RNG and data-loader states, the training config, skip
statistics and the metrics logged so far. Everything is plain tensors and Python containers, so it
loads with ``torch.load(weights_only=True)`` (no arbitrary code runs on load).
"""

from __future__ import annotations

import errno
import io
import random
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..utils import atomic_open

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as tensors and plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_plain(obj: Any, where: str = "state") -> Any:
    """Convert NumPy values inside a (loader) state to tensors/Python values so the checkpoint
    stays loadable with ``weights_only=True``; anything else unusual is a clear error."""
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        seq = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return seq if isinstance(obj, list) else tuple(seq)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    raise TypeError(f"cannot store {where} of type {type(obj).__name__} in a training checkpoint")


class _Sink(io.RawIOBase):
    """The checkpoint file as torch.save sees it, keeping the first ``OSError`` of a write: torch's
    zip writer turns it into ``RuntimeError('... unexpected pos ...')``, which names neither the
    file nor the cause (a full disk, a quota)."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (a kill mid-write leaves the previous checkpoints intact). A failed
    write (ENOSPC, EDQUOT, EIO...) removes its temporary file and raises one ``OSError`` naming the
    path and the errno; the previous checkpoint stays the latest."""
    path = Path(path)
    sink: _Sink | None = None
    try:
        with atomic_open(path, "wb") as f:
            sink = _Sink(f)
            torch.save({"format_version": FORMAT_VERSION, **state}, sink)
    except (OSError, RuntimeError) as e:
        err = sink.error if sink is not None and sink.error is not None else e
        if not isinstance(err, OSError):
            raise
        code = errno.errorcode.get(err.errno or 0, "")
        raise OSError(err.errno, f"cannot write training checkpoint ({err.strerror or err}"
                                 f"{', ' + code if code else ''})", str(path)) from None
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read training checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ValueError(f"{path} is not a clipforge training checkpoint (no step/optimizer state)")
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported training checkpoint version {state.get('format_version')!r}")
    return state


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, and the temporary files of writes that a
    kill interrupted (called by the only writer right after it saved, so no write is in flight);
    returns the removed paths."""
    found = list_checkpoints(run_dir)
    removed = []
    for _, p in found[:-keep_last] if keep_last > 0 else found:
        p.unlink(missing_ok=True)
        removed.append(p)
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for p in folder.glob(".step_*.pt.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


__all__ = ["checkpoint_dir", "checkpoint_path", "list_checkpoints", "latest_checkpoint", "capture_rng",
           "restore_rng", "to_plain", "save_checkpoint", "load_checkpoint", "prune_checkpoints", "FORMAT_VERSION"]
