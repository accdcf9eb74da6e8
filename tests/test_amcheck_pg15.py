"""pg_amcheck in the restore drill, for real. The bundled PostgreSQL 16 (pgserver) has no contrib modules, so
its drills record "amcheck extension unavailable"; this machine's PostgreSQL 15 packages ship both the amcheck
extension and pg_amcheck. These tests start a throwaway PostgreSQL 15 cluster (tests/pg15.py), back a database
up with that server's own pg_dump, restore it into a scratch database as the drill does, and run the drill's
amcheck on it: clean, then with an index page corrupted on disk."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from ops_pipeline import backup as backups
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource
from tests import pg15

pytestmark = pytest.mark.xdist_group("pg15")


def amcheck_capable_bindir() -> Path | None:
    """A PostgreSQL bin folder with initdb, pg_ctl and pg_amcheck whose share folder has the amcheck extension."""
    return pg15.bindir_with("amcheck", tools=("pg_amcheck",))


@pytest.fixture(scope="module")
def amcheck_server():
    bindir = amcheck_capable_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL with the amcheck extension and pg_amcheck on this machine (Debian: postgresql-15)")
    with pg15.cluster(bindir, prefix="ops-amcheck-pg-") as server:
        yield server


def test_drill_amcheck_passes_on_a_clean_restore_and_catches_a_corrupted_index(amcheck_server, tmp_path):
    pg = PostgresResource(bin_dir=str(amcheck_server.bindir))
    source = ConnInfo.parse(amcheck_server.url).url("shop")
    with psycopg.connect(amcheck_server.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE shop")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, note text)")
        conn.execute("INSERT INTO orders (customer_id, note) SELECT i % 997, md5(i::text) FROM generate_series(1, 50000) i")
        conn.execute("CREATE INDEX orders_customer_idx ON orders (customer_id)")
    store = BackupStore(local_dir=str(tmp_path / "store"))
    manifest = backups.take_backup(pg, store, source, trigger="manual", environment="pg15", log=print)
    backups.restore_into(pg, store, manifest, source, "shop_drill", log=print)

    clean = backups.amcheck(pg, source, "shop_drill", print)
    assert clean["ran"] and clean["ok"], clean

    # Corrupt the index on disk (server stopped): zero the line pointers of its first leaf page.
    with psycopg.connect(ConnInfo.parse(source).url("shop_drill"), autocommit=True) as conn:
        relpath = conn.execute("SELECT pg_relation_filepath('orders_customer_idx')").fetchone()[0]
    amcheck_server.stop()
    index_file = amcheck_server.data / relpath
    with open(index_file, "r+b") as f:
        f.seek(8192 + 24)  # block 1 (block 0 is the metapage), just past the page header
        f.write(b"\0" * 400)
    amcheck_server.start()

    corrupted = backups.amcheck(pg, source, "shop_drill", print)
    assert corrupted["ran"] and not corrupted["ok"], corrupted
    assert "shop_drill.public.orders_customer_idx" in corrupted["output"], corrupted["output"]
    backups.drop_database(pg, source, "shop_drill")
