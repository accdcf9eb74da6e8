"""The release job end to end on the local stack: real PostgreSQL, Redis, npm, PM2 and the example app."""

import json
from pathlib import Path

import dagster as dg
import httpx
import psycopg
import pytest

from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.postgres import PostgresResource
from tests import app_variants
from tests.conftest import make_defs, release_run_config

PG = PostgresResource()


def serving(port: int, n: int = 20) -> set[str]:
    versions = set()
    for _ in range(n):
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, headers={"Connection": "close"})
        assert r.status_code == 200, r.text
        versions.add(r.json()["version"])
    return versions


def pm2_versions(env: str, state_dir: Path) -> list[str]:
    import os
    import subprocess

    from ops_pipeline.platform.paths import project_root

    out = subprocess.run([str(project_root() / "tools/node_modules/.bin/pm2"), "jlist"], capture_output=True, text=True,
                         env={**os.environ, "PM2_HOME": str(state_dir / "envs" / env / "pm2")}).stdout
    procs = json.loads(out[out.find("["):])
    return sorted(p["pm2_env"]["APP_VERSION"] for p in procs if p["pm2_env"]["status"] == "online")


@pytest.fixture
def release_env(environment_name, pm2_cleanup, tmp_path, instance):
    pm2_cleanup(environment_name)
    store = BackupStore(local_dir=str(tmp_path / "backups"))
    defs = make_defs(backup_store=store)
    return environment_name, defs.get_job_def("release"), store, instance


def failure_of(result) -> tuple[str, str]:
    ev = result.get_step_failure_events()[0]
    return ev.step_key, ev.step_failure_data.error.message


def test_release_end_to_end_then_second_version_over_the_first(node_app, release_env, services, state_dir):
    env, job, store, instance = release_env
    port = free_port()
    r1 = job.execute_in_process(run_config=release_run_config(node_app, env, version="v1", port=port), instance=instance)
    assert r1.success
    assert serving(port) == {"v1"} and pm2_versions(env, state_dir) == ["v1", "v1"]
    # migrations applied, verified backup in the store, the release in the history
    with psycopg.connect(services.database_url) as c:
        applied = [r[0] for r in c.execute("SELECT name FROM pgmigrations ORDER BY id")]
    assert len(applied) >= 2
    manifests = store.manifests(f"{env}/app")
    assert len(manifests) == 1 and manifests[0]["verified"] and manifests[0]["trigger"] == "pre-release"
    assert manifests[0]["release_version"] == "v1"
    tests_md = r1.get_step_success_events()[1].step_success_data  # run_tests
    mats = r1.asset_materializations_for_node("health_gate")
    assert mats and mats[0].asset_key == dg.AssetKey(["deployments", env])
    run_md = {e.step_key: e for e in r1.all_events if e.event_type_value == "STEP_OUTPUT"}
    assert run_md["run_tests"].event_specific_data.metadata["tests_failed"].value == 0
    assert run_md["run_tests"].event_specific_data.metadata["tests_total"].value >= 10
    assert run_md["build_image"].event_specific_data.metadata["content_hash"].value.startswith("sha256:")
    gate_md = run_md["health_gate"].event_specific_data.metadata
    assert gate_md["probes"].value >= 3 and gate_md["p95_ms"].value > 0
    assert instance.get_run_by_id(r1.run_id).tags["ops/version"] == "v1"
    assert tests_md is not None

    r2 = job.execute_in_process(run_config=release_run_config(node_app, env, version="v2", port=port, fast=True),
                                instance=instance)
    assert r2.success
    assert serving(port) == {"v2"} and pm2_versions(env, state_dir) == ["v2", "v2"]
    hist = history.load(instance, env)
    assert [e.version for e in hist.events] == ["v2", "v1"] and hist.serving_version == "v2"
    assert hist.release_of("v2").get("previous_version") == "v1"
    order = [s.split()[0] for s in run_md_order(r2)]
    assert order.count("healthy") == 2 and order.count("removed") == 2 and order[:2] == ["started", "healthy"]
    for i in range(len(order)):  # an old instance leaves only after a new one is healthy: never fewer than 2 serving
        assert order[: i + 1].count("removed") <= order[: i + 1].count("healthy")


def run_md_order(result) -> list[str]:
    for e in result.all_events:
        if e.event_type_value == "STEP_OUTPUT" and e.step_key == "rolling_deploy":
            return e.event_specific_data.metadata["order"].value
    return []


def test_failing_app_test_stops_before_the_backup(app_variant, release_env):
    env, job, store, instance = release_env

    app = app_variant("failing-test", app_variants.failing_test("checkout total includes tax"))
    r = job.execute_in_process(run_config=release_run_config(app, env, version="v1"), instance=instance, raise_on_error=False)
    assert not r.success
    step, message = failure_of(r)
    assert step == "run_tests"
    assert "checkout total includes tax" in message and "1 of" in message
    assert store.manifests(f"{env}/app") == []
    assert not history.load(instance, env).events


def test_failing_migration_stops_before_deploy_db_unchanged_backup_named(app_variant, release_env, services):
    env, job, store, instance = release_env

    app = app_variant("bad-migration", app_variants.migration_failing_half_way)
    with psycopg.connect(services.database_url) as c:
        before = [r[0] for r in c.execute("SELECT name FROM pgmigrations ORDER BY id")] \
            if c.execute("SELECT to_regclass('pgmigrations')").fetchone()[0] else []
    port = free_port()
    r = job.execute_in_process(run_config=release_run_config(app, env, version="v1", port=port, fast=True),
                               instance=instance, raise_on_error=False)
    assert not r.success
    step, message = failure_of(r)
    assert step == "migrate_database"
    backup_id = store.manifests(f"{env}/app")[0]["id"]
    assert backup_id in message and "nothing was deployed" in message and "unchanged" in message
    with psycopg.connect(services.database_url) as c:
        assert c.execute("SELECT to_regclass('audit_log')").fetchone()[0] is None  # the transaction rolled back
        after = [r[0] for r in c.execute("SELECT name FROM pgmigrations ORDER BY id")]
    assert after == before or set(after) - set(before) <= {"1700000000000_create-items", "1700000000001_items-description-and-index"}
    assert "1800000000000_half-way" not in after
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert [s.step_key for s in r.get_step_success_events()][-1] == "backup_database"


def test_unhealthy_new_version_fails_while_old_keeps_serving(node_app, app_variant, release_env, state_dir):
    env, job, store, instance = release_env
    port = free_port()
    assert job.execute_in_process(run_config=release_run_config(node_app, env, version="v1", port=port, fast=True),
                                  instance=instance).success

    bad = app_variant("bad-health", app_variants.health_always_503)
    r = job.execute_in_process(
        run_config=release_run_config(bad, env, version="v2", port=port, fast=True, target={"pm2": {"listen_timeout_s": 6}}),
        instance=instance, raise_on_error=False)
    assert not r.success
    step, message = failure_of(r)
    assert step == "rolling_deploy"
    assert "never became healthy" in message and "HTTP 503" in message and "still serving v1" in message
    assert serving(port) == {"v1"} and pm2_versions(env, state_dir) == ["v1", "v1"]
    hist = history.load(instance, env)
    assert hist.events[0].event == history.RELEASE_FAILED and hist.events[0].version == "v2"
    assert "v2" in hist.bad_versions and hist.serving_version == "v1"


def test_public_port_taken_by_another_process_fails_before_starting_anything(node_app, release_env):
    import socket

    env, job, store, instance = release_env
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        r = job.execute_in_process(run_config=release_run_config(node_app, env, version="v1", port=port, fast=True),
                                   instance=instance, raise_on_error=False)
    finally:
        squatter.close()
    step, message = failure_of(r)
    assert step == "rolling_deploy" and f"target.port: 127.0.0.1:{port} is already in use" in message
