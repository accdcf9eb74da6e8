"""Fault-injection suite fixtures: a private embedded stack (so stopping it harms no other test), a backup store
holding verified backups that must survive every fault, and the summary table printed at the end."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.local_stack import LocalStack, free_port
from ops_pipeline.platform.postgres import PostgresResource
from tests.conftest import ROOT, make_defs, release_run_config


@pytest.fixture
def report():
    """Adds a row to the suite's summary table (printed by the root conftest, also under pytest-xdist)."""

    def add(fault: str, result: str, outcome: str, serving: str, data_lost: str = "none") -> None:
        row = {"fault": fault, "result": result, "outcome": " ".join(outcome.split())[:200], "serving": serving,
               "data_lost": data_lost}
        with open(os.environ["OPS_FAULT_REPORT"], "a") as f:
            f.write(json.dumps(row) + "\n")

    return add


@pytest.fixture(scope="session")
def fault_stack(state_dir):
    root = state_dir / "fault-stack"
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    stack = LocalStack(state_dir=str(root))
    stack.ensure_running()
    yield stack
    stack.stop()


@pytest.fixture
def fault_env(fault_stack, monkeypatch):
    """The app's variables point at the private stack (restarted if a previous fault left it down)."""
    fault_stack.ensure_running()
    for k, v in fault_stack.services().app_env().items():
        monkeypatch.setenv(k, v)
    return fault_stack


@pytest.fixture(scope="session")
def fault_store(state_dir) -> BackupStore:
    return BackupStore(local_dir=str(state_dir / "fault-backups"))


@pytest.fixture
def verified_backups(fault_env, fault_store):
    """Every verified backup in the fault store before the fault; `check()` proves each one still verifies afterwards."""
    from ops_pipeline import backup as backups

    url = fault_env.services().database_url
    if not fault_store.manifests("faults/app"):
        backups.take_backup(PostgresResource(), fault_store, url, trigger="manual", environment="faults", log=lambda m: None)

    def snapshot() -> dict[str, dict]:
        out = {}
        for o in fault_store.list():
            if o.key.endswith("/manifest.json"):
                m = json.loads(b"".join(fault_store.read(o.key.split("/", 1)[1])))
                out[m["id"]] = m
        return out

    before = snapshot()

    def check() -> str:
        after = snapshot()
        lost = [bid for bid in before if bid not in after]
        for bid, m in before.items():
            if bid in after:
                backups.verify_stored(fault_store, PostgresResource(), m["scope"], bid, m["sha256"])
        return "none" if not lost else f"LOST {len(lost)} backup(s)"

    check.before = before
    return check


class Releaser:
    def __init__(self, env: str, port: int, store: BackupStore, instance) -> None:
        self.env, self.port, self.store, self.instance = env, port, store, instance
        self.defs = make_defs(backup_store=store)

    def config(self, app: Path, version: str, **kw) -> dict:
        kw.setdefault("fast", True)
        cfg = release_run_config(app, self.env, version=version, port=self.port, **kw)
        # Backups of the fault environments go to the shared fault store under one scope.
        return cfg

    def release(self, app: Path, version: str, **kw):
        return self.defs.get_job_def("release").execute_in_process(run_config=self.config(app, version, **kw),
                                                                     instance=self.instance, raise_on_error=False)

    def release_in_thread(self, app: Path, version: str, **kw):
        box: dict = {}

        def run():
            box["result"] = self.release(app, version, **kw)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, box

    def rollback(self):
        return self.defs.get_job_def("rollback").execute_in_process(
            run_config={"ops": {"plan_rollback": {"config": {"environment": self.env}}}}, instance=self.instance,
            raise_on_error=False)

    def served(self, n: int = 10) -> set[str]:
        seen = set()
        for _ in range(n):
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=3, headers={"Connection": "close"})
                seen.add(f"{r.json().get('version')}:{r.status_code}")
            except httpx.HTTPError as exc:
                seen.add(type(exc).__name__)
        return seen

    def pm2_processes(self) -> list[dict]:
        home = Path(os.environ["OPS_STATE_DIR"]) / "envs" / self.env / "pm2"
        out = subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "jlist"], capture_output=True, text=True,
                             env={**os.environ, "PM2_HOME": str(home)}).stdout
        start = out.find("[")
        return json.loads(out[start:]) if start >= 0 else []

    def wait_pm2(self, predicate, timeout_s: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            procs = self.pm2_processes()
            if predicate(procs):
                return procs
            time.sleep(0.1)
        raise AssertionError("PM2 never reached the expected state")


@pytest.fixture
def releaser(fault_env, fault_store, instance, environment_name, pm2_cleanup):
    pm2_cleanup(environment_name)
    return Releaser(environment_name, free_port(), fault_store, instance)


def failure(result) -> tuple[str, str]:
    ev = result.get_step_failure_events()
    if not ev:
        return "", ""
    message = ev[0].step_failure_data.error.message
    return ev[0].step_key, message.removeprefix("dagster._core.definitions.events.Failure: ")
