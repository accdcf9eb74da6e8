"""Point-in-time restore after a crash, with a hole in the archive, and after retention (real PostgreSQL 15 and
pgBackRest): rows are written continuously while the server is killed; the restore to the latest WAL has every
transaction whose commit is in an archived segment (the loss window is printed); a missing segment fails the restore
naming it; expiry never leaves a base backup without the WAL it needs."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from ops_pipeline.backup import archiving, pitr
from ops_pipeline.backup.common import BackupError
from ops_pipeline.backup.pgbackrest import segment_number
from ops_pipeline.platform.postgres import ConnInfo
from tests.pitr.conftest import archiving_server

pytestmark = pytest.mark.xdist_group("pg15")


def _writer(url: str, stop: threading.Event, rows: list) -> None:
    """One row per transaction; after each commit, the WAL insert position (at or past its commit record)."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                rid = conn.execute("INSERT INTO events (at) VALUES (clock_timestamp()) RETURNING id").fetchone()[0]
                lsn = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
                rows.append((rid, lsn, time.time()))
    except psycopg.Error:
        pass  # the server was killed under it


def _kill(server) -> None:
    argv = [f"{server.bindir}/pg_ctl", "-D", str(server.data), "-m", "immediate", "stop"]
    subprocess.run(["runuser", "-u", "opspg", "--", *argv] if os.geteuid() == 0 else argv, check=True,
                   capture_output=True)


def test_restore_to_latest_after_a_crash_loses_nothing_committed_in_archived_wal():
    with archiving_server(archive_timeout_s=1) as a:
        app = ConnInfo.parse(a.url).url("app")
        with psycopg.connect(a.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        with psycopg.connect(app, autocommit=True) as conn:
            conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL, pad text DEFAULT repeat('x', 200))")
        stop, rows = threading.Event(), []
        writer = threading.Thread(target=_writer, args=(app, stop, rows))
        writer.start()
        time.sleep(6)
        _kill(a.server)  # rows are still being written
        stop.set()
        writer.join(10)
        newest = archiving.newest_segment(a.tool)
        assert len(rows) > 100

        restored = pitr.restore(a.tool, a.live, a.url, pitr.Target.parse("latest"), log=print)
        try:
            with psycopg.connect(restored.url("app")) as conn:
                present = {r[0] for r in conn.execute("SELECT id FROM events")}
            must = [r for r in rows if segment_number(r[1]) <= segment_number(newest)]
            lost = [r for r in rows if r[0] not in present]
            assert must and not [r for r in must if r[0] not in present]
            window = (rows[-1][2] - max(r[2] for r in rows if r[0] in present)) if lost else 0.0
            print(f"\nloss window after a crash (archive_timeout 1 s): {len(lost)} of {len(rows)} committed rows, "
                  f"{window:.2f} s of writes; newest archived segment {newest}")
            assert window < 5
        finally:
            restored.discard()


def test_a_missing_wal_segment_fails_the_restore_naming_it(archived, monkeypatch):
    app = ConnInfo.parse(archived.url).url("postgres")
    with psycopg.connect(app, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        for i in range(4):
            conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
            conn.execute("SELECT pg_switch_wal()")
    archived.tool.check()
    start = archived.tool.info()["backup"][-1]["archive"]["stop"]
    tl, n = segment_number(start)
    victim = f"{tl:08X}{(n + 2) // 0x100:08X}{(n + 2) % 0x100:08X}"
    [path] = list(Path(archived.repo).glob(f"archive/test/*/*/{victim}-*"))
    path.rename(path.with_name("moved-away"))
    parent = os.path.dirname(str(archived.server.data))
    before = sorted(os.listdir(parent))

    with pytest.raises(BackupError, match=f"WAL missing from the repository after base backup .*: {victim}"):
        pitr.restore(archived.tool, archived.live, archived.url, pitr.Target.parse("latest"), log=print)
    assert sorted(os.listdir(parent)) == before  # nothing restored, nothing left

    # Without the check before the restore, the one after it still refuses a recovery that ended short.
    monkeypatch.setattr(archiving, "wal_gaps", lambda *a, **k: [])
    with pytest.raises(BackupError, match="recovery ended at .* but the repository holds WAL up to"):
        pitr.restore(archived.tool, archived.live, archived.url, pitr.Target.parse("latest"), log=print)
    assert sorted(os.listdir(parent)) == before


def test_retention_keeps_every_base_backup_with_its_wal():
    with archiving_server(retention_full=2) as a:
        db = ConnInfo.parse(a.url).url("postgres")
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id serial, at timestamptz DEFAULT clock_timestamp())")
        first = a.tool.info()["backup"][0]["label"]
        marks = []
        for round_ in range(3):
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute("INSERT INTO t (id) SELECT generate_series(1, 100)")
                conn.execute("SELECT pg_switch_wal()")
            time.sleep(1.1)
            marks.append((time.time(), (round_ + 1) * 100))
            time.sleep(1.1)
            a.tool.backup("full" if round_ != 1 else "diff")
        info = a.tool.info()
        labels = [b["label"] for b in info["backup"]]
        assert first not in labels and len([b for b in info["backup"] if b["type"] == "full"]) == 2
        oldest = info["backup"][0]
        assert info["archive"][0]["min"] == oldest["archive"]["start"]  # WAL no kept backup needs is gone
        for b in info["backup"]:
            assert archiving.wal_gaps(a.tool, b["archive"]["start"]) == [], b["label"]

        # The oldest kept backup still restores, to a moment before the next one
        from datetime import UTC, datetime
        when, rows = next(m for m in marks if m[0] > oldest["timestamp"]["stop"])
        target = pitr.Target.parse("time", datetime.fromtimestamp(when, UTC).isoformat())
        restored = pitr.restore(a.tool, a.live, a.url, target, log=print)
        try:
            assert restored.recovery["backup_set"] == oldest["label"]
            with psycopg.connect(restored.url("postgres")) as conn:
                assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == rows
        finally:
            restored.discard()
