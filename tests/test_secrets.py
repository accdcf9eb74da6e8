"""Secrets never reach run logs, compute logs, metadata, run config or error messages.

A release and a failing release run with known secret values (the failing one has a migration that prints
DATABASE_URL and JWT_SECRET); then every file of the Dagster instance (run storage, event logs, compute logs)
is searched for them: zero hits.
"""

from pathlib import Path

import pytest

from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.local_stack import free_port
from tests.conftest import make_defs, release_run_config

JWT = "jwt-CANARY-7f3a9c2e4b1d8a6f0c5e9b2d4a7f1c3e"
AWS_KEY_ID = "AKIACANARY7F3A9C2E4B"
AWS_SECRET = "aws-CANARY-secret-9b2d4a7f1c3e7f3a9c2e4b1d8a6f0c5e"
SLACK = "xoxb-CANARY-1234567890-abcdefghij"
K8S_TOKEN = "k8s-CANARY-token-0c5e9b2d4a7f1c3e7f3a"


def leaky_migration(app: Path) -> None:
    (app / "migrations" / "1800000000002_leaky.js").write_text(
        "exports.up = () => {\n  console.log('connecting with', process.env.DATABASE_URL, 'and', process.env.JWT_SECRET);\n"
        "  console.error('redis at ' + process.env.REDIS_URL);\n"
        "  throw new Error('cannot migrate with ' + process.env.DATABASE_URL);\n};\nexports.down = () => {};\n")


def hits(root: Path, needles: dict[str, str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        for name, value in needles.items():
            if value.encode() in data:
                found.setdefault(name, []).append(str(p.relative_to(root)))
    return found


def test_no_secret_reaches_the_instance(node_app, app_variant, services, instance, environment_name, pm2_cleanup, monkeypatch,
                                        tmp_path):
    pm2_cleanup(environment_name)
    monkeypatch.setenv("DATABASE_URL", services.database_url)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("JWT_SECRET", JWT)
    monkeypatch.setenv("NODE_ENV", "production")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("SLACK_BOT_TOKEN", SLACK)
    monkeypatch.setenv("OPS_SLACK_CHANNEL", "#releases")
    monkeypatch.setenv("OPS_K8S_TOKEN", K8S_TOKEN)
    defs = make_defs(backup_store=BackupStore(local_dir=str(tmp_path / "backups")))  # resources built with these set
    job = defs.get_job_def("release")
    port = free_port()
    ok = job.execute_in_process(run_config=release_run_config(node_app, environment_name, version="s1", port=port, fast=True),
                                instance=instance)
    assert ok.success
    bad_app = app_variant("leaky", leaky_migration)
    bad = job.execute_in_process(run_config=release_run_config(bad_app, environment_name, version="s2", port=port, fast=True),
                                 instance=instance, raise_on_error=False)
    assert not bad.success and bad.get_step_failure_events()[0].step_key == "migrate_database"
    message = bad.get_step_failure_events()[0].step_failure_data.error.message
    assert "cannot migrate with" in message and "***" in message  # the error is shown, its secret is not

    db_password = services.database_url.split(":")[2].split("@")[0]
    redis_password = services.redis_url.split(":")[2].split("@")[0]
    needles = {"JWT_SECRET": JWT, "database password": db_password, "redis password": redis_password,
               "AWS secret key": AWS_SECRET, "Slack token": SLACK, "Kubernetes token": K8S_TOKEN}
    root = Path(instance.root_directory)
    assert any(root.rglob("*.db")), "no instance storage found to search"
    assert hits(root, needles) == {}
    # Our own files beside PM2 (its app definitions) carry no secrets either.
    from ops_pipeline.platform.paths import environment_dir

    assert hits(environment_dir(environment_name) / "pm2-apps", needles) == {}


@pytest.mark.parametrize("field", ["password", "jwt"])
def test_verify_env_errors_never_echo_secret_values(field, services, instance, node_app, monkeypatch, environment_name):
    from tests.conftest import make_defs as _make_defs

    if field == "password":
        monkeypatch.setenv("DATABASE_URL", services.database_url.replace("@", "x@", 1))  # wrong password
        secret = services.database_url.split(":")[2].split("@")[0] + "x"
    else:
        monkeypatch.setenv("DATABASE_URL", services.database_url)
        secret = "dev-secret"
    monkeypatch.setenv("JWT_SECRET", secret if field == "jwt" else JWT)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("NODE_ENV", "production")
    job = _make_defs().get_job_def("release")
    cfg = release_run_config(node_app, environment_name, version="x1", production=True, embedded_services=False)
    r = job.execute_in_process(run_config=cfg, instance=instance, raise_on_error=False)
    ev = r.get_step_failure_events()[0]
    assert ev.step_key == "verify_env"
    message = ev.step_failure_data.error.message
    assert secret not in message
    assert ("password authentication failed" in message) if field == "password" else ("well-known default" in message)
    assert hits(Path(instance.root_directory), {"secret": secret}) == {}
