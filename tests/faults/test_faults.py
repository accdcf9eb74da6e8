"""Fault injection: each test breaks something for real and checks the run fails or recovers with an explanation,
the last good version keeps serving, and no verified backup is lost. A summary table closes the suite's output."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest
import yaml

from ops_pipeline import backup as backups
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform import history
from ops_pipeline.platform.postgres import PostgresResource
from tests import app_variants
from tests.conftest import ROOT, make_defs
from tests.faults.conftest import failure

pytestmark = pytest.mark.faults
PG = PostgresResource()


def wait_until(predicate, timeout_s: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def app_queries(url: str, like: str) -> bool:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as c:
            return bool(c.execute("SELECT 1 FROM pg_stat_activity WHERE query ILIKE %s AND pid <> pg_backend_pid()",
                                  (like,)).fetchone())
    except psycopg.Error:
        return False


def test_postgres_stopped_during_a_backup(fault_env, fault_store, verified_backups, report):
    url = fault_env.services().database_url
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS ballast AS SELECT i, repeat(md5(i::text), 6) AS t FROM generate_series(1, 600000) i")
    errors: list[BaseException] = []

    def run():
        try:
            backups.take_backup(PG, fault_store, url, trigger="manual", environment="pgstop", log=lambda m: None)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert wait_until(lambda: app_queries(url, "COPY %"), 20), "pg_dump never started copying"
    fault_env.stop_postgres()
    t.join(60)
    fault_env.ensure_running()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS ballast")
    assert errors and isinstance(errors[0], backups.BackupError), errors
    assert fault_store.manifests("pgstop/app") == [] and fault_store.incomplete("pgstop/app") == []
    lost = verified_backups()
    report("PostgreSQL stopped during backup", "failed", str(errors[0]), "n/a", lost)
    assert lost == "none"


def test_postgres_stopped_during_a_migration(node_app, app_variant, releaser, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    slow = app_variant("slow-migration", app_variants.slow_migration(20))
    url = releaser_url()
    t, box = releaser.release_in_thread(slow, "v2")
    assert wait_until(lambda: app_queries(url, "%pg_sleep%"), 120), "the migration never started"
    fault_stack().stop_postgres()
    t.join(120)
    fault_stack().ensure_running()
    step, message = failure(box["result"])
    assert step == "migrate_database" and "nothing was deployed" in message
    with psycopg.connect(url) as c:
        assert c.execute("SELECT to_regclass('slow_marker')").fetchone()[0] is None
        assert not c.execute("SELECT 1 FROM pgmigrations WHERE name LIKE '%slow%'").fetchone()
    assert wait_until(lambda: releaser.served(4) == {"v1:200"}, 30)
    lost = verified_backups()
    report("PostgreSQL stopped during migration", "failed", message.splitlines()[0], "v1", lost)
    assert lost == "none"


def releaser_url() -> str:
    return os.environ["DATABASE_URL"]


def fault_stack():
    from ops_pipeline.platform.local_stack import LocalStack

    return LocalStack(state_dir=str(Path(os.environ["OPS_STATE_DIR"]) / "fault-stack"))


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_backup_store_full_or_read_only(node_app, releaser, verified_backups, report, tmp_path, mode):
    assert releaser.release(node_app, "v1").success
    mnt = tmp_path / "store"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        filler = mnt / "other-data"
        if mode == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        else:
            try:  # fill the store up
                with open(filler, "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            except OSError:
                pass
        bad = type(releaser)(releaser.env, releaser.port, BackupStore(local_dir=str(mnt)), releaser.instance)
        started = time.monotonic()
        r = bad.release(node_app, "v2")
        took = time.monotonic() - started
        step, message = failure(r)
        leftovers = [p for p in mnt.rglob("*") if p.is_file() and p != filler]
        dumps_left = [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "pg_dump"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert step == "backup_database" and "not retried" in message, message
    assert leftovers == []
    assert dumps_left == []  # no pg_dump left holding its snapshot open
    assert releaser.served() == {"v1:200"}
    lost = verified_backups()
    report(f"backup store {mode}", "failed", f"{message.splitlines()[0]} ({took:.0f} s, no migration, no deploy)", "v1", lost)
    assert lost == "none"


def test_s3_endpoint_answering_500s_and_timeouts(fault_env, verified_backups, report, instance):
    import boto3

    from tests.s3_server import FaultProxy, MotoServer

    server = MotoServer().start()
    proxy = FaultProxy(server.port).start()
    try:
        client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="k",
                              aws_secret_access_key="s")
        client.create_bucket(Bucket="fault-backups")
        store = BackupStore(kind="s3", bucket="fault-backups", part_size_mb=5, s3_endpoint_url=proxy.url,
                            aws_access_key_id="k", aws_secret_access_key="s", s3_max_attempts=1)
        good = backups.take_backup(PG, store, fault_env.services().database_url, trigger="manual", environment="s3f",
                                   log=lambda m: None)
        proxy.fail_next(1000, match="partNumber=", action="500")  # every part upload fails: S3 is down for writes
        r = make_defs(backup_store=store).get_job_def("backup").execute_in_process(
            run_config={"ops": {"backup_target": {"config": {"environment": "s3f"}}}}, instance=instance, raise_on_error=False)
        step, message = failure(r)
        retries = sum(1 for e in r.all_events if e.event_type_value == "STEP_UP_FOR_RETRY")
        uploads = client.list_multipart_uploads(Bucket="fault-backups").get("Uploads", [])
        manifests = [m["id"] for m in store.manifests("s3f/app")]
    finally:
        proxy.stop()
        server.stop()
    assert not r.success and step == "backup_database" and retries == 3
    assert uploads == [] and manifests == [good["id"]]
    lost = verified_backups()
    report("S3 answering 500s (then timeouts: test_backup_s3)", "failed", f"{message.splitlines()[0]} after {retries} retries",
           "n/a", lost)
    assert lost == "none"


def test_an_instance_killed_mid_rollout(node_app, releaser, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    t, box = releaser.release_in_thread(node_app, "v2")
    procs = releaser.wait_pm2(lambda ps: any(p["pm2_env"].get("APP_VERSION") == "v2" and p.get("pid") for p in ps), 120)
    victim = next(p for p in procs if p["pm2_env"].get("APP_VERSION") == "v2")
    os.kill(victim["pid"], signal.SIGKILL)
    t.join(180)
    r = box["result"]
    served = releaser.served()
    if r.success:
        outcome, result = "PM2 restarted the killed instance; it passed its checks and the rollout completed", "recovered"
        assert served == {"v2:200"}
    else:
        outcome, result = failure(r)[1].splitlines()[0], "failed"
        assert served == {"v1:200"}
    lost = verified_backups()
    report("instance killed mid-rollout", result, outcome, "/".join(sorted(served)), lost)
    assert lost == "none"


def test_pm2_daemon_killed_mid_rollout(node_app, releaser, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    t, box = releaser.release_in_thread(node_app, "v2")
    releaser.wait_pm2(lambda ps: any(p["pm2_env"].get("APP_VERSION") == "v2" for p in ps), 120)
    pidfile = Path(os.environ["OPS_STATE_DIR"]) / "envs" / releaser.env / "pm2" / "pm2.pid"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    back = wait_until(lambda: releaser.served(1) in ({"v1:200"}, {"v2:200"}), 120, interval=0.2)
    outage = time.monotonic() - killed_at
    t.join(180)
    r = box["result"]
    served = releaser.served()
    assert back
    if r.success:
        result, outcome = "recovered", "the rollout finished on a fresh PM2 daemon"
    else:
        step, message = failure(r)
        assert step == "rolling_deploy" and "restarted" in message, message
        result, outcome = "failed", message.splitlines()[0]
        assert served == {"v1:200"}
    lost = verified_backups()
    report("PM2 daemon killed mid-rollout", result, f"{outcome} (service down {outage:.1f} s: PM2 takes its workers with it)",
           "/".join(sorted(served)), lost)
    assert lost == "none"


def test_new_version_crash_looping(node_app, app_variant, releaser, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    crashing = app_variant("crash", app_variants.crash_on_start)
    r = releaser.release(crashing, "v2")
    step, message = failure(r)
    assert step == "rolling_deploy" and ("crash loop" in message or "never became healthy" in message), message
    assert releaser.served() == {"v1:200"}
    assert [p for p in releaser.pm2_processes() if p["pm2_env"].get("APP_VERSION") == "v2"] == []
    lost = verified_backups()
    report("new version crash-looping", "failed", message.splitlines()[0], "v1", lost)
    assert lost == "none"


def flapping_health(app: Path) -> None:
    src = app / "src" / "health.ts"
    text = src.read_text()
    marker = app_variants.HEALTH_MARKER
    src.write_text("let flap = 0;\n" + text.replace(marker, marker + "\n  if (deps.version !== '' && ++flap % 2 === 0) { return "
                   "{ statusCode: 503, body: { uptime: process.uptime(), timestamp: Date.now(), database: 'error', "
                   "redis: 'ok', version: deps.version }, failures: { database: 'flap' } }; }"))


def test_health_flapping(node_app, app_variant, releaser, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    r = releaser.release(app_variant("flap", flapping_health), "v2", target={"pm2": {"listen_timeout_s": 5}})
    step, message = failure(r)
    assert step in ("rolling_deploy", "health_gate"), message
    assert releaser.served() == {"v1:200"}
    assert "v2" in history.load(releaser.instance, releaser.env).bad_versions
    lost = verified_backups()
    report("health flapping", "failed", message.splitlines()[0], "v1", lost)
    assert lost == "none"


def test_redis_down_during_the_gate(node_app, releaser, fault_env, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    t, box = releaser.release_in_thread(node_app, "v2", gate={"deadline_s": 40, "interval_s": 0.5})
    releaser.wait_pm2(lambda ps: sorted(p["pm2_env"].get("APP_VERSION") for p in ps) == ["v2", "v2"], 180)
    fault_env.stop_redis()
    down_at = time.monotonic()
    assert wait_until(lambda: "v2:503" in releaser.served(2), 10), "health never noticed Redis down"
    time.sleep(3)
    fault_env.start_redis()
    down_s = time.monotonic() - down_at
    t.join(120)
    r = box["result"]
    assert r.success, failure(r)
    assert releaser.served() == {"v2:200"}
    lost = verified_backups()
    report("Redis down during the gate", "recovered",
           f"gate kept probing through {down_s:.0f} s of 503s and passed once Redis returned (deadline 40 s)", "v2", lost)
    assert lost == "none"


def test_dagster_run_process_killed_mid_deploy(node_app, releaser, verified_backups, report, tmp_path):
    assert releaser.release(node_app, "v1").success
    cfg = tmp_path / "release.yaml"
    cfg.write_text(yaml.safe_dump(releaser.config(node_app, "v2")))
    env = {**os.environ, "DAGSTER_HOME": releaser.instance.root_directory}
    defs_file = tmp_path / "defs.py"
    defs_file.write_text(
        "import dagster as dg\nfrom ops_pipeline import definitions\n"
        "from ops_pipeline.backup.store import BackupStore\n"
        f"resources = {{**definitions.build_resources(), 'backup_store': BackupStore(local_dir={releaser.store.local_dir!r})}}\n"
        "defs = dg.Definitions(jobs=definitions.defs.jobs, resources=resources)\n")
    # `dg launch` executes the run in its own process (it calls `dagster job execute`): killed, the run stays STARTED
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dg"), "launch", "-f", str(defs_file), "--job", "release",
                             "--config", str(cfg)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        releaser.wait_pm2(lambda ps: any(p["pm2_env"].get("APP_VERSION") == "v2" for p in ps), 180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    mixed = sorted({p["pm2_env"].get("APP_VERSION") for p in releaser.pm2_processes()})
    assert any(v.startswith("v1:") for v in releaser.served(6))  # the old version still answers
    started = time.monotonic()
    rb = releaser.rollback()
    took = time.monotonic() - started
    assert rb.success, failure(rb)
    messages = " ".join(r.user_message or "" for r in releaser.instance.all_logs(rb.run_id))
    assert "inconsistent state" in messages
    assert releaser.served() == {"v1:200"}
    assert sorted(p["pm2_env"].get("APP_VERSION") for p in releaser.pm2_processes()) == ["v1", "v1"]
    plan = rb.output_for_node("plan_rollback")
    assert plan["bad_version"] == "v2" and plan["target_version"] == "v1"
    hist = history.load(releaser.instance, releaser.env)
    assert hist.events[0].event == history.ROLLED_BACK and hist.serving_version == "v1"
    assert took < 60  # the dead run's release lock died with its connection: no waiting
    lost = verified_backups()
    report("Dagster run process killed mid-deploy", "recovered",
           f"left {'+'.join(mixed)} serving; the rollback saw 'inconsistent state', took the free lock and restored v1 "
           f"in {took:.0f} s", "v1", lost)
    assert lost == "none"


def test_migration_failing_half_way(node_app, app_variant, releaser, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    r = releaser.release(app_variant("half", app_variants.migration_failing_half_way), "v2")
    step, message = failure(r)
    assert step == "migrate_database" and "unchanged" in message
    with psycopg.connect(releaser_url()) as c:
        assert c.execute("SELECT to_regclass('audit_log')").fetchone()[0] is None
    assert releaser.served() == {"v1:200"}
    lost = verified_backups()
    report("migration failing half-way", "failed", message.splitlines()[0], "v1", lost)
    assert lost == "none"


def test_release_spec_pointing_at_a_missing_app_folder(node_app, releaser, verified_backups, report):
    assert releaser.release(node_app, "v1").success
    before = len(releaser.store.manifests(f"{releaser.env}/app"))
    r = releaser.release(Path("/nonexistent/app-folder"), "v2")
    step, message = failure(r)
    assert step == "verify_env" and "app.path" in message and "does not exist" in message
    assert len(releaser.store.manifests(f"{releaser.env}/app")) == before  # no side effect
    assert releaser.served() == {"v1:200"}
    lost = verified_backups()
    report("release spec: missing app folder", "failed", message.splitlines()[1].strip(), "v1", lost)
    assert lost == "none"
