"""Training reads its rank where embedding and curation do (clipforge.utils.rank_env)."""

from __future__ import annotations

import pytest

from clipforge.training.distributed import init_distributed


def test_single_process_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.distributed, env.device.type) == (0, 1, False, "cpu")


def test_srun_task_without_rendezvous_is_a_clear_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    with pytest.raises(ValueError, match=r"rank 1 of 2 \(slurm\) but MASTER_ADDR and MASTER_PORT not set"):
        init_distributed("cpu")
