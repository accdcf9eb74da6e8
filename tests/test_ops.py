"""Each op on its own, with build_op_context and real resources (PostgreSQL, Redis, npm, the file system)."""

import dagster as dg
import psycopg
import pytest

from ops_pipeline.backup.ops import backup_database
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import PostgresResource
from ops_pipeline.platform.redis import RedisResource
from ops_pipeline.platform.spec import ReleaseConfig
from ops_pipeline.release.ops.artifact import build_image
from ops_pipeline.release.ops.migrate import MigrationResult, migrate_database
from ops_pipeline.release.ops.preflight import verify_env
from ops_pipeline.release.ops.tests import run_tests
from ops_pipeline.targets.docker.engine import DockerEngine


def resources(**extra):
    return {"local_stack": LocalStack(), "postgres": PostgresResource(), "redis": RedisResource(), **extra}


def test_verify_env_resolves_embedded_services_and_tags_nothing_secret(local_stack, node_app):
    cfg = ReleaseConfig(environment="unit", version="u1", app={"path": str(node_app)})
    with dg.build_op_context(resources=resources()) as ctx:
        spec = verify_env(ctx, cfg)
    assert spec.version == "u1" and spec.app_dir == str(node_app) and spec.environment == "unit"


def test_verify_env_names_every_missing_variable_at_once(node_app, monkeypatch):
    for name in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "NODE_ENV"):
        monkeypatch.delenv(name, raising=False)
    cfg = ReleaseConfig(environment="unit", embedded_services=False, app={"path": str(node_app)})
    with dg.build_op_context(resources=resources()) as ctx, pytest.raises(dg.Failure) as err:
        verify_env(ctx, cfg)
    text = err.value.description
    for line in ("app.database.url_from: environment variable DATABASE_URL is not set",
                 "app.redis.url_from: environment variable REDIS_URL is not set",
                 "app.required_env: JWT_SECRET is not set in the environment",
                 "app.required_env: NODE_ENV is not set in the environment"):
        assert f"  - {line}\n" in text + "\n", text


def test_verify_env_production_rules(node_app, services, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", services.database_url)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("JWT_SECRET", "changeme")
    monkeypatch.setenv("NODE_ENV", "development")
    cfg = ReleaseConfig(environment="prod", production=True, embedded_services=False, app={"path": str(node_app)})
    with dg.build_op_context(resources=resources()) as ctx, pytest.raises(dg.Failure) as err:
        verify_env(ctx, cfg)
    text = err.value.description
    assert "NODE_ENV is 'development', not 'production' (required in a production environment)" in text
    assert "JWT_SECRET is too short for production (8 characters, at least 32)" in text
    assert "well-known default" in text and "changeme" not in text


def test_verify_env_unreachable_database_and_redis_within_the_timeout(node_app, services, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:pw-not-shown@127.0.0.1:9/app")
    monkeypatch.setenv("REDIS_URL", "redis://:pw-not-shown@127.0.0.1:9/0")
    monkeypatch.setenv("JWT_SECRET", "x" * 40)
    monkeypatch.setenv("NODE_ENV", "production")
    cfg = ReleaseConfig(environment="unit", embedded_services=False, dependency_timeout_s=2, app={"path": str(node_app)})
    with dg.build_op_context(resources=resources()) as ctx, pytest.raises(dg.Failure) as err:
        verify_env(ctx, cfg)
    text = err.value.description
    assert "database check failed" in text and "redis check failed" in text and "pw-not-shown" not in text


@pytest.fixture
def spec(local_stack, node_app):
    cfg = ReleaseConfig(environment="unit", version="u1", app={"path": str(node_app), "commands": {"lint": "", "test": ""}})
    with dg.build_op_context(resources=resources()) as ctx:
        return verify_env(ctx, cfg)


def test_run_tests_runs_the_app_suite_and_counts(node_app, local_stack):
    cfg = ReleaseConfig(environment="unit", version="u1", app={"path": str(node_app), "commands": {"lint": "", "build": ""}})
    with dg.build_op_context(resources=resources()) as ctx:
        spec = verify_env(ctx, cfg)
    with dg.build_op_context() as ctx:
        assert run_tests(ctx, spec) == spec
        md = ctx.get_output_metadata("result")
    assert md["tests_total"] >= 10 and md["tests_failed"] == 0


def test_build_image_bundle_is_content_addressed_and_reused(spec):
    with dg.build_op_context(resources={"docker_engine": DockerEngine()}) as ctx:
        run_tests(dg.build_op_context(), spec)  # builds dist/
        first = build_image(ctx, spec)
        second = build_image(ctx, spec)
    assert first.kind == "bundle" and first.content_hash.startswith("sha256:")
    assert first.id == second.id and second.reused
    assert first.id.startswith("node-api-") and first.id.endswith(first.content_hash[7:19])
    import os
    from pathlib import Path

    entry = Path(first.ref) / "dist" / "server.js"
    assert entry.exists() and not os.access(entry, os.W_OK) or os.geteuid() == 0  # read-only bits set
    assert not (entry.stat().st_mode & 0o222)


def test_backup_and_migrate_ops_on_a_scratch_database(spec, scratch_db, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", scratch_db)
    store = BackupStore(local_dir=str(tmp_path / "store"))
    with dg.build_op_context(resources={**resources(), "backup_store": store}) as ctx:
        manifest = backup_database(ctx, spec)
    assert manifest["verified"] and manifest["trigger"] == "pre-release" and manifest["release_version"] == "u1"
    with dg.build_op_context(resources={"docker_engine": DockerEngine()}) as ctx:
        run_tests(dg.build_op_context(), spec)
        artifact = build_image(ctx, spec)
    with dg.build_op_context(resources={**resources(), "docker_engine": DockerEngine()}) as ctx:
        result = migrate_database(ctx, spec, artifact, manifest)
    assert isinstance(result, MigrationResult) and len(result.applied) >= 2 and result.backup_id == manifest["id"]
    with psycopg.connect(scratch_db) as c:
        assert c.execute("SELECT to_regclass('items')").fetchone()[0] == "items"
    with dg.build_op_context(resources={**resources(), "docker_engine": DockerEngine()}) as ctx:
        again = migrate_database(ctx, spec, artifact, manifest)
    assert again.applied == []


def test_migrate_refuses_without_a_verified_backup(spec):
    from ops_pipeline.targets.base import Artifact

    artifact = Artifact(kind="bundle", id="a", ref="/nonexistent", commit="c", dirty=False, content_hash="sha256:0")
    with dg.build_op_context(resources={**resources(), "docker_engine": DockerEngine()}) as ctx, pytest.raises(dg.Failure) as err:
        migrate_database(ctx, spec, artifact, {"id": "x", "verified": False})
    assert "no verified backup" in err.value.description


def test_rolling_deploy_and_health_gate_ops(node_app, local_stack, instance, environment_name, pm2_cleanup):
    import httpx

    from ops_pipeline.platform import history
    from ops_pipeline.platform.local_stack import free_port
    from ops_pipeline.release.ops.deploy import rolling_deploy
    from ops_pipeline.release.ops.health import health_gate
    from ops_pipeline.targets.resource import DeployTargets

    pm2_cleanup(environment_name)
    port = free_port()
    cfg = ReleaseConfig(environment=environment_name, version="d1", app={"path": str(node_app)},
                        target={"instances": 2, "port": port}, gate={"interval_s": 0.3})
    with dg.build_op_context(resources=resources()) as ctx:
        spec = verify_env(ctx, cfg)
    run_tests(dg.build_op_context(), spec.__class__(**{**spec.__dict__}))
    with dg.build_op_context(resources={"docker_engine": DockerEngine()}) as ctx:
        artifact = build_image(ctx, spec)
    migration = MigrationResult(applied=["m1"], backup_id="b-1")
    targets = DeployTargets.with_defaults()
    with dg.build_op_context(resources={**resources(), "deploy_targets": targets}, instance=instance) as ctx:
        deployment = rolling_deploy(ctx, spec, artifact, migration)
        md = ctx.get_output_metadata("result")
    assert deployment["version"] == "d1" and len(deployment["rollout"]["instances"]) == 2
    assert md["instances_rolled"].value == deployment["rollout"]["instances"]
    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert r.status_code == 200 and r.json()["version"] == "d1"
    with dg.build_op_context(resources={**resources(), "deploy_targets": targets}, instance=instance) as ctx:
        out = health_gate(ctx, spec, deployment)
    assert out["gate"]["probes"] >= 3 and out["gate"]["instances_checked"] == 2
    # the gate's history entry is logged as an event by the op; in a real run it lands in deployments/<env>
    assert history.asset_key(environment_name).path == ["deployments", environment_name]


def test_rollback_advice_names_the_job_that_restores_the_releases_safety_point():
    from ops_pipeline.release.ops.rollback import restore_advice

    dump = restore_advice("local-20261204T101010Z-ab12")
    assert "restore_database job (backup_id: local-20261204T101010Z-ab12)" in dump and "restore_point_in_time" not in dump
    point = restore_advice("restore-point:release-v2-20261204T101010Z")
    assert "restore_point_in_time job (target: name, target_value: release-v2-20261204T101010Z)" in point
    assert "restore_database" not in point
