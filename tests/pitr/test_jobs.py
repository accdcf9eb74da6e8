"""Archive mode through the Dagster ops and jobs, on a real PostgreSQL 15 and pgBackRest: the release's backup step
records a restore point (setting up the stanza and a first full backup the first time), the release history names
it, the nightly backup job takes a verified base backup with `info` as asset metadata, and the
weekly drill restores to the latest WAL and checks it, and the restore_point_in_time job restores to the release's
point and switches over only when confirmed."""

from __future__ import annotations

import os
import subprocess
import time

import dagster as dg
import psycopg
import pytest

from ops_pipeline.backup import archive_ops, archiving
from ops_pipeline.backup.ops import backup_database
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec, validate_release_config
from tests.conftest import make_defs
from tests.pitr.conftest import _folder, archiving_server

pytestmark = pytest.mark.xdist_group("pg15")


def test_the_spec_says_which_backups_an_environment_uses():
    assert ReleaseConfig().app.database.backups == "dump"
    cfg = ReleaseConfig(app={"database": {"backups": "wal", "archive": {
        "admin_url_from": "ADMIN_URL", "cipher_key_from": "generate", "repo_dir": "repo", "retention_full": 0,
        "archive_timeout_s": 0}}})
    problems = "\n".join(validate_release_config(cfg, check_paths=False))
    for words in ("app.database.backups: must be dump or archive (got 'wal')",
                  "app.database.archive.admin_url_from: 'ADMIN_URL' must be env:NAME",
                  "app.database.archive.cipher_key_from: 'generate' must be env:NAME",
                  "app.database.archive.repo_dir: 'repo' must be an absolute path",
                  "app.database.archive.retention_full: must be between 1 and 100 (got 0)",
                  "app.database.archive.archive_timeout_s: must be between 1 and 3600 (got 0)"):
        assert words in problems


def _columns(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = "
                                           "'orders' ORDER BY ordinal_position")]


def test_release_restore_point_then_point_in_time_restore_and_confirmed_switch_over(instance, tmp_path, monkeypatch):
    with archiving_server(full_backup=False) as a:
        shop = ConnInfo.parse(a.url).url("shop")
        with psycopg.connect(a.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE shop")
        with psycopg.connect(shop, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, note text NOT NULL)")
            conn.execute("INSERT INTO orders (note) SELECT md5(i::text) FROM generate_series(1, 3000) i")
        monkeypatch.setenv("DATABASE_URL", shop)
        repo = _folder("ops-pitr-jobrepo-")
        cfg = ReleaseConfig(environment="arch", version="v2", embedded_services=False,
                            app={"redis": {"enabled": False}, "required_env": [], "secret_env": [], "jwt_secret_env": "",
                                 "node_env_var": "", "database": {"backups": "archive", "archive": {"repo_dir": repo}}})
        assert validate_release_config(cfg, check_paths=False) == []
        spec = ReleaseSpec(config=cfg, version="v2", app_dir="")
        store = BackupStore(local_dir=str(tmp_path / "store"))
        resources = {"postgres": PostgresResource(bin_dir=str(a.bindir)), "backup_store": store,
                     "local_stack": LocalStack()}

        # 1. the release's backup step: stanza created, first full backup, then the restore point (archived)
        with dg.build_op_context(resources=resources, instance=instance) as ctx:
            first = backup_database(ctx, spec)
        assert first["id"].startswith("restore-point:release-v2-") and first["kind"] == "restore_point"
        assert first["verified"] and first["wal_segment"] <= archiving.newest_segment(_tool(spec, shop, store))
        # 2. the next release's safety point costs a restore point only (the bench measures it against a dump)
        t0 = time.monotonic()
        with dg.build_op_context(resources=resources, instance=instance) as ctx:
            point = backup_database(ctx, spec)
        assert time.monotonic() - t0 < 10 and point["id"] != first["id"]
        instance.report_runless_asset_event(archive_ops.materialization(point))
        instance.report_runless_asset_event(history.materialization(
            "arch", history.RELEASED, "v2", backup_id=point["id"], spec=spec.to_json()))
        assert history.load(instance, "arch").events[0].get("restore_point") == point["restore_point"]

        with psycopg.connect(shop, autocommit=True) as conn:  # the bad migration and writes after it
            conn.execute("ALTER TABLE orders DROP COLUMN note")
            conn.execute("INSERT INTO orders DEFAULT VALUES")

        defs = make_defs(backup_store=store, postgres=PostgresResource(bin_dir=str(a.bindir)))
        # 3. the nightly backup job: a verified base backup (the environment's spec comes from its history)
        r = defs.get_job_def("backup").execute_in_process(
            run_config={"ops": {"backup_target": {"config": {"environment": "arch", "embedded_services": False}}}},
            instance=instance)
        base = r.output_for_node("backup_database")
        assert base["kind"] == "base_backup" and base["verified"] and base["backup_type"] in ("full", "diff")
        mats = instance.fetch_materializations(archive_ops.asset_key("arch"), limit=5).records
        assert mats[0].asset_materialization.metadata["backup_type"].value == base["backup_type"]

        parent = os.path.dirname(str(a.server.data))
        before = set(os.listdir(parent))
        # 3b. the weekly drill proves point-in-time recovery: to the latest WAL, checked, timed, removed
        r = defs.get_job_def("restore_drill").execute_in_process(
            run_config={"ops": {"backup_target": {"config": {"environment": "arch", "embedded_services": False}}}},
            instance=instance)
        drill = r.output_for_node("drill_newest_backup")
        assert drill["kind"] == "pitr" and drill["rows"] == 3001 and drill["amcheck"]["ok"]
        assert drill["recovery"]["backup_set"] == base["id"]
        assert set(os.listdir(parent)) == before
        drills = instance.fetch_materializations(dg.AssetKey(["restore_drills", "arch", "shop"]), limit=1).records
        assert drills[0].asset_materialization.metadata["kind"].value == "pitr"

        restore = defs.get_job_def("restore_point_in_time")
        cfg_pitr = {"environment": "arch", "embedded_services": False, "target": "name", "target_value": point["id"]}
        # 4. switch_over without the typed data folder: refused before anything is restored
        r = restore.execute_in_process(run_config={"ops": {"restore_point_in_time": {"config": {
            **cfg_pitr, "switch_over": True, "confirm_data_dir": "/somewhere/else"}}}}, instance=instance,
            raise_on_error=False)
        assert not r.success and "confirm_data_dir" in r.get_step_failure_events()[0].step_failure_data.error.message
        assert set(os.listdir(parent)) == before
        # 5. confirmed: restored to the release's point (before the base backup of step 3), verified, switched over
        r = restore.execute_in_process(run_config={"ops": {"restore_point_in_time": {"config": {
            **cfg_pitr, "switch_over": True, "confirm_data_dir": str(a.server.data)}}}}, instance=instance)
        out = r.output_for_node("restore_point_in_time")
        assert out["switched"] and out["amcheck"] == "ok" and out["row_counts"] == {"public.orders": 3000}
        assert _columns(shop) == ["id", "note"]  # the live server now serves the moment before the migration
        assert os.path.isdir(out["previous_data_dir"])
        with psycopg.connect(shop) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 3000
        # 6. the switched server archives on its new timeline: a new safety point is archived
        after = archiving.create_safety_point(a.url, "after-switch", log=print)
        assert int(after.segment[:8], 16) >= 2


def _tool(spec, url, store):
    return archive_ops.open_archive(spec, url, __import__("ops_pipeline.platform.redaction", fromlist=["x"]).Redactor(),
                                    store, print).tool


def test_after_a_crash_the_job_restores_to_the_latest_wal_and_switches_the_dead_server_over(instance, monkeypatch):
    with archiving_server(full_backup=False, archive_timeout_s=1) as a:
        shop = ConnInfo.parse(a.url).url("shop")
        with psycopg.connect(a.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE shop")
        with psycopg.connect(shop, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, note text NOT NULL)")
            conn.execute("INSERT INTO orders (note) SELECT md5(i::text) FROM generate_series(1, 2000) i")
        monkeypatch.setenv("DATABASE_URL", shop)
        cfg = ReleaseConfig(environment="crash", version="v1", embedded_services=False,
                            app={"redis": {"enabled": False}, "required_env": [], "secret_env": [], "jwt_secret_env": "",
                                 "node_env_var": "", "database": {"backups": "archive",
                                                                  "archive": {"repo_dir": _folder("ops-pitr-jobrepo-")}}})
        spec = ReleaseSpec(config=cfg, version="v1", app_dir="")
        instance.report_runless_asset_event(history.materialization("crash", history.RELEASED, "v1", spec=spec.to_json()))
        store = BackupStore(local_dir=_folder("ops-pitr-store-"))
        defs = make_defs(backup_store=store, postgres=PostgresResource(bin_dir=str(a.bindir)))
        target = {"environment": "crash", "embedded_services": False}
        assert defs.get_job_def("backup").execute_in_process(
            run_config={"ops": {"backup_target": {"config": target}}}, instance=instance).success
        with psycopg.connect(shop, autocommit=True) as conn:
            conn.execute("INSERT INTO orders (note) SELECT 'after the backup' FROM generate_series(1, 500)")
        archiving.create_safety_point(a.url, "all-archived", log=print)  # everything so far is in the repository
        subprocess.run(["runuser", "-u", "opspg", "--", f"{a.bindir}/pg_ctl", "-D", str(a.server.data), "-m", "immediate",
                        "stop"] if os.geteuid() == 0 else [f"{a.bindir}/pg_ctl", "-D", str(a.server.data), "-m",
                                                             "immediate", "stop"], check=True, capture_output=True)

        r = defs.get_job_def("restore_point_in_time").execute_in_process(run_config={"ops": {"restore_point_in_time": {
            "config": {**target, "target": "latest", "switch_over": True, "confirm_data_dir": str(a.server.data)}}}},
            instance=instance)
        out = r.output_for_node("restore_point_in_time")
        assert out["switched"] and out["safety_restore_point"].startswith("none: the live server was down")
        assert out["row_counts"] == {"public.orders": 2500}
        with psycopg.connect(shop) as conn:  # the server serves again, from the restored folder
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 2500
        assert os.path.isdir(out["previous_data_dir"])  # the crashed folder, kept as it was
