"""Launching clipforge as a multi-node job on one machine: two torchrun agents (one per "node",
c10d rendezvous on 127.0.0.1) or two srun-style tasks (SLURM variables set by hand).

Every process is started in its own session and tracked by a :class:`Launches`, which kills
whatever is still running when a test ends, so a hang fails the test (timeouts) instead of
blocking CI, and no orphaned worker outlives it. Output goes to files, never pipes (a full pipe
would stall a worker).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

CLI = [sys.executable, "-m", "clipforge.cli.main"]
# Generous: a loaded 2-core box runs two agents + two workers + the test. Only hangs hit it.
TIMEOUT = 600.0
# Variables of an outer launcher (CI itself under srun or torchrun) that would leak into ours.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to port 0, read it, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's rank variables, with the kernels pinned: the
    plain torch linear (``CLIPFORGE_LINEAR=torch``: the oneDNN probe must not pick differently
    in different processes) and one OpenMP thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(CLIPFORGE_LINEAR="torch", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def torchrun_cmd(args: Sequence[str], port: int, run_id: str, nnodes: int = 2) -> list[str]:
    """The command every node runs (identical on all of them; c10d assigns the node ranks).
    ``--local-addr`` only because both "nodes" are this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
            "--max-restarts", "0", "--local-addr", "127.0.0.1", "-m", "clipforge.cli.main", *args]


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with (Linux /proc)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


class Launches:
    """Processes started by one test; :meth:`close` kills the survivors (and torchrun's workers,
    which run in sessions of their own)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, cmd: Sequence[str], name: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)
        self.procs.append((p, log))
        return p

    def torchrun(self, args: Sequence[str], name: str, cwd: Path, nnodes: int = 2,
                 env: dict[str, str] | None = None) -> list[subprocess.Popen]:
        """``nnodes`` agents of one job, as ``nnodes`` machines would each start it."""
        port, run_id = free_port(), f"{name}-{uuid.uuid4().hex[:8]}"
        cmd = torchrun_cmd(args, port, run_id, nnodes)
        return [self.start(cmd, f"{name}-node{n}", env or clean_env(), cwd) for n in range(nnodes)]

    def srun(self, args: Sequence[str], name: str, cwd: Path, ntasks: int = 2) -> list[subprocess.Popen]:
        """``ntasks`` processes as ``srun --nodes N --ntasks-per-node 1`` starts them: the SLURM
        task variables, and MASTER_ADDR/MASTER_PORT exported by the batch script."""
        port = free_port()
        procs = []
        for r in range(ntasks):
            env = clean_env(SLURM_PROCID=str(r), SLURM_NTASKS=str(ntasks), SLURM_STEP_NUM_TASKS=str(ntasks),
                            SLURM_LOCALID="0", SLURM_NODEID=str(r), SLURM_NNODES=str(ntasks),
                            SLURM_JOB_ID="4242", SLURM_STEP_ID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(self.start([*CLI, *args], f"{name}-task{r}", env, cwd))
        return procs

    def single(self, args: Sequence[str], name: str, cwd: Path) -> str:
        """One plain process, waited for; its output."""
        p = self.start([*CLI, *args], name, clean_env(), cwd)
        return self.wait([p])[0]

    def wait_until(self, cond: Callable[[], bool], what: str, running: Sequence[subprocess.Popen],
                   timeout: float = TIMEOUT, poll: float = 0.2) -> None:
        """Poll ``cond()`` until true; fail (not hang) after ``timeout`` seconds, or at once if
        one of ``running`` exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not cond():
            ended = [p for p in running if p.poll() is not None]
            if ended or time.monotonic() > deadline:
                why = f"{ended[0].args} exited ({ended[0].returncode})" if ended else f"timed out after {timeout:.0f}s"
                raise AssertionError(f"waiting for {what}: {why}\n{self._tails(running)}")
            time.sleep(poll)

    def log_of(self, p: subprocess.Popen) -> Path:
        return next(log for q, log in self.procs if q is p)

    def wait(self, procs: Sequence[subprocess.Popen], timeout: float = TIMEOUT,
             codes: Sequence[int] | None = None) -> list[str]:
        """Wait for ``procs`` (all must exit with ``codes``, default 0); their outputs."""
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.close()
                raise AssertionError(f"timed out after {timeout:.0f}s: {p.args}\n{self._tails(procs)}") from None
        want = list(codes) if codes is not None else [0] * len(procs)
        got = [p.returncode for p in procs]
        if got != want:
            raise AssertionError(f"exit codes {got}, expected {want}\n{self._tails(procs)}")
        return [self.log_of(p).read_text(errors="replace") for p in procs]

    def _tails(self, procs: Sequence[subprocess.Popen]) -> str:
        return "\n".join(f"--- {self.log_of(p).name} ---\n" + self.log_of(p).read_text(errors="replace")[-3000:]
                         for p in procs)

    def kill_node(self, agent: subprocess.Popen) -> None:
        """A machine failing: its torchrun agent and its workers die at once (SIGKILL)."""
        for pid in children(agent.pid):
            _kill(pid, signal.SIGKILL)
        _kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=60)

    def close(self) -> None:
        """SIGTERM what is still running (an agent passes it to its workers), then SIGKILL."""
        live = [p for p, _ in self.procs if p.poll() is None]
        workers = {p.pid: children(p.pid) for p in live}
        for p in live:
            _kill(p.pid, signal.SIGTERM)
        for p in live:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
            for pid in workers[p.pid]:
                _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
