"""Multi-process data-parallel plumbing: the torchrun environment, process groups, and the
feature all-gather that lets every rank's loss see the global batch.

Launch with ``torchrun --nproc-per-node N -m clipforge.cli.main train ...`` (or the ``clipforge``
script), or one ``srun`` task per process under SLURM: each process finds its rank in the
environment (:func:`clipforge.utils.rank_env`) and joins a NCCL (GPU) or Gloo (CPU) group.
Without those variables training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..utils import RankEnv, rank_env


@dataclass(frozen=True)
class DistEnv(RankEnv):
    """Where this process sits in the job (:class:`clipforge.utils.RankEnv`) and its device."""

    device: torch.device = torch.device("cpu")


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group the environment describes (torchrun, or SLURM ``srun`` with
    ``MASTER_ADDR``/``MASTER_PORT`` exported; see :func:`clipforge.utils.rank_env`). Idempotent."""
    job = rank_env()
    dev = resolve_device(device, job.local_rank)
    if job.distributed:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ValueError(f"rank {job.rank} of {job.world_size} ({job.launcher}) but {' and '.join(missing)} "
                             "not set: torchrun sets them; under srun export the first node's address and a free port")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=job.rank,
                                    world_size=job.world_size)
    return DistEnv(rank=job.rank, world_size=job.world_size, local_rank=job.local_rank, launcher=job.launcher,
                   device=dev)


def shutdown_distributed(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands every rank the gradient of *all* ranks' losses
    with respect to its own slice (a sum-reduce of the gathered gradient, then the local slice)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_features(x: torch.Tensor, env: DistEnv, with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` (``[B, D]``, equal ``B`` on every rank) over ranks in rank order.

    ``with_grad=False``: the other ranks' rows are constants and the local slice is replaced by the
    local tensor itself, so gradients flow into this rank's features only (the caller accounts for
    the loss terms other ranks compute on them). ``with_grad=True``: gradients of every rank's loss
    flow back to the rank that produced the rows."""
    if not env.distributed:
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(env.world_size)]
    with torch.no_grad():
        dist.all_gather(parts, x.detach().contiguous())
    parts[env.rank] = x
    return torch.cat(parts)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(value: int, env: DistEnv) -> int:
    """The sum of an integer over all ranks (e.g. the tokens a loss is averaged over)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "resolve_device", "gather_features",
           "any_rank", "sum_over_ranks", "all_gather_object", "barrier"]
