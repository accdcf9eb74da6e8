"""Applied migrations read from each migration tool's own table shape, on a real PostgreSQL; a table that cannot be
read never breaks the backup's snapshot transaction, and a deterministic database error is not retried."""

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from ops_pipeline import backup as backups
from ops_pipeline.backup.ops import backup_failure
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.migration_tables import MigrationsTableError, applied_migrations
from ops_pipeline.platform.postgres import ConnInfo, DatabaseError, PostgresResource
from ops_pipeline.platform.redaction import Redactor
from tests.conftest import make_defs

PG = PostgresResource()

# (table named in the spec, DDL, rows in insertion order, applied migrations expected, oldest first)
TOOLS = {
    "node-pg-migrate": (
        "pgmigrations",
        "CREATE TABLE pgmigrations (id serial PRIMARY KEY, name varchar(255) NOT NULL, run_on timestamp NOT NULL)",
        ["INSERT INTO pgmigrations (name, run_on) VALUES ('1700000000001_users', '2026-01-02'), "
         "('1700000000000_init', '2026-01-01'), ('1700000000002_orders', '2026-01-03')"],
        ["1700000000000_init", "1700000000001_users", "1700000000002_orders"],
    ),
    "db-migrate": (
        "migrations",
        "CREATE TABLE migrations (id serial PRIMARY KEY, name varchar(255) NOT NULL, run_on timestamp NOT NULL)",
        ["INSERT INTO migrations (name, run_on) VALUES ('/20260101-init', '2026-01-01 10:00'), "
         "('/20260102-users', '2026-01-01 10:00'), ('/20260103-orders', '2026-01-05')"],
        ["/20260101-init", "/20260102-users", "/20260103-orders"],
    ),
    "knex": (
        "knex_migrations",
        "CREATE TABLE knex_migrations (id serial PRIMARY KEY, name varchar(255), batch integer, "
        "migration_time timestamptz)",
        ["INSERT INTO knex_migrations (name, batch, migration_time) VALUES "
         "('20260101_init.js', 1, '2026-01-01'), ('20260102_users.js', 1, '2026-01-01'), "
         "('20260301_orders.js', 2, '2026-03-01')"],
        ["20260101_init.js", "20260102_users.js", "20260301_orders.js"],
    ),
    "Sequelize": (
        "SequelizeMeta",
        'CREATE TABLE "SequelizeMeta" (name varchar(255) NOT NULL PRIMARY KEY)',
        ["""INSERT INTO "SequelizeMeta" VALUES ('20260102-users.js'), ('20260101-init.js'), ('20260103-orders.js')"""],
        ["20260101-init.js", "20260102-users.js", "20260103-orders.js"],
    ),
    "TypeORM": (
        "migrations",
        'CREATE TABLE migrations (id serial PRIMARY KEY, "timestamp" bigint NOT NULL, name varchar NOT NULL)',
        ["INSERT INTO migrations (\"timestamp\", name) VALUES (1700000000000, 'Init1700000000000'), "
         "(1700000000001, 'Users1700000000001')"],
        ["Init1700000000000", "Users1700000000001"],
    ),
    "Prisma": (
        "_prisma_migrations",
        "CREATE TABLE _prisma_migrations (id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL, "
        "finished_at timestamptz, migration_name varchar(255) NOT NULL, logs text, rolled_back_at timestamptz, "
        "started_at timestamptz NOT NULL DEFAULT now(), applied_steps_count integer NOT NULL DEFAULT 0)",
        # ids are uuids (no order); a failed attempt rolled back, then applied again; one still running
        ["INSERT INTO _prisma_migrations (id, checksum, finished_at, migration_name, rolled_back_at, started_at) VALUES "
         "('f3a1', 'c1', '2026-01-01 00:00:01', '20260101000000_init', NULL, '2026-01-01'), "
         "('0b7e', 'c2', NULL, '20260102000000_orders', '2026-01-02 00:01', '2026-01-02'), "
         "('9c40', 'c2', '2026-01-03 00:00:02', '20260102000000_orders', NULL, '2026-01-03'), "
         "('5d11', 'c3', NULL, '20260104000000_audit', NULL, '2026-01-04')"],
        ["20260101000000_init", "20260102000000_orders"],
    ),
    "golang-migrate (version only, in a schema)": (
        "app.schema_migrations",
        "CREATE SCHEMA app; CREATE TABLE app.schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL)",
        ["INSERT INTO app.schema_migrations VALUES (10, false), (9, false)"],
        ["9", "10"],  # by the column's own order, not as text
    ),
    "a table of its own shape": (
        "Deploy_Log",
        'CREATE TABLE "Deploy_Log" (change_no int, script_file text, applied timestamptz)',
        ["""INSERT INTO "Deploy_Log" VALUES (2, 'b.sql', '2026-02-01'), (1, 'a.sql', '2026-01-01')"""],
        ["a.sql", "b.sql"],
    ),
}


def _create(url: str, ddl: str, rows: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        cur = psycopg.ClientCursor(c)  # simple query protocol: a DDL string may hold two statements
        cur.execute(ddl)
        for insert in rows:
            cur.execute(insert)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_each_tools_table_gives_its_applied_migrations_oldest_first(scratch_db, tool):
    table, ddl, rows, expected = TOOLS[tool]
    _create(scratch_db, ddl, rows)
    with psycopg.connect(scratch_db, autocommit=True) as c:
        assert applied_migrations(c, table) == expected


def test_no_table_named_or_none_yet_means_none_applied(scratch_db):
    with psycopg.connect(scratch_db, autocommit=True) as c:
        assert applied_migrations(c, "") == []
        assert applied_migrations(c, "knex_migrations") == []
        assert applied_migrations(c, "nowhere.pgmigrations") == []


def test_an_unreadable_table_fails_clearly_and_leaves_the_snapshot_transaction_intact(scratch_db):
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute("CREATE VIEW pgmigrations AS SELECT 1 / (count(*) - count(*))::int AS name, now() AS run_on FROM orders")
    with psycopg.connect(scratch_db) as snap, psycopg.connect(scratch_db) as other:
        snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = snap.execute("SELECT pg_export_snapshot()").fetchone()[0]
        with pytest.raises(MigrationsTableError, match="table 'pgmigrations': division by zero"):
            applied_migrations(snap, "pgmigrations")
        assert snap.execute("SELECT count(*) FROM orders").fetchone()[0] == 20000  # the transaction goes on
        other.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        other.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))  # still exported


@pytest.fixture
def store(tmp_path) -> BackupStore:
    return BackupStore(local_dir=str(tmp_path / "store"))


def test_backup_records_each_tools_migrations_and_goes_on_when_the_table_cannot_be_read(scratch_db, store):
    table, ddl, rows, expected = TOOLS["knex"]
    _create(scratch_db, ddl, rows)
    lines: list[str] = []
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="mig", log=lines.append,
                            migrations_table=table)
    assert m["verified"] and m["migrations"] == expected and "migrations_error" not in m
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute("CREATE VIEW broken_migrations AS SELECT 1 / (count(*) - count(*))::int AS name FROM orders")
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="mig", log=lines.append,
                            migrations_table="broken_migrations")
    assert m["verified"] and m["migrations"] == [] and m["table_counts"]["public.orders"] == 20000
    assert "broken_migrations" in m["migrations_error"] and "division by zero" in m["migrations_error"]
    assert any("applied migrations not recorded in the manifest" in line for line in lines)


def test_backup_job_reads_knex_migrations_without_retrying(scratch_db, store, instance, monkeypatch):
    table, ddl, rows, expected = TOOLS["knex"]
    _create(scratch_db, ddl, rows)
    monkeypatch.setenv("DATABASE_URL", scratch_db)
    job = make_defs(backup_store=store).get_job_def("backup")
    config = {"ops": {"backup_target": {"config": {"environment": "knexenv", "trigger": "manual",
                                                   "migrations_table": table}}}}
    r = job.execute_in_process(run_config=config, instance=instance)
    assert r.success
    assert not [e for e in r.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert r.output_for_node("backup_database")["migrations"] == expected


def test_a_deterministic_database_error_fails_the_backup_at_once_with_its_cause(scratch_db, services, store, instance,
                                                                               monkeypatch):
    """The app role may not export snapshots in this database: PostgreSQL answers the same every time, so the op
    fails on its first attempt and names the cause (the previous code retried it three times)."""
    admin = ConnInfo.parse(services.admin_database_url).url(ConnInfo.parse(scratch_db).database)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute("REVOKE EXECUTE ON FUNCTION pg_export_snapshot() FROM PUBLIC")
    monkeypatch.setenv("DATABASE_URL", scratch_db)
    job = make_defs(backup_store=store).get_job_def("backup")
    config = {"ops": {"backup_target": {"config": {"environment": "denied", "trigger": "manual"}}}}
    r = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
    assert not r.success
    assert not [e for e in r.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    failure = next(e for e in r.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "not retried" in message and "InsufficientPrivilege" in message and "pg_export_snapshot" in message, message


def test_only_transient_errors_are_retried(scratch_db):
    from ops_pipeline.platform.local_stack import free_port

    red = Redactor()
    with psycopg.connect(scratch_db, autocommit=True) as c:
        try:
            c.execute("SELECT run_on FROM orders")
        except psycopg.Error as exc:
            undefined_column = exc
    closed = f"postgresql://app:pw@127.0.0.1:{free_port()}/x"
    try:
        psycopg.connect(closed, connect_timeout=2)
    except psycopg.Error as exc:
        refused = exc
    try:
        PG.connect(closed, timeout_s=2)
    except DatabaseError as exc:
        cannot_connect = exc
    assert isinstance(undefined_column, psycopg.errors.UndefinedColumn)
    assert backup_failure(undefined_column, red).allow_retries is False
    assert "UndefinedColumn" in backup_failure(undefined_column, red).description
    assert backup_failure(backups.BackupError("pg_dump exited with status 1"), red).allow_retries is False
    assert backup_failure(refused, red).allow_retries is True
    assert backup_failure(cannot_connect, red).allow_retries is True
    assert isinstance(backup_failure(refused, red), dg.Failure) and backup_failure(KeyError("x"), red) is None
