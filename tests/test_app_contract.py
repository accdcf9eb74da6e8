"""The app contract: a port and a health path, nothing else.

`tests/fixtures/plain-http-app` reads only PORT, answers /health in plain text with no version, has no signal
handler (SIGINT kills it mid-request) and no second listener; its database is given to it in split variables.
Under constant load on the public port (loopback), a good release, a release whose health fails from its first
second, and a rollback must each fail no request.
"""

import json
import shutil
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from tests.conftest import _STATE, ROOT, release_run_config

sys.path.insert(0, str(ROOT / "bench"))
from loadgen import Load  # noqa: E402

PLAIN_APP = Path(__file__).parent / "fixtures" / "plain-http-app"


@pytest.fixture
def release_env(environment_name, pm2_cleanup, tmp_path, instance):
    from ops_pipeline.backup.store import BackupStore
    from tests.conftest import make_defs

    pm2_cleanup(environment_name)
    store = BackupStore(local_dir=str(tmp_path / "backups"))
    defs = make_defs(backup_store=store)
    return environment_name, defs, store, instance


@pytest.fixture
def plain_app(tmp_path) -> Path:
    dst = _STATE / "apps" / f"plain-{tmp_path.name}"
    shutil.copytree(PLAIN_APP, dst)
    return dst


def plain_config(app_dir: Path, env: str, version: str, port: int, **overrides) -> dict:
    spec = {
        "app": {
            "name": "plain",
            "start": "node server.js",
            "health_version": "off",
            "required_env": [],
            "secret_env": [],
            "jwt_secret_env": "",
            "node_env_var": "",
            "migrations_table": "",
            "bundle_paths": ["server.js", "package.json", "package-lock.json"],
            "commands": {"lint": "", "build": "", "test": "npm test", "migrate": "true"},
            "database": {"embedded_database": "plain_db", "embedded_role": "plain_role",
                         "app_vars": {"url": "", "host": "PGHOST", "port": "PGPORT", "database": "PGDATABASE",
                                      "user": "PGUSER", "password": "PGPASSWORD"}},
            "redis": {"enabled": False},
        },
        "target": {"pm2": {"listen_timeout_s": 6, "drain_s": 10}},
    }
    from tests.conftest import _merge

    _merge(spec, overrides)
    return release_run_config(app_dir, env, version=version, port=port, **spec)


def test_plain_app_released_broken_version_refused_rollback_all_under_load(plain_app, release_env, state_dir):
    env, defs, store, instance = release_env
    job = defs.get_job_def("release")
    port = free_port()
    r = job.execute_in_process(run_config=plain_config(plain_app, env, "v1", port), instance=instance)
    assert r.success
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).text == "ok\n"

    # The app got its database in its own variables, on the database and role named in the spec.
    pm2_env = _pm2_env(env, state_dir)
    assert pm2_env["PGDATABASE"] == "plain_db" and pm2_env["PGUSER"] == "plain_role"
    assert "DATABASE_URL" not in pm2_env and "INSTANCE_PORT" not in pm2_env
    with psycopg.connect(host=pm2_env["PGHOST"], port=pm2_env["PGPORT"], dbname=pm2_env["PGDATABASE"],
                         user=pm2_env["PGUSER"], password=_secret(pm2_env, "PGPASSWORD")) as c:
        assert c.execute("SELECT current_database(), current_user").fetchone() == ("plain_db", "plain_role")

    # v2, good, under load: slow requests are in flight whenever an instance leaves.
    with Load(port, path="/work?ms=150", rate=60, workers=12) as good:
        assert job.execute_in_process(run_config=plain_config(plain_app, env, "v2", port), instance=instance).success
    assert good.result.requests > 100 and good.result.failed == 0, good.result

    # v3 answers 503 on /health from its first second: it never receives a public request.
    with Load(port, path="/health", rate=60, workers=12) as broken:
        r3 = job.execute_in_process(run_config=plain_config(plain_app, env, "v3", port,
                                                            app={"env": {"PLAIN_HEALTH_STATUS": "503"}}),
                                    instance=instance, raise_on_error=False)
    assert not r3.success
    assert broken.result.requests > 100 and broken.result.non_2xx == 0 and broken.result.failed == 0, broken.result
    assert "never became healthy" in _failure(r3) and "never received public traffic" in _failure(r3)

    # Rollback to v1 under load: the recorded spec (database names, variables) comes back with it.
    rollback_job = defs.get_job_def("rollback")
    with Load(port, path="/work?ms=150", rate=60, workers=12) as back:
        rb = rollback_job.execute_in_process(
            run_config={"ops": {"plan_rollback": {"config": {"environment": env, "target_version": "v1"}}}},
            instance=instance)
    assert rb.success
    for phase, load in (("good release", good), ("broken release", broken), ("rollback", back)):
        res = load.result
        print(f"{phase}: {res.requests} requests, {res.ok} 2xx, {res.non_2xx} non-2xx, {res.errors} errors, "
              f"{res.stale_keepalive} stale keep-alive closes")
    assert back.result.requests > 100 and back.result.failed == 0, back.result
    assert history.load(instance, env).serving_version == "v1"
    assert _pm2_env(env, state_dir)["PGDATABASE"] == "plain_db"


def _failure(result) -> str:
    return next(e.step_failure_data.error.message for e in result.all_events if e.is_step_failure)


def _pm2_env(env: str, state_dir: Path) -> dict:
    import os
    import subprocess

    pm2 = ROOT / "tools" / "node_modules" / ".bin" / "pm2"
    out = subprocess.run([str(pm2), "jlist"], env={**os.environ, "PM2_HOME": str(state_dir / "envs" / env / "pm2")},
                         capture_output=True, text=True, timeout=60).stdout
    procs = json.loads(out[out.find("["):])
    assert procs, "no PM2 process"
    return procs[0]["pm2_env"]


def _secret(pm2_env: dict, name: str) -> str:
    return pm2_env[name]
