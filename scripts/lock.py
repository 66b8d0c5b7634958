#!/usr/bin/env python3
"""The install lock: check the newest releases against it, and refresh it only when they pass.

The README's commands install with ``-c constraints.txt`` (every package at a version that passed the
suite); CI does the same in a new virtual environment. Upstream keeps releasing, so this script installs
the README's test command in a NEW virtual environment *without* the lock (what a user who drops the
``-c`` gets today), prints which packages differ from the lock and which tests break:

    python scripts/lock.py check                  # newest releases vs the lock; exit 1 if a test fails
    python scripts/lock.py refresh                # the same, and rewrite constraints.txt if all pass
    python scripts/lock.py check --env interop    # the interop environment (.ci/interop-venv.sh, tests/interop)
    python scripts/lock.py refresh --env interop  # rewrites .ci/interop-constraints.txt if they pass

``--pytest-args`` narrows the run (e.g. ``--pytest-args "tests/search -x"``); a refresh always runs
everything. Not part of CI's verdict: it is how we see a breaking upstream release before users do.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCKS = {"main": REPO / "constraints.txt", "interop": REPO / ".ci" / "interop-constraints.txt"}
HEADER = {
    "main": "# The lock for the README's commands (pip install -c constraints.txt ...): versions that passed\n"
            "# the whole suite in a new virtual environment. Written by `python scripts/lock.py refresh`;\n"
            "# library users are not pinned (pyproject.toml has lower bounds only).\n",
    "interop": "# The lock for the interop environment (.ci/interop-venv.sh): versions that passed tests/interop.\n"
               "# Written by `python scripts/lock.py refresh --env interop`.\n",
}


def readme_test_command() -> str:
    """The second line of the README's first code block (what CI runs)."""
    lines, inside = [], 0
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside += 1
            if inside == 2:
                break
            continue
        if inside == 1 and line.strip():
            lines.append(line.strip())
    if len(lines) < 2:
        sys.exit("lock: README.md's first code block has no second (test) command")
    return lines[1]


def without_lock(cmd: str) -> str:
    """The command with every ``-c <file>`` removed: the newest releases pip resolves today."""
    return re.sub(r"\s-c\s+\S+", "", cmd)


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze(python: Path) -> dict[str, str]:
    """name -> version of what the environment holds (local labels such as +cpu dropped; the
    editable clipforge left out)."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                         check=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" not in line or line.startswith(("-e", "#")):
            continue
        name, version = line.split("==", 1)
        if normalise(name) in {"clipforge", "pip", "setuptools", "wheel"}:
            continue
        pins[normalise(name)] = version.split("+", 1)[0]
    return pins


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            rows.append(f"  {name}: {a or '-'} -> {b or '-'}")
    return rows


def run_pytest(python: Path, args: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    """Runs pytest; returns its exit code, the failing test ids and the closing line."""
    proc = subprocess.run([str(python), "-m", "pytest", "-rf", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode:  # the tracebacks, for reading later (the summary below names only the tests)
        log = Path(tempfile.gettempdir()) / "clipforge-lock-pytest.log"
        log.write_text(out, encoding="utf-8")
        print(f"lock: pytest output in {log}", flush=True)
    failed = [ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    closing = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", ln)), "")
    return proc.returncode, failed, closing.strip("= ")


def build(env_name: str, venv: Path) -> Path:
    """A new virtual environment holding the newest releases; returns its python."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if env_name == "interop":
        env.update(CLIPFORGE_INTEROP_VENV=str(venv), CLIPFORGE_NO_LOCK="1")
        subprocess.run(["bash", str(REPO / ".ci" / "interop-venv.sh")], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    install = without_lock(readme_test_command()).split("&& python -m pytest")[0].rstrip(" &")
    print(f"lock: {install}", flush=True)
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    subprocess.run(["bash", "-c", install], cwd=REPO, env=env, check=True)
    return venv / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["check", "refresh"])
    ap.add_argument("--env", choices=["main", "interop"], default="main")
    ap.add_argument("--venv", type=Path, help="where to build the new environment (default: a temporary folder)")
    ap.add_argument("--pytest-args", default="", help="narrow the check's test run (ignored by refresh)")
    a = ap.parse_args(argv)
    lock = LOCKS[a.env]
    with tempfile.TemporaryDirectory(prefix="clipforge-lock-") as tmp:
        venv = a.venv or Path(tmp) / "venv"
        python = build(a.env, venv)
        new = freeze(python)
        changed = diff(read_lock(lock), new)
        print(f"lock: {len(changed)} package(s) differ from {lock.relative_to(REPO)}:")
        print("\n".join(changed) if changed else "  (none)")
        args = shlex.split(a.pytest_args) if a.mode == "check" else []
        if a.env == "interop":
            args = [*(args or ["tests/interop"]), "-rs"]
        env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        if a.env == "interop":
            env["CLIPFORGE_INTEROP_REQUIRED"] = "1"
        code, failed, closing = run_pytest(python, args, env)
        print(f"lock: tests with the newest releases: {closing or f'exit {code}'}")
        for test in failed:
            print(f"  broke: {test}")
        if code != 0:
            print(f"lock: {lock.relative_to(REPO)} left unchanged" if a.mode == "refresh" else "lock: the newest releases break the suite")
            return 1
        if a.mode == "refresh":
            lock.write_text(HEADER[a.env] + "".join(f"{n}=={v}\n" for n, v in sorted(new.items())))
            print(f"lock: wrote {lock.relative_to(REPO)} ({len(new)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
