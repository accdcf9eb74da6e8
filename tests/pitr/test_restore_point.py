"""The release's safety point with real pgBackRest and PostgreSQL 15: a named restore point whose WAL is archived,
then a bad migration; the point-in-time restore to that name gives the schema and the rows of that moment, in a
new data folder, while the live server keeps serving the migrated database."""

from __future__ import annotations

import psycopg
import pytest

from ops_pipeline.backup import archiving, pitr
from ops_pipeline.backup.common import BackupError
from ops_pipeline.platform.postgres import ConnInfo

pytestmark = pytest.mark.xdist_group("pg15")


def test_restore_to_the_safety_point_gives_the_schema_and_rows_before_a_bad_migration(archived):
    shop = ConnInfo.parse(archived.url).url("shop")
    with psycopg.connect(archived.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE shop")
    with psycopg.connect(shop, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, note text NOT NULL)")
        conn.execute("INSERT INTO orders (note) SELECT md5(i::text) FROM generate_series(1, 5000) i")

    point = archiving.create_safety_point(archived.url, "release-v2-before", log=print)
    assert point.segment <= archiving.newest_segment(archived.tool)  # its WAL is in the repository already

    with psycopg.connect(shop, autocommit=True) as conn:  # the bad migration, and writes after it
        conn.execute("ALTER TABLE orders DROP COLUMN note")
        conn.execute("ALTER TABLE orders ADD COLUMN total numeric")
        conn.execute("INSERT INTO orders (total) SELECT i FROM generate_series(1, 700) i")
        conn.execute("DELETE FROM orders WHERE id <= 100")
        conn.execute("SELECT pg_switch_wal()")

    restored = pitr.restore(archived.tool, archived.live, archived.url, pitr.Target.parse("name", point.name),
                            log=print, point_lsn=point.lsn)
    try:
        with psycopg.connect(restored.url("shop")) as conn:
            columns = [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                                                  "table_name = 'orders' ORDER BY ordinal_position")]
            rows = conn.execute("SELECT count(*), min(id), max(id) FROM orders").fetchone()
        assert columns == ["id", "note"]
        assert rows == (5000, 1, 5000)
        assert restored.data_dir != str(archived.server.data)
        with psycopg.connect(shop) as conn:  # the live server was not touched
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 5600
    finally:
        restored.discard()


def test_a_safety_point_whose_wal_is_not_archived_fails_naming_the_segment_and_the_archive_failure(archived):
    with psycopg.connect(archived.url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET archive_command = 'false'")  # e.g. a full or unreachable repository
        conn.execute("SELECT pg_reload_conf()")
    with pytest.raises(BackupError) as err:
        archiving.create_safety_point(archived.url, "release-v3-before", log=print, timeout_s=5)
    message = str(err.value)
    assert "with restore point 'release-v3-before' was not archived within 5 s" in message
    assert "the last failure was 0000" in message
    print(message)


def test_bad_targets_are_refused_before_anything_is_restored():
    for kind, value, words in [("time", "yesterday", "not an ISO timestamp"),
                               ("time", "2026-12-04T22:00:00", "no time zone"),
                               ("name", "drop table;", "not a restore point name"),
                               ("latest", "x", "must be empty"),
                               ("lsn", "0/1", "one of latest, time, name")]:
        with pytest.raises(BackupError, match=words):
            pitr.Target.parse(kind, value)
