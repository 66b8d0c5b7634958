"""The one rank-environment reader, done-markers and file barriers (clipforge.utils.jobs)."""

from __future__ import annotations

import threading

import pytest

from clipforge.utils import RankEnv, is_done, rank_env, read_marker, wait_for, write_marker


def test_single_process_without_launcher_variables():
    assert rank_env({}) == RankEnv(0, 1, 0, "none")
    assert not rank_env({}).distributed and rank_env({}).is_main


def test_torchrun_variables():
    env = rank_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "torchrun")
    assert env.distributed and not env.is_main
    assert [i for i in range(10) if env.owns(i)] == [3, 7]


def test_slurm_variables_and_precedence():
    # an srun task: the step's task count is the world (the allocation may hold more tasks)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert rank_env(srun) == RankEnv(5, 6, 1, "slurm")
    # torchrun launched inside a SLURM job: torchrun's variables win
    assert rank_env({**srun, "RANK": "0", "WORLD_SIZE": "2"}) == RankEnv(0, 2, 0, "torchrun")
    # a batch script or salloc shell (no srun step) runs clipforge as one process
    assert rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == RankEnv()
    assert rank_env({"SLURM_NTASKS": "4"}) == RankEnv()
    with pytest.raises(ValueError, match=r"SLURM_PROCID=6 is not in \[0, SLURM_STEP_NUM_TASKS=6\)"):
        rank_env({**srun, "SLURM_PROCID": "6"})


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
    ({"RANK": "1"}, "WORLD_SIZE missing"),
    ({"WORLD_SIZE": "2"}, "RANK missing"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"RANK=0 is not in \[0, WORLD_SIZE=0\)"),
])
def test_bad_environment_is_one_clear_error(environ, message):
    with pytest.raises(ValueError, match=message):
        rank_env(environ)


def test_markers_say_done_only_when_valid(tmp_path):
    p = tmp_path / "done" / "shard_00000.json"
    assert not is_done(p) and read_marker(p) is None
    rec = write_marker(p, {"fingerprint": "abc", "count": 3})
    assert read_marker(p) == rec and is_done(p) and is_done(p, "abc")
    assert not is_done(p, "other-run")
    p.write_text("{torn", encoding="utf-8")  # not valid JSON: the unit must be redone
    assert not is_done(p)
    p.write_text("[1, 2]", encoding="utf-8")  # valid JSON but not a marker
    assert not is_done(p)


def test_barrier_waits_for_markers_written_by_another_rank(tmp_path):
    paths = [tmp_path / f"u{i}.json" for i in range(3)]
    write_marker(paths[0], {"fingerprint": "f"})
    started = threading.Event()

    def other_rank() -> None:
        started.wait()
        for p in paths[1:]:
            write_marker(p, {"fingerprint": "f"})

    t = threading.Thread(target=other_rank)
    t.start()
    started.set()
    wait_for(paths, lambda p: is_done(p, "f"), rank=0, world_size=2, poll=0.01, timeout=600, progress=False)
    t.join()
    assert all(is_done(p, "f") for p in paths)


def test_barrier_errors(tmp_path):
    missing = [tmp_path / "never.json"]
    with pytest.raises(RuntimeError, match="single-process run"):
        wait_for(missing, world_size=1, progress=False)
    with pytest.raises(TimeoutError, match=r"rank 1: gave up .* waiting for 1 shards .*never.json.*; merge later"):
        wait_for(missing, what="shards", rank=1, world_size=2, timeout=0.0, poll=0.0, progress=False,
                 hint="merge later")
    wait_for([], world_size=1)  # nothing to wait for
