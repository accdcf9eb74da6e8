"""A real dagster-webserver and dagster-daemon against a test instance (DAGSTER_HOME), for end-to-end tests.

Both are started in their own session (process group) and the whole group is killed on stop: `dagster dev`
and friends ignore SIGTERM when started in the background, and their children must not outlive the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx

from ops_pipeline.platform.local_stack import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class DagsterServers:
    def __init__(self, home: Path, *, env: dict[str, str] | None = None, webserver: bool = True, daemon: bool = True) -> None:
        self.home = home
        self.port = free_port()
        self.want_webserver = webserver
        self.want_daemon = daemon
        self.procs: dict[str, subprocess.Popen] = {}
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists():
            shutil.copy(ROOT / "config" / "dagster.yaml", home / "dagster.yaml")
        self.env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_DISABLE_TELEMETRY": "1",
                    "OPS_PROJECT_ROOT": str(ROOT), **(env or {})}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.home / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout_s: float = 120) -> DagsterServers:
        # Create the instance's storage once, before two processes race to migrate it.
        with self.instance() as inst:
            inst.get_runs(limit=1)
        if self.want_daemon:
            self._spawn("daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"])
        if self.want_webserver:
            self._spawn("webserver", [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                                      "-p", str(self.port)])
        deadline = time.monotonic() + timeout_s
        while self.want_webserver:
            self._check_alive()
            try:
                if httpx.get(self.url + "/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dagster-webserver did not answer:\n{self.log_tail('webserver')}")
            time.sleep(0.5)
        while self.want_daemon and not self.daemon_ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"dagster-daemon did not become healthy:\n{self.log_tail('daemon')}")
            time.sleep(0.5)
        return self

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")

    def daemon_ready(self) -> bool:
        with self.instance() as inst:
            beats = inst.get_daemon_heartbeats()
        return {"SENSOR", "QUEUED_RUN_COORDINATOR"} <= set(beats)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def log_tail(self, name: str, n: int = 60) -> str:
        p = self.home / f"{name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def stop(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    # ---- runs -----------------------------------------------------------------------------------
    def submit(self, job: str, run_config: dict, tags: dict | None = None) -> str:
        from dagster_graphql import DagsterGraphQLClient

        client = DagsterGraphQLClient("127.0.0.1", port_number=self.port)
        return client.submit_job_execution(job, repository_location_name="ops_pipeline", repository_name="__repository__",
                                           run_config=run_config, tags=tags or {})

    def launch_cli(self, job: str, config_file: Path, tags: dict | None = None) -> subprocess.CompletedProcess:
        import json

        argv = [str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", job, "-c", str(config_file)]
        if tags:
            argv += ["--tags", json.dumps(tags)]
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)

    def execute_cli(self, job: str, config_file: Path, tags: dict | None = None) -> subprocess.CompletedProcess:
        """`dagster job execute`: the run executes in this CLI process (no queue, no run launcher), on the same
        instance as the daemon."""
        import json

        argv = [str(BIN / "dagster"), "job", "execute", "-m", "ops_pipeline.definitions", "-j", job, "-c", str(config_file)]
        if tags:
            argv += ["--tags", json.dumps(tags)]
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300)

    def wait_run(self, run_id: str, timeout_s: float = 300) -> dg.DagsterRun:
        deadline = time.monotonic() + timeout_s
        with self.instance() as inst:
            while time.monotonic() < deadline:
                run = inst.get_run_by_id(run_id)
                if run and run.is_finished:
                    return run
                time.sleep(0.5)
        raise TimeoutError(f"run {run_id} did not finish in {timeout_s} s")

    def runs(self, job: str | None = None, tags: dict | None = None) -> list[dg.DagsterRun]:
        with self.instance() as inst:
            return list(inst.get_runs(filters=dg.RunsFilter(job_name=job, tags=tags or {})))
