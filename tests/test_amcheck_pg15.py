"""pg_amcheck in the restore drill, for real. The bundled PostgreSQL 16 (pgserver) has no contrib modules, so
its drills record "amcheck extension unavailable"; this machine's PostgreSQL 15 packages ship both the amcheck
extension and pg_amcheck. These tests start a throwaway PostgreSQL 15 cluster (as the unprivileged `opspg` user
when run as root: initdb refuses root), back a database up with that server's own pg_dump, restore it into a
scratch database as the drill does, and run the drill's amcheck on it: clean, then with an index page corrupted
on disk."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from ops_pipeline import backups
from ops_pipeline.local_stack import _ensure_system_user, free_port
from ops_pipeline.resources.backup_store import BackupStore
from ops_pipeline.resources.postgres import ConnInfo, PostgresResource

pytestmark = pytest.mark.xdist_group("pg15")


def amcheck_capable_bindir() -> Path | None:
    """A PostgreSQL bin folder with initdb, pg_ctl and pg_amcheck whose share folder has the amcheck extension."""
    candidates = [os.environ.get("OPS_TEST_AMCHECK_PG_BIN", "")]
    if shutil.which("pg_config"):
        candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    candidates += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    for cand in filter(None, candidates):
        b = Path(cand)
        if not all((b / tool).exists() for tool in ("initdb", "pg_ctl", "pg_amcheck", "pg_config")):
            continue
        share = subprocess.run([str(b / "pg_config"), "--sharedir"], capture_output=True, text=True).stdout.strip()
        if (Path(share) / "extension" / "amcheck.control").exists():
            return b
    return None


@pytest.fixture(scope="module")
def amcheck_server():
    bindir = amcheck_capable_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL with the amcheck extension and pg_amcheck on this machine (Debian: postgresql-15)")
    root = Path(tempfile.mkdtemp(prefix="ops-amcheck-pg-"))
    root.chmod(0o755)
    run_as: dict = {}
    if os.geteuid() == 0:
        user = _ensure_system_user("opspg")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    password = secrets.token_urlsafe(18)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    data, port = root / "data", free_port()

    def pg_ctl(*args: str) -> None:
        proc = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", *args],
                              capture_output=True, text=True, **run_as)
        assert proc.returncode == 0, proc.stdout + proc.stderr + (root / "server.log").read_text(errors="replace")[-2000:]

    initdb = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                             "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], capture_output=True, text=True, **run_as)
    assert initdb.returncode == 0, initdb.stderr
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl("-o", options, "start")
    try:
        yield SimpleNamespace(url=f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres", bindir=bindir,
                              data=data, restart=lambda: pg_ctl("-o", options, "restart"),
                              stop=lambda: pg_ctl("-m", "fast", "stop"), start=lambda: pg_ctl("-o", options, "start"))
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, **run_as)
        shutil.rmtree(root, ignore_errors=True)


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
