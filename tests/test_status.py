"""`make status` / `make down` (python -m ops_pipeline.release.status): every environment of the state folder, real files in a
temporary state folder, a real HTTP health endpoint, a real Dagster instance holding the release history, real
processes stopped by `--down`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.release import status
from tests.conftest import ROOT

PM2 = ROOT / "tools" / "node_modules" / ".bin" / "pm2"


def status_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops_pipeline.release.status", *args], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("OPS_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state" / "envs").mkdir(parents=True)
    return tmp_path / "state"


@pytest.fixture
def health_server():
    """A /health endpoint answering JSON with the version given."""
    answers = {"version": "v2"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"status": "ok", **answers}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def spec(port: int) -> dict:
    return {"config": {"target": {"kind": "pm2", "instances": 2, "host": "127.0.0.1", "port": port},
                       "app": {"health_path": "/health"}}}


def record(instance, environment, event, version, **fields):
    instance.report_runless_asset_event(history.materialization(environment, event, version, **fields))


def test_status_reports_every_environment_of_the_state_folder(state, health_server):
    (state / "envs" / "local").mkdir()
    (state / "envs" / "staging").mkdir()
    (state / "envs" / "fresh").mkdir()  # a folder, nothing released yet
    with dg.instance_for_test() as instance:
        record(instance, "local", history.RELEASED, "v1", spec=spec(health_server))
        record(instance, "local", history.RELEASED, "v2", spec=spec(health_server))
        record(instance, "staging", history.RELEASED, "s1", spec=spec(health_server))
        record(instance, "staging", history.RELEASE_FAILED, "s2", reason="health gate: 0 of 3 healthy answers")
        record(instance, "history-only", history.RELEASED, "h1", spec=spec(health_server))  # no folder here

        assert status.environments() == ["fresh", "local", "staging"]
        assert status.environments(instance) == ["fresh", "history-only", "local", "staging"]

        code, text = status.report_all(instance)
        blocks = {block.splitlines()[0]: block for block in text.split("\n\n")}
        assert set(blocks) == {"environment 'fresh': nothing released yet", "environment: history-only",
                               "environment: local", "environment: staging"}
        assert code == 1  # staging's last release failed, fresh has nothing
        local = blocks["environment: local"]
        assert "serving:     v2 (pm2 x2)" in local and f"url:         http://127.0.0.1:{health_server}" in local
        assert "health:      HTTP 200 version=v2" in local
        assert local.index("released         v2") < local.index("released         v1")  # newest first
        staging = blocks["environment: staging"]
        assert "last event:  release_failed of s2 - health gate: 0 of 3 healthy answers" in staging
        assert "serving:     s1" in staging

        # one environment by name: only that one, and its own exit status
        code, text = status.report_all(instance, ["local"])
        assert code == 0 and text.startswith("environment: local") and "staging" not in text


def test_status_with_no_environment_says_where_it_looked(state):
    with dg.instance_for_test() as instance:
        code, text = status.report_all(instance)
    assert code == 1 and str(state / "envs") in text


def test_status_cli_all_and_one(state, health_server, tmp_path, monkeypatch):
    """`python -m ops_pipeline.release.status` with no name shows all; with a name, one (the Makefile's ENVIRONMENT)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    (state / "envs" / "a").mkdir()
    (state / "envs" / "b").mkdir()
    with dg.DagsterInstance.get() as instance:
        record(instance, "a", history.RELEASED, "a1", spec=spec(health_server))
        record(instance, "b", history.RELEASED, "b1", spec=spec(free_port()))  # nothing listens: unhealthy
    everything = status_cli()
    assert everything.returncode == 1, everything.stderr
    assert "environment: a" in everything.stdout and "environment: b" in everything.stdout
    one = status_cli("a")
    assert one.returncode == 0 and "environment: a" in one.stdout and "environment: b" not in one.stdout
    assert "Warning" not in one.stderr


@pytest.mark.skipif(not shutil.which("nginx"), reason="needs nginx")
def test_down_stops_each_environments_nginx_front_proxy(state):
    """`--down` sends SIGQUIT to the nginx master named in <env>/nginx/nginx.pid (a graceful stop), for every
    environment; a pid file naming a process that is not nginx is left alone."""
    procs = {}
    for env in ("one", "two"):
        conf_dir = state / "envs" / env / "nginx"
        conf_dir.mkdir(parents=True)
        port = free_port()
        (conf_dir / "nginx.conf").write_text(
            f"daemon off; pid {conf_dir}/nginx.pid; error_log {conf_dir}/error.log; worker_processes 1;\n"
            f"events {{}}\nhttp {{ access_log off; client_body_temp_path {conf_dir}/tmp;"
            f" server {{ listen 127.0.0.1:{port}; return 200 'ok'; }} }}\n")
        procs[env] = subprocess.Popen(["nginx", "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bystander = subprocess.Popen(["sleep", "60"])
    (state / "envs" / "stale" / "nginx").mkdir(parents=True)
    (state / "envs" / "stale" / "nginx" / "nginx.pid").write_text(f"{bystander.pid}\n")
    try:
        for env, proc in procs.items():
            deadline = time.monotonic() + 20
            while not (state / "envs" / env / "nginx" / "nginx.pid").exists():
                assert proc.poll() is None and time.monotonic() < deadline, f"nginx of {env} did not start"
                time.sleep(0.1)
        out = status_cli("--down")
        assert out.returncode == 0, out.stderr
        for env, proc in procs.items():
            assert proc.wait(20) == 0  # SIGQUIT: a graceful shutdown exits 0
            assert f"{env}: stopped nginx (pid {proc.pid})" in out.stdout
        assert "stale: nothing running" in out.stdout and bystander.poll() is None
    finally:
        for proc in (*procs.values(), bystander):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


@pytest.mark.skipif(not PM2.exists(), reason="needs tools/node_modules (make setup)")
def test_down_stops_every_environments_pm2_daemon(state):
    pids = {}
    for env in ("red", "blue"):
        home = state / "envs" / env / "pm2"
        home.mkdir(parents=True)
        subprocess.run([str(PM2), "ping"], env={**os.environ, "PM2_HOME": str(home)}, capture_output=True, check=True,
                       timeout=60)
        pids[env] = int((home / "pm2.pid").read_text())
    (state / "envs" / "idle").mkdir()
    try:
        out = status_cli("--down")
        assert out.returncode == 0, out.stderr
        for env, pid in pids.items():
            assert f"{env}: stopped PM2 daemon" in out.stdout
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not os.path.exists(f"/proc/{pid}"), f"PM2 daemon of {env} still runs"
        assert "idle: nothing running" in out.stdout
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
