"""Jobs split across processes without a process group: where this process sits (torchrun or
SLURM environment), done-markers that say a piece of work is finished, and file barriers that
wait for other ranks' markers.

Embedding (``clipforge embed``), curation (``clipforge data ...``) and training all read their
rank here. A unit of work ``i`` belongs to rank ``i % world_size``; it is finished when its marker
(a small JSON file, written atomically and last) exists, so a killed process leaves at worst a
unit without marker, which the next run redoes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from .io import read_json, write_json

# (rank, world size, local rank) variable names of each launcher, in order of precedence.
# SLURM: the *step's* task count, which only ``srun`` sets; the allocation's SLURM_NTASKS is also
# visible in a batch script or an salloc shell, where clipforge runs as one process.
_LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
}


@dataclass(frozen=True)
class RankEnv:
    """This process's place in a job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun" | "slurm" | "none"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"need 0 <= rank < world_size and local_rank >= 0, got rank={self.rank}, "
                             f"world_size={self.world_size}, local_rank={self.local_rank}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, index: int) -> bool:
        """Whether unit ``index`` of a job is this rank's (round robin)."""
        return index % self.world_size == self.rank


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """The :class:`RankEnv` the environment describes: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
    else an ``srun`` task's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID`` (one process
    per task), else a single process. A torchrun rank without a world size (or the reverse) is an
    error naming the variables; SLURM variables without a step (batch script, salloc shell) are not
    a multi-process launch and are ignored.
    """
    env = os.environ if environ is None else environ
    for launcher, (r_name, w_name, l_name) in _LAUNCHERS.items():
        rank, world = _int_var(env, r_name), _int_var(env, w_name)
        if rank is None and world is None or launcher == "slurm" and (rank is None or world is None):
            continue
        if rank is None or world is None:
            missing = r_name if rank is None else w_name
            raise ValueError(f"{launcher} environment incomplete: {r_name}={env.get(r_name)!r}, "
                             f"{w_name}={env.get(w_name)!r} ({missing} missing)")
        local = _int_var(env, l_name)
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"{r_name}={rank} is not in [0, {w_name}={world})")
        return RankEnv(rank, world, local or 0, launcher)
    return RankEnv()


# --- done-markers -----------------------------------------------------------------------------------


def write_marker(path: str | os.PathLike, record: Mapping[str, Any]) -> dict[str, Any]:
    """Mark a unit finished: ``record`` as JSON, atomically. Write it *after* the unit's outputs."""
    rec = dict(record)
    write_json(path, rec)
    return rec


def read_marker(path: str | os.PathLike, fingerprint: str | None = None) -> dict[str, Any] | None:
    """The marker at ``path``, or None when it is missing, unreadable, or (with ``fingerprint``)
    written by a different run: any of these means the unit still has to be done."""
    try:
        rec = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    if fingerprint is not None and rec.get("fingerprint") != fingerprint:
        return None
    return rec


def is_done(path: str | os.PathLike, fingerprint: str | None = None) -> bool:
    """Whether a valid marker (of the run with ``fingerprint``, if given) exists at ``path``."""
    return read_marker(path, fingerprint) is not None


# --- file barriers ----------------------------------------------------------------------------------


def wait_for(paths: Sequence[Path], done: Callable[[Path], bool] = is_done, *, what: str = "markers",
             rank: int = 0, world_size: int = 1, timeout: float = 6 * 3600.0, poll: float = 0.5,
             progress: bool = True, hint: str = "") -> None:
    """File barrier: block until ``done(p)`` for every ``p`` in ``paths`` (written by other ranks).

    In a single-process job nobody else can write them, so a missing one is an internal error
    (raised at once, not after the timeout). Past ``timeout`` seconds: ``TimeoutError`` naming
    a missing marker (and ending with ``hint``, e.g. how to finish the job another way).
    """
    pending = [p for p in paths if not done(p)]
    if not pending:
        return
    if world_size == 1:
        raise RuntimeError(f"internal error: {len(pending)} marker(s) missing in a single-process run "
                           f"(e.g. {pending[0]})")
    deadline = time.monotonic() + timeout
    bar = tqdm(total=len(paths), initial=len(paths) - len(pending), desc=f"rank {rank}: waiting for {what}",
               disable=not progress)
    try:
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: gave up after {timeout:.0f}s waiting for {len(pending)} {what} "
                                   f"(e.g. {pending[0]}){'; ' + hint if hint else ''}")
            time.sleep(poll)
            still = [p for p in pending if not done(p)]
            bar.update(len(pending) - len(still))
            pending = still
    finally:
        bar.close()


__all__ = ["RankEnv", "rank_env", "write_marker", "read_marker", "is_done", "wait_for"]
