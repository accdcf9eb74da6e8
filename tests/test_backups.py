"""Backups against a real PostgreSQL (its pg_dump / pg_restore): verified, atomic, rotated safely, restorable."""

import json
import os
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from ops_pipeline import backup as backups
from ops_pipeline.backup.store import BackupStore, StoreError
from ops_pipeline.platform.postgres import ConnInfo, DatabaseError, PostgresResource
from tests.conftest import make_defs

PG = PostgresResource()


@pytest.fixture
def store(tmp_path) -> BackupStore:
    return BackupStore(local_dir=str(tmp_path / "store"))


def files_in(store: BackupStore) -> list[str]:
    root = Path(store.local_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_backup_is_streamed_verified_and_manifest_written_last(scratch_db, store):
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    assert m["verified"] and m["verification"]["ok"] and m["verification"]["toc_entries"] > 5
    assert m["table_counts"] == {"public.customers": 5000, "public.orders": 20000}
    assert m["stored_bytes"] < m["dump_bytes"] and m["mb_per_s"] > 0
    dump = Path(store.local_dir) / "backups" / m["scope"] / m["id"] / "dump.pgc.zst"
    manifest = dump.parent / "manifest.json"
    assert dump.exists() and manifest.exists()
    assert manifest.stat().st_mtime_ns >= dump.stat().st_mtime_ns
    import hashlib

    assert hashlib.sha256(dump.read_bytes()).hexdigest() == m["sha256"]
    assert json.loads(manifest.read_text())["id"] == m["id"]
    assert [x["id"] for x in store.manifests(m["scope"])] == [m["id"]]


def test_counts_match_the_dump_snapshot_even_under_concurrent_writes(scratch_db, store):
    import threading

    stop = threading.Event()

    def writer():
        with psycopg.connect(scratch_db, autocommit=True) as c:
            while not stop.is_set():
                c.execute("INSERT INTO orders (customer_id, total, note) VALUES (1, 1, 'x')")

    t = threading.Thread(target=writer)
    t.start()
    try:
        m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    finally:
        stop.set()
        t.join()
    target = f"r_{time.time_ns() % 10**8}"
    backups.restore_into(PG, store, m, scratch_db, target, log=print)
    try:
        assert backups.compare_counts(m["table_counts"], PG.table_row_counts(scratch_db, target)) == []
    finally:
        backups.drop_database(PG, scratch_db, target)


@pytest.mark.parametrize("fault", ["missing_database", "wrong_password", "unreachable"])
def test_bad_connection_fails_clearly_and_leaves_nothing(scratch_db, store, fault):
    info = ConnInfo.parse(scratch_db)
    url = {
        "missing_database": info.url("no_such_database"),
        "wrong_password": f"postgresql://{info.user}:WRONG-pw-123@{info.host}:{info.port}/{info.database}",
        "unreachable": f"postgresql://{info.user}:{info.password}@127.0.0.1:9/{info.database}",
    }[fault]
    with pytest.raises(backups.BackupError) as err:
        backups.take_backup(PG, store, url, trigger="manual", environment="test", log=print)
    msg = str(err.value)
    assert info.password not in msg and "WRONG-pw-123" not in msg
    assert {"missing_database": "no_such_database", "wrong_password": "password", "unreachable": "cannot connect"}[fault] in msg
    assert files_in(store) == []


def _wrapper_bin(tmp_path: Path, body: str, wrapped: str = "pg_dump") -> PostgresResource:
    """A bin_dir whose `wrapped` tool is a script around the real one ($REAL); the other tools are the real ones."""
    real = Path(PG.binary("pg_dump")).parent
    d = tmp_path / "bin"
    d.mkdir()
    for tool in {"pg_dump", "pg_restore", "pg_amcheck", "psql"} - {wrapped}:
        (d / tool).symlink_to(real / tool)
    script = d / wrapped
    script.write_text(f"#!/bin/sh\nREAL={real}/{wrapped}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return PostgresResource(bin_dir=str(d))


def test_pg_dump_killed_mid_stream_registers_nothing(scratch_db, store, tmp_path):
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute("INSERT INTO orders (customer_id, total, note) SELECT 1, i, repeat(md5(i::text), 8) FROM generate_series(1, 300000) i")
    # The real pg_dump, SIGKILLed by timeout(1) a moment after it started streaming.
    pg = _wrapper_bin(tmp_path, 'case "$1" in --version) exec "$REAL" "$@";; esac\nexec timeout -s KILL 0.3 "$REAL" "$@"')
    with pytest.raises(backups.BackupError) as err:
        backups.take_backup(pg, store, scratch_db, trigger="manual", environment="test", log=print)
    assert "status" in str(err.value)
    assert files_in(store) == []  # no manifest, no partial file
    assert backups.plan_retention(store.manifests("test/" + ConnInfo.parse(scratch_db).database), backups.RetentionPolicy()).delete == []


def test_pg_dump_older_than_server_fails_fast(scratch_db, store, tmp_path):
    pg = _wrapper_bin(tmp_path, 'echo "pg_dump (PostgreSQL) 12.22"; exit 0')
    with pytest.raises(backups.BackupError) as err:
        backups.take_backup(pg, store, scratch_db, trigger="manual", environment="test", log=print)
    assert "older than the server" in str(err.value)
    assert files_in(store) == []


@pytest.mark.parametrize("compression,threads", [("zstd-dump", 2), ("zstd-1", 0), ("zstd-19", 1)])
def test_every_compression_setting_restores_the_same_rows(scratch_db, tmp_path, compression, threads):
    store = BackupStore(local_dir=str(tmp_path / compression), compression=compression, zstd_threads=threads)
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    assert m["compression"] == compression and m["verified"]
    target = f"c_{time.time_ns() % 10**8}"
    backups.restore_into(PG, store, m, scratch_db, target, log=print)
    try:
        assert PG.table_row_counts(scratch_db, target) == m["table_counts"]
    finally:
        backups.drop_database(PG, scratch_db, target)


@pytest.mark.parametrize("compression,threads,named", [("gzip", 2, "compression"), ("zstd-0", 2, "compression"),
                                                       ("zstd-20", 2, "compression"), ("zstd-dump", -1, "zstd_threads")])
def test_bad_compression_setting_fails_before_anything_is_dumped(scratch_db, tmp_path, compression, threads, named):
    store = BackupStore(local_dir=str(tmp_path / "store"), compression=compression, zstd_threads=threads)
    with pytest.raises(StoreError, match=named):
        backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    assert files_in(store) == []


def test_truncated_or_corrupted_backup_fails_verification(scratch_db, store):
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    dump = Path(store.local_dir) / "backups" / m["scope"] / m["id"] / "dump.pgc.zst"
    data = dump.read_bytes()
    dump.write_bytes(data[: len(data) // 2])
    with pytest.raises(backups.BackupError, match="unreadable|truncated|sha256|could not read"):
        backups.verify_stored(store, PG, m["scope"], m["id"], m["sha256"])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    dump.write_bytes(bytes(flipped))
    with pytest.raises(backups.BackupError):
        backups.verify_stored(store, PG, m["scope"], m["id"], m["sha256"])


def _manifest(bid: str, finished: float, trigger="nightly", verified=True) -> dict:
    return {"id": bid, "finished_at": finished, "trigger": trigger, "verified": verified}


def test_retention_gfs_keeps_daily_weekly_monthly_newest_and_floor():
    day = 86400.0
    now = 1_800_000_000.0
    ms = [_manifest(f"b{i:03d}", now - i * day) for i in range(0, 400)]  # one backup a day for 400 days
    plan = backups.plan_retention(ms, backups.RetentionPolicy(daily=7, weekly=4, monthly=6, floor=3, keep_pre_release=0), now=now)
    kept = set(plan.keep)
    assert "b000" in kept and {f"b{i:03d}" for i in range(7)} <= kept
    assert 7 <= len(kept) <= 7 + 4 + 6
    assert len(plan.delete) == 400 - len(kept)
    oldest_kept = max(int(k[1:]) for k in kept)
    assert 120 <= oldest_kept <= 185  # the newest backup of the month five months back


def test_retention_never_counts_unverified_and_respects_the_floor():
    now = 1_800_000_000.0
    ms = [_manifest("good-old", now - 90 * 86400), _manifest("bad1", now - 100, verified=False),
          _manifest("bad2", now - 50, verified=False)]
    plan = backups.plan_retention(ms, backups.RetentionPolicy(daily=0, weekly=0, monthly=0, floor=1), now=now)
    assert plan.keep == {"good-old": ["newest verified", "floor (1 newest)"]} and plan.delete == []


def test_retention_keeps_pre_release_backups():
    now = 1_800_000_000.0
    ms = [_manifest(f"n{i}", now - i * 3600) for i in range(10)] + [_manifest("pre", now - 5 * 3600 - 1, trigger="pre-release")]
    plan = backups.plan_retention(ms, backups.RetentionPolicy(daily=1, weekly=0, monthly=0, floor=1, keep_pre_release=1), now=now)
    assert "pre" in plan.keep and "n0" in plan.keep and "n5" in plan.delete


def backup_run_config(environment: str, **retention) -> dict:
    return {"ops": {"backup_target": {"config": {"environment": environment, "trigger": "nightly"}},
                    "prune_backups": {"config": retention}}}


def test_backup_job_materializes_asset_and_prunes_only_after_verified_backup(scratch_db, store, instance, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", scratch_db)
    defs = make_defs(backup_store=store)
    job = defs.get_job_def("backup")
    results = [job.execute_in_process(run_config=backup_run_config("bk", floor=2, daily=1, weekly=0, monthly=0, dry_run=True),
                                      instance=instance) for _ in range(3)]
    assert all(r.success for r in results)
    scope = "bk/" + ConnInfo.parse(scratch_db).database
    assert len(store.manifests(scope)) == 3  # dry run deleted nothing
    assert results[-1].output_for_node("prune_backups")["would_delete"]
    mats = instance.fetch_materializations(dg.AssetKey(["backups", "bk", ConnInfo.parse(scratch_db).database]), limit=10).records
    assert len(mats) == 3
    md = mats[0].asset_materialization.metadata
    assert {"size_bytes", "sha256", "duration_s", "mb_per_s", "location"} <= set(md)
    r = job.execute_in_process(run_config=backup_run_config("bk", floor=2, daily=1, weekly=0, monthly=0), instance=instance)
    assert r.success and len(store.manifests(scope)) == 2  # floor 2
    # A failing backup (database gone) never reaches pruning.
    monkeypatch.setenv("DATABASE_URL", ConnInfo.parse(scratch_db).url("gone_db"))
    r = job.execute_in_process(run_config=backup_run_config("bk", floor=1, daily=0, weekly=0, monthly=0), instance=instance,
                               raise_on_error=False)
    assert not r.success
    assert [e.step_key for e in r.get_step_failure_events()] == ["backup_database"]
    assert len(store.manifests(scope)) == 2


def test_restore_drill_passes_on_good_backup_and_catches_corruption(scratch_db, store, instance, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", scratch_db)
    defs = make_defs(backup_store=store)
    assert defs.get_job_def("backup").execute_in_process(run_config=backup_run_config("dr"), instance=instance).success
    drill = defs.get_job_def("restore_drill")
    cfg = {"ops": {"backup_target": {"config": {"environment": "dr"}}}}
    r = drill.execute_in_process(run_config=cfg, instance=instance)
    assert r.success
    out = r.output_for_node("drill_newest_backup")
    assert out["count_mismatches"] == [] and out["rows"] == 25000 and out["timing"]["restore_s"] > 0
    with psycopg.connect(scratch_db, autocommit=True) as c:  # scratch database dropped
        assert not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (out["scratch_database"],)).fetchone()
    scope = "dr/" + ConnInfo.parse(scratch_db).database
    m = store.manifests(scope)[0]
    dump = Path(store.local_dir) / "backups" / scope / m["id"] / "dump.pgc.zst"
    data = bytearray(dump.read_bytes())
    data[-100] ^= 0xFF
    dump.write_bytes(bytes(data))
    r = drill.execute_in_process(run_config=cfg, instance=instance, raise_on_error=False)
    assert not r.success
    assert "corrupted" in r.get_step_failure_events()[0].step_failure_data.error.message


def test_restore_never_touches_live_database_without_confirmation(scratch_db, store, instance, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", scratch_db)
    defs = make_defs(backup_store=store)
    assert defs.get_job_def("backup").execute_in_process(run_config=backup_run_config("rs"), instance=instance).success
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute("DELETE FROM orders WHERE id > 100")  # the "accident"
    live = ConnInfo.parse(scratch_db).database
    restore = defs.get_job_def("restore_database")
    base = {"environment": "rs"}
    # switch_over without the typed confirmation: refused before anything happens
    r = restore.execute_in_process(run_config={"ops": {"restore_into_new_database": {"config": {**base, "switch_over": True}}}},
                                   instance=instance, raise_on_error=False)
    assert not r.success and "confirm_database" in r.get_step_failure_events()[0].step_failure_data.error.message
    # without switch_over: restored beside, live untouched
    r = restore.execute_in_process(run_config={"ops": {"restore_into_new_database": {"config": base}}}, instance=instance)
    out = r.output_for_node("restore_into_new_database")
    assert not out["switched"] and out["data_loss_window_s"] >= 0
    assert PG.table_row_counts(scratch_db)["public.orders"] == 100
    assert PG.table_row_counts(scratch_db, out["restored_database"])["public.orders"] == 20000
    # with confirmation: safety backup of the live database first, then the swap
    r = restore.execute_in_process(
        run_config={"ops": {"restore_into_new_database": {"config": {**base, "switch_over": True, "confirm_database": live}}}},
        instance=instance)
    out = r.output_for_node("restore_into_new_database")
    assert out["switched"] and out["safety_backup_id"]
    assert PG.table_row_counts(scratch_db)["public.orders"] == 20000
    assert PG.table_row_counts(scratch_db, out["previous_database"])["public.orders"] == 100
    safety = [m for m in store.manifests("rs/" + live) if m["id"] == out["safety_backup_id"]][0]
    assert safety["trigger"] == "safety" and safety["table_counts"]["public.orders"] == 100


AWKWARD = ["\\.", "a\\", "a\\\n\\.", "line1\nline2", "tab\there", "\\N", "", "ünïcödé ✓", "x" * 5000, "end\\."]


@pytest.mark.parametrize("chunk", [3, 4, 7, 1 << 20])
def test_restore_reproduces_every_value_whatever_the_read_size(scratch_db, store, monkeypatch, chunk):
    """The streamed restore cuts pg_restore's COPY text into tables itself and finds each end marker: values that
    look like the marker, escapes, empty tables, partitions, NULLs and sequences must come back byte for byte,
    with reads as small as the marker. With 1 MB reads the memory budget is smaller than a read, so every
    table's rows go through a temp file instead of memory."""
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute('CREATE TABLE "odd name (x)" (id int PRIMARY KEY, v text, b bytea)')
        c.cursor().executemany('INSERT INTO "odd name (x)" VALUES (%s, %s, %s)',
                      [(i, v, v.encode()) for i, v in enumerate(AWKWARD)] + [(len(AWKWARD), None, None)])
        c.execute("CREATE TABLE empty_one (id int)")
        c.execute("CREATE TABLE measures (day date NOT NULL, n int) PARTITION BY RANGE (day)")
        c.execute("CREATE TABLE measures_2026 PARTITION OF measures FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
        c.execute("INSERT INTO measures SELECT '2026-01-01'::date + i % 300, i FROM generate_series(1, 1000) i")
        c.execute("SELECT setval('orders_id_seq', 424242)")
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    monkeypatch.setattr(backups.common, "CHUNK", chunk)
    monkeypatch.setattr(backups.streamed, "ROWS_IN_MEMORY", 64 << 10 if chunk > 7 else 8 << 20)
    target = f"l_{time.time_ns() % 10**8}"
    result = backups.restore_into(PG, store, m, scratch_db, target, jobs=2, log=print)
    try:
        assert result["path"] == "streamed" and result["tables_loaded"] == 5  # measures has no rows of its own
        restored = ConnInfo.parse(scratch_db).url(target)
        with psycopg.connect(scratch_db) as a, psycopg.connect(restored) as b:
            for q in ('SELECT * FROM "odd name (x)" ORDER BY id', "SELECT * FROM measures ORDER BY n",
                      "SELECT count(*) FROM empty_one", "SELECT last_value FROM orders_id_seq",
                      "SELECT * FROM orders ORDER BY id", "SELECT indexname FROM pg_indexes ORDER BY 1",
                      "SELECT conname FROM pg_constraint WHERE contype = 'f' ORDER BY 1"):
                assert a.execute(q).fetchall() == b.execute(q).fetchall(), q
            # Loaded frozen (COPY FREEZE after TRUNCATE in the same transaction): pages are all-visible at once,
            # where a plain COPY leaves the visibility map empty until a VACUUM.
            # (A page a COPY batch started on a partly filled page is the exception: a few per table. PostgreSQL 16
            # also extends a table by several empty pages at a time while it bulk-loads: only pages with rows count.)
            for table in ("orders", "customers"):
                visible = b.execute("SELECT relallvisible FROM pg_class WHERE relname = %s", (table,)).fetchone()[0]
                used = b.execute(f"SELECT count(DISTINCT (ctid::text::point)[0]) FROM {table}").fetchone()[0]
                assert used > 20 and visible >= 0.95 * used, (table, visible, used)
            assert b.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'orders'").fetchone()[0] > 0  # analyzed
        assert backups.compare_counts(m["table_counts"], PG.table_row_counts(scratch_db, target)) == []
        assert not list(Path(tempfile.gettempdir()).glob("ops-restore-*/data-*.copy"))  # temp files gone
    finally:
        backups.drop_database(PG, scratch_db, target)


def test_restore_fails_cleanly_when_a_table_cannot_be_loaded(scratch_db, store, tmp_path):
    """A pg_restore that dies mid-data (here: a wrapper that stops after part of the stream) fails the restore with
    its message and drops the half-restored database."""
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    # the real pg_restore, cut off after 300 kB of a table's data, then an error
    pg = _wrapper_bin(tmp_path, '''case "$*" in
  *--file=-*) "$REAL" "$@" | head -c 300000; echo "pg_restore: error: simulated failure" >&2; exit 1 ;;
  *) exec "$REAL" "$@" ;;
esac''', wrapped="pg_restore")
    target = f"f_{time.time_ns() % 10**8}"
    with pytest.raises(backups.BackupError) as err:
        backups.restore_into(pg, store, m, scratch_db, target, jobs=2, log=print)
    assert "simulated failure" in str(err.value) and "public.orders" in str(err.value)
    assert not PG.database_exists(scratch_db, target)


def _schema(url: str) -> list[str]:
    out = subprocess.run([PG.binary("pg_dump"), "--schema-only", "--no-owner", "--no-privileges"],
                         env=PG.tool_env(url), capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line and not line.startswith(("--", "\\restrict", "\\unrestrict"))]


def test_streamed_restore_reproduces_the_schema_and_analyzes_every_table(scratch_db, store):
    """Indexes and constraints run as soon as their tables are loaded, the rest of post-data (triggers, comments,
    materialized view data, partition index attachments, NOT VALID checks, a foreign key to a partitioned table
    whose partitions load separately) at the end: the restored schema must be the source's, line for line, the
    materialized view must hold data, and every table must have statistics."""
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute("""
          CREATE TABLE regions (code text PRIMARY KEY, name text NOT NULL);
          INSERT INTO regions VALUES ('eu', 'Europe'), ('us', 'Americas');
          CREATE TABLE sales (region text NOT NULL REFERENCES regions (code), day date NOT NULL,
                              amount numeric NOT NULL, PRIMARY KEY (region, day)) PARTITION BY LIST (region);
          CREATE TABLE sales_eu PARTITION OF sales FOR VALUES IN ('eu');
          CREATE TABLE sales_us PARTITION OF sales FOR VALUES IN ('us');
          INSERT INTO sales SELECT CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, date '2026-01-01' + i / 2, i
            FROM generate_series(0, 3999) i;
          CREATE INDEX sales_amount_idx ON sales (amount);
          COMMENT ON INDEX sales_amount_idx IS 'for reports';
          CREATE TABLE sale_notes (region text, day date, note text, FOREIGN KEY (region, day) REFERENCES sales);
          INSERT INTO sale_notes SELECT region, day, 'n' FROM sales WHERE amount < 100;
          CREATE MATERIALIZED VIEW sales_by_region AS SELECT region, sum(amount) AS total FROM sales GROUP BY region;
          CREATE UNIQUE INDEX ON sales_by_region (region);
          CREATE INDEX orders_note_prefix_idx ON orders (left(note, 4));
          ALTER TABLE orders ADD CONSTRAINT orders_positive CHECK (id > 0) NOT VALID;
          CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
          CREATE TRIGGER sales_eu_keep BEFORE UPDATE ON sales_eu FOR EACH ROW EXECUTE FUNCTION keep();
          COMMENT ON INDEX orders_customer_idx IS 'comment on an index built early';
          COMMENT ON CONSTRAINT orders_pkey ON orders IS 'comment on a constraint added early';
          CREATE TABLE a_parent (x int);
          CREATE TABLE z_child () INHERITS (a_parent);
          INSERT INTO a_parent VALUES (1);
          INSERT INTO z_child VALUES (-1), (5);
          ALTER TABLE a_parent ADD CONSTRAINT positive CHECK (x > 0) NOT VALID;  -- checks z_child's rows too
          CREATE TABLE m_between (id int, t text);  -- loads between a_parent and z_child
          INSERT INTO m_between SELECT i, md5(i::text) FROM generate_series(1, 100000) i;
        """)
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    target = f"s_{time.time_ns() % 10**8}"
    result = backups.restore_into(PG, store, m, scratch_db, target, jobs=2, log=print)
    try:
        assert result["path"] == "streamed"
        restored = ConnInfo.parse(scratch_db).url(target)
        assert _schema(restored) == _schema(scratch_db)
        with psycopg.connect(scratch_db) as a, psycopg.connect(restored) as b:
            q = "SELECT * FROM sales_by_region ORDER BY region"
            assert b.execute(q).fetchall() == a.execute(q).fetchall() != []
            unanalyzed = b.execute("""SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                       WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm', 'p')
                                         AND NOT EXISTS (SELECT FROM pg_stats s WHERE s.schemaname = 'public'
                                                                                  AND s.tablename = c.relname)
                                         AND c.relname <> 'empty_one'""").fetchall()
            assert unanalyzed == []
        assert backups.compare_counts(m["table_counts"], PG.table_row_counts(scratch_db, target)) == []
    finally:
        backups.drop_database(PG, scratch_db, target)


def test_same_names_in_two_schemas_keep_their_own_order(scratch_db, store):
    """Constraints and indexes are told apart by their archive entries, not their names: each schema's foreign
    key waits for its own schema's primary key."""
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute("""
          CREATE SCHEMA a; CREATE SCHEMA b;
          CREATE TABLE a.orders (id int PRIMARY KEY);
          CREATE TABLE a.order_items (id int CONSTRAINT order_items_pkey PRIMARY KEY, order_id int REFERENCES a.orders);
          INSERT INTO a.orders SELECT generate_series(1, 1000);
          INSERT INTO a.order_items SELECT i, 1 + i % 1000 FROM generate_series(1, 100000) i;
          CREATE TABLE b.orders (id int PRIMARY KEY);
          CREATE TABLE b.order_items (id int CONSTRAINT order_items_pkey PRIMARY KEY, order_id int REFERENCES b.orders);
          INSERT INTO b.orders SELECT generate_series(1, 10);
          INSERT INTO b.order_items SELECT i, 1 + i % 10 FROM generate_series(1, 50) i;
        """)
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    target = f"n_{time.time_ns() % 10**8}"
    try:
        backups.restore_into(PG, store, m, scratch_db, target, jobs=2, log=print)
        assert _schema(ConnInfo.parse(scratch_db).url(target)) == _schema(scratch_db)
    finally:
        backups.drop_database(PG, scratch_db, target)


def test_rows_already_in_a_table_before_its_load_are_kept(scratch_db, store, tmp_path):
    """An extension's configuration table is filled by CREATE EXTENSION (pre-data) and holds the user's rows in
    the dump: the load must not empty it first. Here pre-data is followed by an insert into orders, as such an
    extension would; that row must survive next to the dumped ones."""
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    pg = _wrapper_bin(tmp_path, '''case "$*" in
  *--section=pre-data*) "$REAL" "$@" && "$(dirname "$REAL")/psql" -qc "INSERT INTO orders (id, total) VALUES (-7, 1)" ;;
  *) exec "$REAL" "$@" ;;
esac''', wrapped="pg_restore")
    target = f"k_{time.time_ns() % 10**8}"
    try:
        backups.restore_into(pg, store, m, scratch_db, target, jobs=2, log=print)
        with psycopg.connect(ConnInfo.parse(scratch_db).url(target)) as b:
            assert b.execute("SELECT count(*), min(id) FROM orders").fetchone() == (m["table_counts"]["public.orders"] + 1, -7)
    finally:
        backups.drop_database(PG, scratch_db, target)


def test_restore_of_a_latin1_database_goes_through_pg_restore(services, store):
    """The streamed path reads names and rows as UTF-8; an archive in another encoding goes to pg_restore."""
    name = f"t_lat_{time.time_ns() % 10**8}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    url = ConnInfo.parse(services.database_url).url(name)
    target = f"lt_{time.time_ns() % 10**8}"
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute('CREATE TABLE "tëst" (id int PRIMARY KEY, v text)')
            c.execute("INSERT INTO \"tëst\" VALUES (1, 'é')")
        m = backups.take_backup(PG, store, url, trigger="manual", environment="test", log=print)
        result = backups.restore_into(PG, store, m, url, target, jobs=2, log=print)
        assert result["path"] == "pg_restore"
        with psycopg.connect(ConnInfo.parse(url).url(target)) as b:
            assert b.execute('SELECT v FROM "tëst"').fetchall() == [("é",)]
    finally:
        backups.drop_database(PG, url, target)
        backups.drop_database(PG, services.database_url, name)


def test_spool_writes_in_full_and_reads_back_in_order(tmp_path, monkeypatch):
    """Rows beyond the memory budget go to a temp file; a short write (a nearly full disk) is continued, and a
    reader that runs behind gets every byte in order."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    spool = backups.spool.Spool(str(tmp_path / "t.copy"), backups.spool.Budget(10))
    blocks = [b"1\tone\n", b"2\ttwo\n" * 50, b"3\tthree\n"]
    for block in blocks:
        spool.write(block)
    spool.finish()
    assert b"".join(spool.chunks(threading.Event())) == b"".join(blocks)
    assert not (tmp_path / "t.copy").exists()


def test_restore_of_large_objects_goes_through_pg_restore(scratch_db, store):
    """Large objects are data blocks the streamed path does not load: such a backup is restored by pg_restore -j
    from a temp file (sha256 checked), its large objects and rows intact."""
    blob = b"\x00large object\xff" * 10000
    with psycopg.connect(scratch_db, autocommit=True) as c:
        oid = c.execute("SELECT lo_from_bytea(0, %s)", (blob,)).fetchone()[0]
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    target = f"o_{time.time_ns() % 10**8}"
    result = backups.restore_into(PG, store, m, scratch_db, target, jobs=2, log=print)
    try:
        assert result["path"] == "pg_restore"
        with psycopg.connect(ConnInfo.parse(scratch_db).url(target)) as b:
            assert b.execute("SELECT lo_get(%s)", (oid,)).fetchone()[0] == blob
            assert b.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'orders'").fetchone()[0] > 0
        assert backups.compare_counts(m["table_counts"], PG.table_row_counts(scratch_db, target)) == []
    finally:
        backups.drop_database(PG, scratch_db, target)


class _RacedPostgres(PostgresResource):
    """Says the target does not exist although it does: another restore created it after our check."""

    def database_exists(self, url: str, database: str) -> bool:
        return False


def test_restore_never_drops_a_database_it_did_not_create(scratch_db, store):
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    theirs = f"raced_{time.time_ns() % 10**8}"
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {theirs}")
    try:
        with psycopg.connect(ConnInfo.parse(scratch_db).url(theirs), autocommit=True) as c:
            c.execute("CREATE TABLE precious (id int)")
        with pytest.raises(psycopg.errors.DuplicateDatabase):
            backups.restore_into(_RacedPostgres(), store, m, scratch_db, theirs, log=print)
        assert PG.table_row_counts(scratch_db, theirs) == {"public.precious": 0}
    finally:
        backups.drop_database(PG, scratch_db, theirs)


def test_switch_fails_clearly_and_renames_nothing_when_a_session_cannot_be_closed(scratch_db, services):
    """An app role may not terminate a superuser's session (nor an autovacuum worker). The switch then names who
    is connected, renames nothing and leaves the live database accepting connections."""
    from ops_pipeline.backup import switch_databases

    info = ConnInfo.parse(scratch_db)
    live, restored = info.database, f"{info.database}_r"
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {restored}")
    admin_on_live = psycopg.connect(ConnInfo.parse(services.admin_database_url).url(live), autocommit=True)
    try:
        with pytest.raises(DatabaseError) as err:
            switch_databases(PG, scratch_db, live=live, restored=restored, aside=f"{live}_aside", attempts=1)
        # (an autovacuum worker of the fresh database may be listed too, as "a server process")
        assert "still has sessions this role may not close: " in str(err.value), err.value
        assert "role postgres" in str(err.value), err.value
        assert "Nothing was renamed" in str(err.value)
    finally:
        admin_on_live.close()
    assert PG.database_exists(scratch_db, live) and PG.database_exists(scratch_db, restored)
    assert not PG.database_exists(scratch_db, f"{live}_aside")
    with psycopg.connect(scratch_db) as c:  # still accepting connections
        assert c.execute("SELECT count(*) FROM orders").fetchone()[0] == 20000


def test_fk_checks_use_a_merge_join_only_where_an_index_leads_with_the_referencing_columns(scratch_db):
    """Adding a foreign key scans both tables; the restore turns hash joins off for that check only when the
    referencing columns lead an index (orders.customer_id: orders_customer_idx), never for an unindexed one."""
    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute('CREATE TABLE "Notes" (id int, "Customer id" bigint, body text)')
        c.execute('CREATE INDEX ON "Notes" (body, "Customer id")')  # the column is in an index, not leading it
        indexed = "ALTER TABLE ONLY public.orders\n    ADD CONSTRAINT f FOREIGN KEY (customer_id) REFERENCES public.customers(id);"
        unindexed = ('ALTER TABLE ONLY public."Notes"\n    ADD CONSTRAINT g FOREIGN KEY ("Customer id") '
                     "REFERENCES public.customers(id);")
        assert backups.fk_check_settings(c, indexed) == {"enable_hashjoin": "off"}
        assert backups.fk_check_settings(c, unindexed) == {}
        c.execute('CREATE INDEX ON "Notes" ("Customer id", id)')
        assert backups.fk_check_settings(c, unindexed) == {"enable_hashjoin": "off"}
        assert backups.fk_check_settings(c, "ALTER TABLE ONLY public.orders ADD CONSTRAINT c CHECK (id > 0);") == {}


class _Interrupted(Exception):
    pass


def test_an_interrupted_restore_stops_its_workers_and_drops_its_database(scratch_db, store):
    """An exception in the restoring thread (a terminated run, Ctrl-C) stops the workers at once, cancels what they
    run, kills pg_restore and drops the half-restored database, instead of finishing the restore first."""
    import signal

    with psycopg.connect(scratch_db, autocommit=True) as c:
        c.execute("CREATE TABLE big (id int, t text)")
        c.execute("INSERT INTO big SELECT i, md5(i::text) || md5((-i)::text) FROM generate_series(1, 1500000) i")
        c.execute("CREATE INDEX ON big (t)")
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    target = f"x_{time.time_ns() % 10**8}"

    def interrupt(*_):
        raise _Interrupted()

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)  # the whole restore takes about 4 s here
    t0 = time.monotonic()
    try:
        with pytest.raises(_Interrupted):
            backups.restore_into(PG, store, m, scratch_db, target, jobs=2, log=print)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    stopped_after = time.monotonic() - t0
    assert not PG.database_exists(scratch_db, target)
    assert stopped_after < 2.5, stopped_after  # 0.9 s measured; 4 s before workers were stopped
    procs = subprocess.run(["pgrep", "-f", "pg_restore --data-only"], capture_output=True, text=True).stdout
    assert procs.strip() == ""
