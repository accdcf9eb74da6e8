"""Fixtures for the docker-compose stack tests (tests/compose/test_compose_stack.py).

The static checks need nothing but the repository (and Debian's `docker-compose` for `config -q`). The bring-up
test needs the Docker-compatible engine of scripts/containers/ (rootful Podman serving the Docker API on a unix
socket); `podman_engine` starts it with the idempotent setup-engine.sh, and stops it at the end of the session only
if this session started it. The only reason to skip is an engine that cannot start.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.containers.conftest import _containers_state_dir, _engine_answers

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "containers"


def run_script(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def tail(proc: subprocess.CompletedProcess, n: int = 25) -> str:
    return "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-n:])


@pytest.fixture(scope="session")
def podman_engine():
    """DOCKER_HOST of the Podman engine (scripts/containers/setup-engine.sh), for the whole session."""
    if os.geteuid() != 0:
        pytest.skip("container engine cannot start: rootful Podman (scripts/containers/setup-engine.sh) needs root")
    state = _containers_state_dir()
    was_up = _engine_answers(state / "podman.sock")
    t0 = time.monotonic()
    try:
        setup = run_script("setup-engine.sh", timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"container engine cannot start: scripts/containers/setup-engine.sh: {exc}")
    m = re.search(r"^export DOCKER_HOST=(\S+)$", setup.stdout, re.MULTILINE)
    if setup.returncode != 0 or not m:
        pytest.skip(f"container engine cannot start (scripts/containers/setup-engine.sh exited {setup.returncode}):\n"
                    f"{tail(setup)}")
    docker_host = m.group(1)
    socket_path = docker_host.removeprefix("unix://")
    yield {"docker_host": docker_host, "socket": socket_path, "was_up": was_up,
           "setup_s": round(time.monotonic() - t0, 1)}
    if not was_up:
        run_script("stop-engine.sh", timeout=120)
