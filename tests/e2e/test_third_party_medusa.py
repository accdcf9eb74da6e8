"""Medusa v1, a service no one here wrote, released with its spec file only and rolled back by the health watch.

`examples/third-party/medusa/` is Medusa as its users deploy it: the published @medusajs/medusa 1.20.10 and the
modules its default configuration loads, pinned by the lock file, and the starter's medusa-config.js. A shape
unlike Unleash's: started by its own CLI in the project folder, one DATABASE_URL (from a file: an external
PostgreSQL, since its migrations need pg_trgm, which the embedded PostgreSQL 16 lacks; here a throwaway PostgreSQL
15 cluster), its sessions in the embedded Redis, /health answering the text "OK", TypeORM migrations run by a
separate command. The test changes only what any user's copy of the spec would: environment name, port, version,
the file holding the database URL. A first attempt whose migrations fail stops before any deploy. The broken version is the same service with a regression injected from outside
its code (a preloaded module that makes /health answer 503 once a file exists), released with the spec's
`app.env`; the rollback brings back the good version's recorded spec, without that variable.
"""

import shutil
import time
from pathlib import Path

import dagster as dg
import httpx
import psycopg
import pytest
import yaml

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from tests import pg15
from tests.conftest import _STATE, ROOT
from tests.e2e.test_rollback_daemon import rollbacks, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemon")]

MEDUSA = ROOT / "examples" / "third-party" / "medusa"
REGRESSION = ROOT / "tests" / "fixtures" / "regressions" / "health-503-when-file.cjs"
MIGRATIONS = 75  # in @medusajs/medusa 1.20.10 (TypeORM's `migrations` table)


@pytest.fixture
def medusa_database(tmp_path):
    """A database owned by its own role on a PostgreSQL with pg_trgm; yields the file holding its URL."""
    bindir = pg15.bindir_with("pg_trgm")
    if bindir is None:
        pytest.skip("no PostgreSQL with the pg_trgm extension on this machine (Debian: postgresql-15)")
    with pg15.cluster(bindir, prefix="ops-medusa-pg-") as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE ROLE medusa LOGIN CREATEDB PASSWORD 'medusa-e2e'")  # CREATEDB: restore drills
            conn.execute("CREATE DATABASE medusa OWNER medusa")
        url_file = tmp_path / "database-url"
        url_file.write_text(f"postgresql://medusa:medusa-e2e@127.0.0.1:{server.port}/medusa\n")
        yield url_file


def medusa_spec(app: Path, env: str, version: str, port: int, database_url_file: Path,
                extra_env: dict | None = None) -> dict:
    spec = yaml.safe_load((MEDUSA / "release.yaml").read_text())
    cfg = spec["ops"]["verify_env"]["config"]
    cfg.update(environment=env, version=version)
    cfg["app"]["path"] = str(app)
    cfg["app"]["database"]["url_from"] = f"file:{database_url_file}"
    cfg["app"]["env"].update(extra_env or {})
    cfg["target"]["port"] = port
    return spec


def get(port: int, path: str = "/health") -> tuple[int, str]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=3, headers={"Connection": "close"})
        return r.status_code, r.text
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__


def steps(stack, run) -> dict[str, tuple[str, float]]:
    """step -> (status, seconds) of a finished run, in the order they ran."""
    with stack.instance() as inst:
        stats = sorted(inst.get_run_step_stats(run.run_id), key=lambda s: s.start_time or 0)
    return {s.step_key: (s.status.value if s.status else "?", (s.end_time or 0) - (s.start_time or 0)) for s in stats}


def test_medusa_released_by_spec_then_rolled_back_by_the_health_watch(dagster_stack, environment_name, pm2_cleanup,
                                                                       medusa_database, tmp_path):
    env = environment_name
    pm2_cleanup(env)
    app = _STATE / "apps" / f"medusa-{tmp_path.name}"
    # The release installs into the app folder: a copy, without a developer's node_modules (CI has none).
    shutil.copytree(MEDUSA, app, ignore=shutil.ignore_patterns("node_modules"))
    port = free_port()
    url = medusa_database.read_text().strip()
    timings, step_times = {}, {}

    def release(version: str, extra_env: dict | None = None, timeout_s: float = 600):
        t0 = time.monotonic()
        run = dagster_stack.wait_run(dagster_stack.submit(
            "release", medusa_spec(app, env, version, port, medusa_database, extra_env), tags={"ops/environment": env}),
            timeout_s=timeout_s)
        timings[f"release {version}"] = time.monotonic() - t0
        step_times[version] = steps(dagster_stack, run)
        return run

    # A first attempt whose migrations fail (a table named like one of Medusa's is in the way). `medusa migrations
    # run` would exit 0 here; the spec's migrate command exits 1, so the release stops before any deploy.
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE store (id integer)")
    run = release("1.20.10-0", timeout_s=900)  # installs and builds: the next releases reuse both
    assert run.status.value == "FAILURE"
    failed = [k for k, (status, _) in step_times["1.20.10-0"].items() if status != "SUCCESS"]
    assert failed == ["migrate_database"], step_times["1.20.10-0"]
    with dagster_stack.instance() as inst:
        failure = inst.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)[0].dagster_event
    message = failure.step_failure_data.error.message
    assert "migration failed; nothing was deployed" in message and 'relation "store" already exists' in message, message
    assert get(port)[0] != 200
    with psycopg.connect(url, autocommit=True) as c:
        assert c.execute("SELECT to_regclass('region')").fetchone()[0] is None  # its transaction was rolled back
        c.execute("DROP TABLE store")

    run = release("1.20.10-a")
    assert run.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert get(port) == (200, "OK")
    status, body = get(port, "/store/regions")  # its API, from the migrated database
    assert status == 200 and '"regions"' in body, (status, body[:300])

    # TypeORM's own table, read right, in the external database the spec's file named.
    with dagster_stack.instance() as inst:
        released = history.load(inst, env).events[0]
    with psycopg.connect(url) as c:
        in_table = c.execute("SELECT count(*) FROM migrations").fetchone()[0]
        trgm = c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'").fetchone()[0]
    assert in_table == MIGRATIONS and trgm == 1
    assert len(released.get("migrations") or []) == MIGRATIONS, released.get("migrations")

    # v2: the same artifact with a regression preloaded from outside; it passes its gate.
    broken = tmp_path / "v2-breaks"
    run = release("1.20.10-b", {"NODE_OPTIONS": f"--require {REGRESSION}", "REGRESSION_FILE": str(broken)})
    assert run.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert get(port) == (200, "OK")

    broken.touch()
    assert get(port)[0] == 503
    t0 = time.monotonic()
    rb = wait_for(lambda: [r for r in rollbacks(dagster_stack, env) if r.is_finished], 240, "the rollback run to finish")
    timings["first failing probe -> rollback finished"] = time.monotonic() - t0
    assert len(rb) == 1 and rb[0].status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    step_times["rollback"] = steps(dagster_stack, rb[0])
    assert rb[0].tags["dagster/sensor_name"] == "health_watch"
    assert wait_for(lambda: all(get(port) == (200, "OK") for _ in range(6)), 30, "1.20.10-a serving")
    with dagster_stack.instance() as inst:
        hist = history.load(inst, env)
    assert hist.serving_version == "1.20.10-a" and "1.20.10-b" in hist.bad_versions

    # The backups the releases took of the PostgreSQL 15 database (with the pipeline's pg_dump 16) restore: the
    # weekly drill, on the database of the environment's recorded spec, restores the newest into a scratch database.
    t0 = time.monotonic()
    drill = dagster_stack.wait_run(dagster_stack.submit(
        "restore_drill", {"ops": {"backup_target": {"config": {"environment": env}}}}), timeout_s=300)
    timings["restore drill"] = time.monotonic() - t0
    assert drill.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    with dagster_stack.instance() as inst:
        drilled = inst.all_logs(drill.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)[-1].asset_materialization
    assert drilled.asset_key.path[0] == "restore_drills", drilled
    facts = {k: v.value for k, v in drilled.metadata.items()}
    assert facts["row_counts_match"] is True and facts["tables"] >= 90, facts  # Medusa's 100 tables
    print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
    for run_name, times in step_times.items():
        print(f"  {run_name}: " + ", ".join(f"{k} {s:.1f} s" + ("" if st == "SUCCESS" else f" ({st})")
                                           for k, (st, s) in times.items()))
