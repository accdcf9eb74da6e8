"""Unleash, a service no one here wrote, released with its spec file only and rolled back by the health watch.

`examples/third-party/unleash/` is Unleash as its users deploy it (the published unleash-server 7.5.1, pinned by
its lock file). It reads HTTP_PORT and split DATABASE_* variables, answers /health with {"health":"GOOD"} (no
version), migrates with db-migrate and handles its own signals. The test changes only what any user's copy of the
spec would: environment name, port, version. The broken version is the same service with a regression injected
from outside its code (a preloaded module that makes /health answer 503 once a file exists), released with
the spec's `app.env`; the rollback brings back the good version's recorded spec, without that variable.
"""

import shutil
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import LocalStack, free_port
from tests.conftest import _STATE, ROOT
from tests.e2e.test_rollback_daemon import rollbacks, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemon")]

UNLEASH = ROOT / "examples" / "third-party" / "unleash"
REGRESSION = ROOT / "tests" / "fixtures" / "regressions" / "health-503-when-file.cjs"


def unleash_spec(app: Path, env: str, version: str, port: int, extra_env: dict | None = None) -> dict:
    spec = yaml.safe_load((UNLEASH / "release.yaml").read_text())
    cfg = spec["ops"]["verify_env"]["config"]
    cfg.update(environment=env, version=version)
    cfg["app"]["path"] = str(app)
    cfg["app"]["env"].update(extra_env or {})
    cfg["target"]["port"] = port
    return spec


def health(port: int) -> tuple[int, str]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=3, headers={"Connection": "close"})
        return r.status_code, r.text
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__


def test_unleash_released_by_spec_then_rolled_back_by_the_health_watch(dagster_stack, environment_name, pm2_cleanup,
                                                                        tmp_path):
    env = environment_name
    pm2_cleanup(env)
    app = _STATE / "apps" / f"unleash-{tmp_path.name}"
    shutil.copytree(UNLEASH, app)  # the release installs into the app folder: not into the checkout
    port = free_port()
    timings = {}

    t0 = time.monotonic()
    run = dagster_stack.wait_run(dagster_stack.submit("release", unleash_spec(app, env, "7.5.1-a", port),
                                                      tags={"ops/environment": env}), timeout_s=900)
    timings["release v1"] = time.monotonic() - t0
    assert run.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert health(port) == (200, '{"health":"GOOD"}')

    # Its own migration tool's table, read right, on the database and role the spec named.
    with dagster_stack.instance() as inst:
        released = history.load(inst, env).events[0]
    applied = released.get("migrations") or []
    unleash_db = LocalStack().services(database="unleash", role="unleash").database_url
    with psycopg.connect(unleash_db) as c:
        in_table = c.execute("SELECT count(*) FROM migrations").fetchone()[0]
        assert c.execute("SELECT current_user").fetchone()[0] == "unleash"
    assert in_table >= 370 and len(applied) == in_table, (len(applied), in_table)

    # v2: the same artifact with a regression preloaded from outside; it passes its gate.
    broken = tmp_path / "v2-breaks"
    t0 = time.monotonic()
    run = dagster_stack.wait_run(dagster_stack.submit("release", unleash_spec(app, env, "7.5.1-b", port, {
        "NODE_OPTIONS": f"--require {REGRESSION}", "REGRESSION_FILE": str(broken)}), tags={"ops/environment": env}),
        timeout_s=600)
    timings["release v2"] = time.monotonic() - t0
    assert run.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert health(port)[0] == 200

    broken.touch()
    t0 = time.monotonic()
    rb = wait_for(lambda: [r for r in rollbacks(dagster_stack, env) if r.is_finished], 240, "the rollback run to finish")
    timings["first failing probe -> rollback finished"] = time.monotonic() - t0
    assert len(rb) == 1 and rb[0].status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert rb[0].tags["dagster/sensor_name"] == "health_watch"
    assert wait_for(lambda: all(health(port) == (200, '{"health":"GOOD"}') for _ in range(6)), 30, "7.5.1-a serving")
    with dagster_stack.instance() as inst:
        hist = history.load(inst, env)
    assert hist.serving_version == "7.5.1-a" and "7.5.1-b" in hist.bad_versions
    print(", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
