"""Warm standby fixtures: an environment released through the real release job (PM2 + nginx), its target, and what
PM2, nginx and the ports say, read from the outside."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.spec import ReleaseSpec
from ops_pipeline.targets.resource import DeployTargets
from tests.conftest import ROOT, make_defs, release_run_config


class StandbyEnv:
    def __init__(self, name: str, state_dir: Path, instance, store: BackupStore) -> None:
        self.name, self.state_dir, self.instance = name, state_dir, instance
        self.port = free_port()
        self.defs = make_defs(backup_store=store)

    def release(self, app: Path, version: str, standby_s: float, **kw):
        cfg = release_run_config(app, self.name, version=version, port=self.port, fast=True,
                                 target={"standby_s": standby_s, "pm2": {"listen_timeout_s": 60}}, **kw)
        result = self.defs.get_job_def("release").execute_in_process(run_config=cfg, instance=self.instance,
                                                                      raise_on_error=False)
        assert result.success, [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        return result

    def rollback(self, run_config: dict | None = None, tags: dict | None = None):
        return self.defs.get_job_def("rollback").execute_in_process(
            run_config=run_config or {"ops": {"plan_rollback": {"config": {"environment": self.name}}}},
            instance=self.instance, tags=tags, raise_on_error=False)

    def target(self):
        """The environment's PM2 target, from the newest release record (as the rollback and the sensors build it)."""
        hist = history.load(self.instance, self.name)
        spec = next(history.spec_json(e) for e in hist.events if history.spec_json(e))
        return DeployTargets.with_defaults().for_spec(ReleaseSpec.from_json(spec))

    def pm2(self) -> dict[str, dict]:
        """{name: process} of every process in the environment's PM2, straight from `pm2 jlist`."""
        home = self.state_dir / "envs" / self.name / "pm2"
        out = subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "jlist"], capture_output=True, text=True,
                             env={**os.environ, "PM2_HOME": str(home)}, timeout=60, check=False).stdout
        procs = json.loads(out[out.find("["):]) if "[" in out else []
        return {p["name"]: p for p in procs}

    def upstream_ports(self) -> set[int]:
        """The ports nginx routes to, read from its generated config."""
        conf = (self.state_dir / "envs" / self.name / "nginx" / "nginx.conf").read_text()
        upstream = conf[conf.index("upstream app_servers"):conf.index("keepalive 32")]
        return {int(p) for p in re.findall(r"server 127\.0\.0\.1:(\d+)", upstream)}

    def public_versions(self, n: int = 10) -> set[str]:
        seen = set()
        for _ in range(n):
            r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5, headers={"Connection": "close"})
            seen.add(f"{r.json().get('version')}:{r.status_code}")
        return seen


def own_health(port: int) -> tuple[int, str]:
    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, headers={"Connection": "close"})
    return r.status_code, r.json().get("version")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_messages(instance, run_id: str) -> list[str]:
    return [r.user_message or "" for r in instance.all_logs(run_id)]


def step_metadata(result, step: str) -> dict:
    for e in result.all_events:
        if e.event_type_value == "STEP_OUTPUT" and e.step_key == step:
            return {k: v.value for k, v in e.event_specific_data.metadata.items()}
    return {}


@pytest.fixture
def standby_env(environment_name, pm2_cleanup, tmp_path, instance, local_stack, state_dir) -> StandbyEnv:
    pm2_cleanup(environment_name)
    return StandbyEnv(environment_name, state_dir, instance, BackupStore(local_dir=str(tmp_path / "backups")))
