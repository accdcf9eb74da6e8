"""Fault injection, second round (issue 14), part B: the state folder's disk full during the artifact build and
during a backup, and the Dagster storage PostgreSQL restarted during a release. Each breaks something for real,
then checks nothing was lost, nothing half-written counts as good, and the run explains what happened."""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import psycopg
import pytest

from ops_pipeline import backup as backups
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform import history, paths
from ops_pipeline.platform.postgres import PostgresResource, lock_key
from ops_pipeline.release.ops.migrate import environment_lock_name
from tests import pg15
from tests.faults.conftest import failure

pytestmark = pytest.mark.faults
PG = PostgresResource()
RELEASE_STEPS = ["verify_env", "run_tests", "build_image", "backup_database", "migrate_database", "rolling_deploy",
                 "health_gate"]


@contextmanager
def small_disk(where: Path, size: str):
    """A tmpfs of `size` mounted on `where` (root only), always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def steps_started(result) -> list[str]:
    return [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]


def retries(result) -> int:
    return sum(1 for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY")


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def release_lock_free(url: str, environment: str) -> bool:
    """The environment's release lock (a PostgreSQL advisory lock) can be taken, i.e. nobody holds it."""
    key = lock_key(environment_lock_name(environment))
    with psycopg.connect(url, autocommit=True) as c:
        got = c.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
        if got:
            c.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return got


# --- 1. the state folder's disk full during the artifact build -------------------------------------------------------

@pytest.mark.parametrize("size", ["160k", "2m"], ids=["full-while-copying", "full-while-installing"])
def test_state_disk_full_during_the_artifact_build(node_app, releaser, verified_backups, report, size):
    """The artifacts folder on a tmpfs too small for the release bundle: 160k fills while the app is copied into the
    staging folder, 2m while its production dependencies are installed."""
    assert releaser.release(node_app, "v1").success
    backups_before = [m["id"] for m in releaser.store.manifests(f"{releaser.env}/app")]
    store = paths.artifacts_dir()
    # v1's processes run from their own hard-linked release folder: hiding the artifacts underneath harms nothing
    with small_disk(store, size):
        started = time.monotonic()
        r = releaser.release(node_app, "v2")
        took = time.monotonic() - started
        step, message = failure(r)
        left = files_under(store)
        dirs = sorted(p.name for p in store.iterdir())
    assert not r.success
    assert step == "build_image", (step, message)
    assert "no space" in message.lower(), message
    assert str(store) in message, message  # names where the space ran out
    assert steps_started(r) == RELEASE_STEPS[:3]  # nothing after the build: no backup, no migration, no deploy
    assert [m["id"] for m in releaser.store.manifests(f"{releaser.env}/app")] == backups_before
    # nothing half-written registered or left: no <id>.json, no artifact folder, no staging folder, no partial cache
    # (a `.deps/<key>` cache entry is only ever renamed into place complete: it may stay)
    assert [n for n in left if n.endswith(".json") and not n.startswith(".deps/")] == [], left
    assert [d for d in dirs if d != ".deps"] == [], dirs
    assert [p for p in left if p.startswith(".deps/.tmp-")] == [], left
    assert releaser.served() == {"v1:200"}
    hist = history.load(releaser.instance, releaser.env)
    assert hist.serving_version == "v1"
    lost = verified_backups()
    report(f"state disk full during build ({size} tmpfs)", "failed",
           f"{message.split('. ')[0]}; cause: {message.splitlines()[-1][:70]} ({took:.0f} s; no backup/migration/deploy; "
           "nothing left)", "v1", lost)
    assert lost == "none"


# --- 2. the backup store's disk full during a backup -----------------------------------------------------------------

def test_backup_store_disk_full_during_the_dump(node_app, releaser, fault_env, verified_backups, report, tmp_path):
    """The store has room for the small earlier backup, not for the dump of a database that grew: it fills mid-dump."""
    assert releaser.release(node_app, "v1").success
    url = fault_env.services().database_url
    mnt = tmp_path / "store"
    with small_disk(mnt, "2m"):
        store = BackupStore(local_dir=str(mnt))
        earlier = backups.take_backup(PG, store, url, trigger="manual", environment=releaser.env, log=lambda m: None)
        scope = earlier["scope"]
        earlier_files = files_under(mnt)
        with psycopg.connect(url, autocommit=True) as c:  # ~6 MB of random hex: about 3.5 MB once compressed
            c.execute("CREATE TABLE IF NOT EXISTS ballast AS SELECT i, md5(random()::text) || md5(random()::text) AS t "
                      "FROM generate_series(1, 100000) i")
        try:
            bad = type(releaser)(releaser.env, releaser.port, store, releaser.instance)
            started = time.monotonic()
            r = bad.release(node_app, "v2")
            took = time.monotonic() - started
            step, message = failure(r)
            manifests = [m["id"] for m in store.manifests(scope)]
            incomplete = store.incomplete(scope)
            left = files_under(mnt)
            dumps_left = [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "pg_dump"]
            # the earlier backup on the same full disk is intact and still verifies
            backups.verify_stored(store, PG, scope, earlier["id"], earlier["sha256"])
        finally:
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("DROP TABLE IF EXISTS ballast")
    assert step == "backup_database", (step, message)
    assert "not retried" in message and "no space" in message.lower(), message
    assert retries(r) == 0  # ENOSPC does not heal by retrying
    assert steps_started(r) == RELEASE_STEPS[:4]  # no migration, no deploy
    assert manifests == [earlier["id"]] and incomplete == []  # the partial dump never counts as a backup
    assert left == earlier_files, left  # partial files cleaned
    assert dumps_left == []
    assert releaser.served() == {"v1:200"}
    with psycopg.connect(url) as c:  # the ballast table was never migrated away; v2's migrations did not run
        assert c.execute("SELECT count(*) FROM pgmigrations").fetchone()[0] >= 1
    assert history.load(releaser.instance, releaser.env).serving_version == "v1"
    lost = verified_backups()
    report("backup store disk full mid-dump", "failed",
           f"{message.splitlines()[0]} ({took:.0f} s, 0 retries; earlier backup verifies; no migration)", "v1", lost)
    assert lost == "none"


# --- 3. the Dagster storage PostgreSQL restarted during a release ----------------------------------------------------

def storage_instance(home: Path, url: str):
    """A Dagster instance whose run, event-log and schedule storage is PostgreSQL through dagster-postgres, as in
    docker/dagster.yaml, with its driver (psycopg2: dagster-postgres's NOTIFY does not work through psycopg 3's
    server-side parameters)."""
    import dagster as dg

    pytest.importorskip("psycopg2", reason="dagster-postgres's own dependency psycopg2-binary is not installed")
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(url)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(json.dumps({  # JSON is YAML
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_db": {
            "hostname": info["host"], "port": int(info["port"]), "username": info["user"],
            "password": info["password"], "db_name": info["dbname"], "scheme": "postgresql+psycopg2"}}},
    }))
    return dg.DagsterInstance.from_config(str(home))


@pytest.mark.parametrize("down_s", [0.0, 12.0], ids=["restart", "down-12s"])
def test_dagster_storage_postgres_restarted_during_a_release(node_app, releaser, fault_env, verified_backups, report,
                                                              tmp_path, capfd, down_s):
    """The instance's storage PostgreSQL (a server of its own) restarted while the rolling deploy runs: a plain
    restart (pg_ctl restart, about a second), and a longer outage than dagster-postgres's connection retries (~6 s)."""
    bindir = pg15.bindir_with("plpgsql")
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    url = fault_env.services().database_url
    with pg15.cluster(bindir, prefix="ops-dagster-storage-") as pg:
        instance = storage_instance(tmp_path / "dagster_home", pg.url)
        try:
            rel = type(releaser)(releaser.env, releaser.port, releaser.store, instance)
            assert rel.release(node_app, "v1").success
            t, box = rel.release_in_thread(node_app, "v2")
            rel.wait_pm2(lambda ps: any(p["pm2_env"].get("APP_VERSION") == "v2" for p in ps), 180)
            started = time.monotonic()
            if down_s:
                pg.stop()
                time.sleep(down_s)
                pg.start()
            else:
                pg.restart()
            outage = time.monotonic() - started
            t.join(240)
            assert not t.is_alive(), "the release never finished"
            r = box["result"]
            run = instance.get_run_by_id(r.run_id)
            logs = instance.all_logs(r.run_id)
            recorded = [e.dagster_event.step_key for e in logs
                        if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS"]
            run_events = [e.dagster_event.event_type_value for e in logs
                          if e.dagster_event and e.dagster_event.event_type_value.startswith("PIPELINE_")
                          or (e.dagster_event and e.dagster_event.event_type_value.startswith("RUN_"))]
            # what the run process emitted vs what the storage holds: the same events in the same order
            emitted = [e.event_type_value for e in r.all_events]
            stored = [e.dagster_event.event_type_value for e in logs if e.dagster_event]
            lost_lines = sum(1 for e in logs if "Exception while writing logger call to event log" in (e.user_message or ""))
            unwritten = capfd.readouterr().err.count("Exception while writing logger call to event log")
            hist = history.load(instance, rel.env)
            served = rel.served()
            lock_free = release_lock_free(url, rel.env)
        finally:
            instance.dispose()
    assert lock_free, "the release lock was left held"
    assert run is not None and run.is_finished, f"run left {run.status if run else 'missing'} in the storage"
    # no half-recorded history: every event of the run is in the storage (a log line that could not be written is
    # not silently dropped either: the run records an engine event saying so)
    missing = [t for t in emitted if t not in stored or emitted.count(t) > stored.count(t)]
    assert missing == [], missing
    # Dagster notes a log line it could not write once the storage is back, if that note gets written itself: on a
    # loaded machine it may not (seen in CI: 1 line lost, 0 noted). Never a note without a loss; the structured events
    # above are all there either way.
    assert lost_lines <= unwritten, f"{lost_lines} loss(es) noted but {unwritten} log line(s) could not be written"
    if r.success:
        # completed: every step's success and the run's end are in the storage, the history says v2 serves
        assert recorded == RELEASE_STEPS, recorded
        assert run.status.value == "SUCCESS" and run_events[-1] in ("RUN_SUCCESS", "PIPELINE_SUCCESS"), run_events
        assert hist.serving_version == "v2" and served == {"v2:200"}
        result, outcome = "recovered", (f"storage down {outage:.1f} s mid-deploy; dagster-postgres reconnected, the "
                                        f"release completed, all {len(stored)} run events stored "
                                        f"({lost_lines} log lines not written, each noted); v2 in the history")
    else:
        step, message = failure(r)
        assert message, "failed without an explanation"
        assert served in ({"v1:200"}, {"v2:200"}), served
        assert run.status.value == "FAILURE"
        assert hist.serving_version in ("v1", "v2")
        result, outcome = "failed", f"storage down {outage:.1f} s: {step}: {message.splitlines()[0]}"
    lost = verified_backups()
    report(f"Dagster storage PostgreSQL {'restarted' if not down_s else f'down {down_s:.0f} s'} mid-release", result,
           outcome, "/".join(sorted(served)), lost)
    assert lost == "none"
