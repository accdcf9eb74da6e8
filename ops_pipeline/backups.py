"""PostgreSQL backups that can be trusted: streamed, checksummed, verified, rotated safely, restorable.

One backup: `pg_dump -Fc -Z0` (custom format, uncompressed) is streamed through zstd into the store,
with size and sha256 computed in-stream (memory stays flat whatever the database size). The dump runs
on a snapshot exported by a transaction that also counts every table's rows, so the counts in the
manifest are exactly what the dump holds. After the upload the stored object is read back in full:
its sha256 must match and `pg_restore` must parse every byte of it. Only then is the manifest written,
and only a backup with a manifest exists.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import platform
import queue
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
import zstandard
from psycopg import sql

from ops_pipeline.pg_archive import (
    SECTION_DATA,
    SECTION_NONE,
    SECTION_POST_DATA,
    SECTION_PRE_DATA,
    ArchiveError,
    ArchiveReader,
    TocEntry,
    UnsupportedArchive,
)
from ops_pipeline.redaction import Redactor
from ops_pipeline.resources.backup_store import (
    DUMP_NAME,
    MANIFEST_NAME,
    BackupStore,
    StoreError,
)
from ops_pipeline.resources.postgres import ConnInfo, DatabaseError, PostgresResource

LogFn = Callable[[str], None]
CHUNK = 1 << 20
MANIFEST_VERSION = 1
TRIGGERS = ("nightly", "pre-release", "manual", "safety")


class BackupError(RuntimeError):
    pass


def _major(version_num: int) -> int:
    return version_num // 10000


def store_scope(environment: str, database: str) -> str:
    """Backups of each environment's database live apart: retention never crosses environments."""
    return f"{environment}/{database}"


def new_backup_id(database: str, trigger: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{trigger}-{uuid.uuid4().hex[:6]}"


def _stderr_reader(proc: subprocess.Popen, sink: list[str]) -> threading.Thread:
    def run() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sink.append(line.decode(errors="replace").rstrip())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def preflight(postgres: PostgresResource, url: str) -> dict:
    """Server reachable, database present, pg_dump new enough. Raises BackupError with a clear reason."""
    info = ConnInfo.parse(url)
    try:
        server = postgres.server_version_num(url)
    except DatabaseError as exc:
        raise BackupError(f"backup of {info.display} impossible: {exc}") from None
    client = postgres.client_version_num("pg_dump")
    if _major(client) < _major(server):
        raise BackupError(
            f"pg_dump {_major(client)} is older than the server (PostgreSQL {_major(server)}); it would abort with "
            f"'server version mismatch'. Point the postgres resource's bin_dir at PostgreSQL {_major(server)}+ client tools."
        )
    return {"server_version_num": server, "pg_dump_version_num": client}


def _migrations(conn: psycopg.Connection, table: str) -> list[str]:
    if not table:
        return []
    try:
        exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
        if not exists:
            return []
        return [r[0] for r in conn.execute(f"SELECT name FROM {sql.Identifier(table).as_string(conn)} ORDER BY run_on, id")]
    except psycopg.Error:
        return []


def take_backup(
    postgres: PostgresResource,
    store: BackupStore,
    url: str,
    *,
    trigger: str,
    log: LogFn,
    redactor: Redactor | None = None,
    environment: str,
    release_version: str = "",
    migrations_table: str = "pgmigrations",
    verify: bool = True,
) -> dict:
    """Dump `url`'s database into the store and verify it. Returns the manifest (written last)."""
    redact = redactor or Redactor()
    if trigger not in TRIGGERS:
        raise BackupError(f"trigger must be one of {', '.join(TRIGGERS)} (got {trigger!r})")
    info = ConnInfo.parse(url)
    versions = preflight(postgres, url)
    store.validate()
    database = info.database
    scope = store_scope(environment, database)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    backup_id = new_backup_id(database, trigger, started)
    log(f"backup {backup_id} of {info.display} to {store.describe()} (trigger: {trigger})")

    # A repeatable-read transaction exports the snapshot pg_dump uses and counts rows in that same snapshot.
    snap_conn = postgres.connect(url, autocommit=False, application_name=f"ops-pipeline backup {backup_id}")
    counts: dict[str, int] = {}
    count_error: list[str] = []
    stop_counting = threading.Event()
    counter: threading.Thread | None = None
    try:
        snap_conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = snap_conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        migrations = _migrations(snap_conn, migrations_table)
        tables = [r[0] for r in snap_conn.execute(
            """SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables
                WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1""")]

        def count_rows() -> None:
            try:
                for t in tables:
                    if stop_counting.is_set():
                        return
                    counts[t] = snap_conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            except psycopg.Error as exc:
                count_error.append(str(exc).splitlines()[0])

        counter = threading.Thread(target=count_rows, daemon=True)
        argv = [postgres.binary("pg_dump"), "--format=custom", "--compress=0", "--no-password", f"--snapshot={snapshot}",
                "--lock-wait-timeout=60000", "--dbname", info.database]
        # The store first: a read-only, full or missing store fails here, before pg_dump or the counting start.
        writer = store.writer(scope, backup_id, DUMP_NAME)
        proc: subprocess.Popen | None = None
        sha = hashlib.sha256()
        raw_bytes = 0
        head = b""
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    env=postgres.tool_env(url))
            errors: list[str] = []
            err_thread = _stderr_reader(proc, errors)
            counter.start()
            comp = store.compressor().compressobj(size=-1)
            assert proc.stdout is not None
            while data := proc.stdout.read(CHUNK):
                if len(head) < 5:
                    head += data[: 5 - len(head)]
                raw_bytes += len(data)
                out = comp.compress(data)
                if out:
                    sha.update(out)
                    writer.write(out)
            out = comp.flush()
            sha.update(out)
            writer.write(out)
            rc = proc.wait()
            err_thread.join(5)
            if rc != 0:
                raise BackupError(f"pg_dump exited with status {rc}: {redact(' | '.join(errors[-5:]))}")
            if head != b"PGDMP":
                raise BackupError(f"pg_dump produced no custom-format archive ({raw_bytes} bytes)")
            stored = writer.commit()
        except BaseException:
            if proc is not None and proc.poll() is None:
                proc.kill()  # never leave a pg_dump behind: it would hold its snapshot open on the server
                proc.wait()
            writer.abort()
            raise
        counter.join()
        if count_error:
            raise BackupError(f"row counts failed: {redact(count_error[0])}")
    finally:
        # The counting thread uses snap_conn: closing a connection another thread is executing on crashes libpq
        # (seen as "Fatal Python error: Aborted" when the store failed during a dump). Stop it, cancel, wait.
        if counter is not None and counter.is_alive():
            stop_counting.set()
            try:
                snap_conn.cancel_safe(timeout=5)
            except Exception:  # noqa: BLE001 - best effort: the join below still waits for the query to end
                pass
            counter.join()
        snap_conn.close()
    dump_s = time.monotonic() - t0
    digest = sha.hexdigest()
    log(f"dumped {raw_bytes / 1e6:.1f} MB -> stored {stored / 1e6:.1f} MB zstd in {dump_s:.1f} s "
        f"({raw_bytes / 1e6 / max(dump_s, 1e-6):.0f} MB/s), sha256 {digest[:16]}…")

    verification: dict = {"method": "none"}
    if verify:
        try:
            verification = verify_stored(store, postgres, scope, backup_id, digest, stored)
        except BackupError:
            _discard(store, scope, backup_id)
            raise
        log(f"verified: read back {stored / 1e6:.1f} MB, sha256 matches, pg_restore parsed all "
            f"{verification['toc_entries']} archive entries in {verification['seconds']:.1f} s")
    finished = datetime.now(UTC)
    total_s = time.monotonic() - t0
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "id": backup_id,
        "database": database,
        "environment": environment,
        "scope": scope,
        "server": f"{info.host}:{info.port}",
        "server_version_num": versions["server_version_num"],
        "pg_dump_version_num": versions["pg_dump_version_num"],
        "format": "custom",
        "compression": store.compression,
        "file": DUMP_NAME,
        "dump_bytes": raw_bytes,
        "stored_bytes": stored,
        "sha256": digest,
        "started_at": started.timestamp(),
        "finished_at": finished.timestamp(),
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "dump_s": round(dump_s, 3),
        "duration_s": round(total_s, 3),
        "mb_per_s": round(raw_bytes / 1e6 / max(dump_s, 1e-6), 1),
        "trigger": trigger,
        "release_version": release_version,
        "table_counts": counts,
        "migrations": migrations,
        "verification": verification,
        "verified": bool(verify),
        "location": store.location(scope, backup_id),
        "host": socket.gethostname(),
        "tool": f"ops-pipeline (python {platform.python_version()}, zstandard {zstandard.__version__})",
    }
    store.put_json(manifest, scope, backup_id, MANIFEST_NAME)  # last: now the backup exists
    return manifest


def _discard(store: BackupStore, scope: str, backup_id: str) -> None:
    try:
        store.delete_backup(scope, backup_id)
    except Exception:
        pass


def stream_decompressed(store: BackupStore, scope: str, backup_id: str, sink, sha=None) -> int:
    """Read a stored dump, feeding the sha256 of the stored bytes and writing decompressed bytes to `sink`.
    Returns the number of stored bytes."""
    stored = _Counted(sha)
    for out in decompressed(store, scope, backup_id, stored):
        sink(out)
    return stored.n


class _Counted:
    """Counts the bytes fed to a hash (if any) on their way."""

    def __init__(self, sha=None) -> None:
        self.sha, self.n = sha, 0

    def update(self, data: bytes) -> None:
        self.n += len(data)
        if self.sha is not None:
            self.sha.update(data)


def verify_stored(store: BackupStore, postgres: PostgresResource, scope: str, backup_id: str, expected_sha: str,
                  expected_size: int | None = None) -> dict:
    """Read the stored backup back in full: sha256 must match and pg_restore must parse every byte."""
    t0 = time.monotonic()
    sha = hashlib.sha256()
    proc = subprocess.Popen([postgres.binary("pg_restore"), "--list"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    # `--list` alone would accept a truncated file; the full read below goes through a second pg_restore
    # that writes the whole archive as SQL to /dev/null (reads and decodes every data block).
    full = subprocess.Popen([postgres.binary("pg_restore"), "--file=/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    toc_out: list[bytes] = []
    full_err: list[str] = []

    def read_list() -> None:
        assert proc.stdout is not None
        toc_out.append(proc.stdout.read())

    lister = threading.Thread(target=read_list, daemon=True)
    lister.start()
    err_thread = _stderr_reader(full, full_err)
    head_sent = False
    size = 0

    def sink(data: bytes) -> None:
        nonlocal head_sent
        assert full.stdin is not None and proc.stdin is not None
        full.stdin.write(data)
        if not head_sent:
            try:
                proc.stdin.write(data)
            except BrokenPipeError:
                head_sent = True

    try:
        try:
            size = stream_decompressed(store, scope, backup_id, sink, sha)
        except (StoreError, zstandard.ZstdError) as exc:
            raise BackupError(f"backup {backup_id} unreadable: {exc}") from None
        finally:
            for p in (full, proc):
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass
        rc_full = full.wait()
        err_thread.join(5)
        proc.wait()
        lister.join(5)
    except BrokenPipeError:
        full.wait()
        err_thread.join(5)
        raise BackupError(f"backup {backup_id} failed verification: pg_restore stopped reading: "
                          f"{' | '.join(full_err[-3:])}") from None
    finally:
        for p in (full, proc):
            if p.poll() is None:
                p.kill()
    if sha.hexdigest() != expected_sha:
        raise BackupError(f"backup {backup_id} failed verification: stored sha256 {sha.hexdigest()[:16]}… "
                          f"!= written {expected_sha[:16]}…")
    if expected_size is not None and size != expected_size:
        raise BackupError(f"backup {backup_id} failed verification: stored {size} bytes, wrote {expected_size}")
    if rc_full != 0:
        raise BackupError(f"backup {backup_id} failed verification: pg_restore could not read it: {' | '.join(full_err[-3:])}")
    toc = (toc_out[0] if toc_out else b"").decode(errors="replace")
    entries = sum(1 for line in toc.splitlines() if line and not line.startswith(";"))
    return {"method": "sha256 + full pg_restore read", "seconds": round(time.monotonic() - t0, 3), "toc_entries": entries,
            "ok": True}


# ---- retention ------------------------------------------------------------------------------------

@dataclass
class RetentionPolicy:
    daily: int = 7
    weekly: int = 4
    monthly: int = 6
    floor: int = 3
    keep_pre_release: int = 10


@dataclass
class RetentionPlan:
    keep: dict[str, list[str]] = field(default_factory=dict)  # backup id -> reasons
    delete: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # incomplete folders old enough to remove

    def summary(self) -> dict:
        return {"keep": {k: v for k, v in self.keep.items()}, "delete": self.delete, "orphans": self.orphans}


def plan_retention(manifests: list[dict], policy: RetentionPolicy, *, incomplete: list[tuple[str, float]] = (),
                   now: float | None = None, orphan_age_s: float = 86400) -> RetentionPlan:
    """Grandfather-father-son over verified backups only. Never deletes the newest verified backup and never
    leaves fewer than `floor` verified backups."""
    now = now or time.time()
    verified = sorted((m for m in manifests if m.get("verified")), key=lambda m: m["finished_at"], reverse=True)
    plan = RetentionPlan()

    def keep(m: dict, why: str) -> None:
        plan.keep.setdefault(m["id"], []).append(why)

    if verified:
        keep(verified[0], "newest verified")
    for label, n, bucket in (
        ("daily", policy.daily, lambda d: d.strftime("%Y-%m-%d")),
        ("weekly", policy.weekly, lambda d: "%d-W%02d" % d.isocalendar()[:2]),
        ("monthly", policy.monthly, lambda d: d.strftime("%Y-%m")),
    ):
        seen: list[str] = []
        for m in verified:
            b = bucket(datetime.fromtimestamp(m["finished_at"], UTC))
            if b in seen:
                continue
            if len(seen) >= n:
                break
            seen.append(b)
            keep(m, f"{label} {b}")
    pre = [m for m in verified if m.get("trigger") == "pre-release"][: policy.keep_pre_release]
    for m in pre:
        keep(m, f"pre-release {m.get('release_version') or ''}".strip())
    for m in verified[: policy.floor]:
        keep(m, f"floor ({policy.floor} newest)")
    plan.delete = [m["id"] for m in verified if m["id"] not in plan.keep]
    plan.orphans = [bid for bid, mtime in incomplete if now - mtime > orphan_age_s]
    return plan


def apply_retention(store: BackupStore, scope: str, plan: RetentionPlan, log: LogFn) -> list[str]:
    deleted = []
    for bid in plan.delete + plan.orphans:
        store.delete_backup(scope, bid)
        deleted.append(bid)
        log(f"deleted backup {bid}")
    return deleted


# ---- restore ---------------------------------------------------------------------------------------

def newest_verified(store: BackupStore, scope: str) -> dict | None:
    for m in store.manifests(scope):
        if m.get("verified"):
            return m
    return None


def find_backup(store: BackupStore, scope: str, backup_id: str = "") -> dict:
    if backup_id:
        try:
            m = store.get_json(scope, backup_id, MANIFEST_NAME)
        except (StoreError, ValueError):
            raise BackupError(f"no backup {backup_id!r} of {scope!r} in {store.describe()}") from None
        if not m.get("verified"):
            raise BackupError(f"backup {backup_id} was never verified; refusing to restore it")
        return m
    m = newest_verified(store, scope)
    if not m:
        raise BackupError(f"no verified backup of {scope!r} in {store.describe()}")
    return m


RESTORE_JOBS = 2  # connections; bench/backup.py --explore restore measures 1, 2 and 3
RESTORE_OPTIONS = "-c maintenance_work_mem=512MB -c synchronous_commit=off"
ROWS_IN_MEMORY = 256 << 20  # table rows a restore holds in memory ahead of its loaders; more wait in temp files
# Foreign keys are checked when they are added (one anti-join of the two tables). The planner picks a hash join;
# after a restore that loaded the tables frozen (all-visible), a merge join over index-only scans of the two
# tables' indexes is several times cheaper (bench: order_items -> orders, 2.4M x 1M rows, 1.4-1.8 s hash vs
# 0.3 s merge). Used only where the referencing columns lead an index (the referenced side always has one).
FK_CHECK_SETTINGS = {"enable_hashjoin": "off"}
_FK_DEFN = re.compile(r"^ALTER TABLE (?:ONLY )?(\S+)\s+ADD CONSTRAINT .*? FOREIGN KEY \(([^)]*)\) REFERENCES ", re.S)
# What pg_restore sets on its connections before it runs any entry (pg_backup_archiver.c, _doSetFixedOutputState);
# the archive's own ENCODING, STDSTRINGS and SEARCHPATH entries follow.
SESSION_SETTINGS = ("SET statement_timeout = 0", "SET lock_timeout = 0", "SET idle_in_transaction_session_timeout = 0",
                    "SET check_function_bodies = false", "SET xmloption = content", "SET client_min_messages = warning",
                    "SET row_security = off")
# Post-data entries (indexes, constraints) the restore schedules itself, each as soon as its tables are loaded;
# everything else in post-data (triggers, rules, policies, materialized view data, comments...) goes to one
# pg_restore at the end, in pg_restore's own order.
EARLY_POST_DATA = ("INDEX", "CONSTRAINT", "FK CONSTRAINT")  # not CHECK CONSTRAINT: on a parent it checks the
# children's rows too (ALTER TABLE without ONLY), and its dependencies do not name them
_COPY_END = b"\n\\.\n"
_COPY_TABLE = re.compile(r'^COPY ((?:"(?:[^"]|"")*"|[^".\s]+)\.(?:"(?:[^"]|"")*"|[^".\s]+)) ')
_RELATIONS = ("TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE")


def _copy_table(entry: TocEntry) -> str:
    """The table a TABLE DATA entry's COPY statement loads, as pg_dump quotes it (the manifest's row-count key)."""
    match = _COPY_TABLE.match(entry.copy_stmt)
    if not match:
        raise UnsupportedArchive(f"unexpected COPY statement in entry {entry.dump_id}: {entry.copy_stmt[:200]}")
    return match.group(1)


def decompressed(store: BackupStore, scope: str, backup_id: str, sha=None) -> Iterator[bytes]:
    """The stored dump, decompressed, chunk by chunk; feeds `sha` with the stored bytes. Raises BackupError on a
    corrupted or truncated zstd stream."""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    for chunk in store.read(scope, backup_id, DUMP_NAME):
        if sha is not None:
            sha.update(chunk)
        try:
            out = dobj.decompress(chunk)
        except zstandard.ZstdError as exc:
            raise BackupError(f"backup {backup_id} is corrupted: zstd: {exc}") from None
        if out:
            yield out
    if not dobj.eof:
        raise BackupError("compressed stream is truncated (zstd frame incomplete)")


def restore_into(postgres: PostgresResource, store: BackupStore, manifest: dict, url: str, target_db: str, *,
                 jobs: int = RESTORE_JOBS, log: LogFn, redactor: Redactor | None = None) -> dict:
    """Create `target_db` (must not exist) and restore the backup into it, `jobs` connections at a time.

    The stored dump is read once, as a stream (`_StreamedRestore`): its TOC first, then its table data, which
    is decompressed, cut into tables and loaded while the rest is still being read. Each table is loaded with
    `COPY ... WITH (FREEZE)` after a TRUNCATE in the same transaction, which PostgreSQL allows because the
    table is new: rows land frozen and marked all-visible, so index builds and ANALYZE do not set hint bits on
    every page (with data checksums each first touch after a checkpoint also writes a full page to WAL), foreign
    key checks can use index-only scans, and the first VACUUM (or autovacuum on the live database after a
    switch-over) has nothing to do (bench/backup.py: 0.16 s and 1 MB of WAL after ours, 1.2-1.8 s and 560-760 MB
    after the seed's restore). An index or constraint is built as soon as its tables are loaded, and a table is
    analyzed as soon as its indexes are built, on the same `jobs` connections. `pg_restore -j` can do none of
    this with a streamed dump: it creates and loads a table in different transactions, and without data offsets
    it reads the archive from the start for every table.

    An archive this path does not handle (large objects, another pg_dump format or version) is restored by
    `pg_restore -j` from a decompressed temp file instead (`_restore_from_file`). The sha256 of the stored bytes
    is checked either way; a restore that fails for any reason drops the database it created.
    """
    redact = redactor or Redactor()
    jobs = max(1, jobs)
    if postgres.database_exists(url, target_db):
        raise BackupError(f"database {target_db!r} already exists; a restore only ever goes into a new database")
    t0 = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="ops-restore-")
    sha = hashlib.sha256()
    created: list[bool] = []
    try:
        reader = ArchiveReader(decompressed(store, manifest["scope"], manifest["id"], sha))
        try:
            reader.read_toc()
            restore = _StreamedRestore(postgres, url, target_db, reader, tmpdir, jobs=jobs, redact=redact,
                                       created=created, rows=manifest.get("table_counts", {}))
        except UnsupportedArchive as why:
            log(f"restore by pg_restore from a temp file: {why}")
            phases = _restore_from_file(postgres, url, target_db, reader.replay(), tmpdir, jobs=jobs, redact=redact,
                                        created=created, sha=sha, manifest=manifest)
        except ArchiveError as exc:
            raise BackupError(f"backup {manifest['id']} is not a readable archive: {exc}") from None
        else:
            try:
                phases = restore.run()
            except BackupError as exc:  # rows that do not load may be a corrupted backup: say so if it is
                _check_sha256(manifest, _stored_sha256(store, manifest), f" (the restore stopped at: {exc})")
                raise
            _check_sha256(manifest, sha.hexdigest())
    except BaseException:
        if created:  # only what this restore created: a database of that name made meanwhile by someone else stays
            drop_database(postgres, url, target_db)
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    total = time.monotonic() - t0
    log(f"restored {manifest['id']} into {target_db} with {jobs} connections in {total:.1f} s: "
        + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in phases.items() if k.endswith("_s")))
    return {**phases, "jobs": jobs, "restore_s": round(total, 3), "total_s": round(total, 3)}


def fk_check_settings(conn: psycopg.Connection, defn: str) -> dict[str, str]:
    """Planner settings for adding the foreign key `defn` (`ALTER TABLE ... ADD CONSTRAINT ... FOREIGN KEY`):
    FK_CHECK_SETTINGS when the referencing columns lead one of the table's indexes, else none."""
    match = _FK_DEFN.match(defn.strip())
    if not match:
        return {}
    table = match.group(1)
    columns = [c.strip() for c in match.group(2).split(",")]
    columns = [c[1:-1].replace('""', '"') if c.startswith('"') else c for c in columns]
    leading = conn.execute(
        """SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum  -- NULL: an expression
            WHERE i.indrelid = to_regclass(%s) AND i.indpred IS NULL AND k.n <= i.indnkeyatts
            GROUP BY i.indexrelid""", (table,)).fetchall()
    return dict(FK_CHECK_SETTINGS) if any(cols[: len(columns)] == columns for (cols,) in leading) else {}


def _check_sha256(manifest: dict, stored: str, detail: str = "") -> None:
    if stored != manifest["sha256"]:
        raise BackupError(f"backup {manifest['id']} is corrupted: stored sha256 {stored[:16]}… != manifest "
                          f"{manifest['sha256'][:16]}…{detail}") from None


def _stored_sha256(store: BackupStore, manifest: dict) -> str:
    sha = hashlib.sha256()
    try:
        for chunk in store.read(manifest["scope"], manifest["id"], DUMP_NAME):
            sha.update(chunk)
    except StoreError as exc:
        return f"unreadable ({exc})"
    return sha.hexdigest()


def _create_database(postgres: PostgresResource, url: str, target_db: str, created: list[bool]) -> None:
    with postgres.connect(url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_db)))
    created.append(True)


def _pg_restore_runner(postgres: PostgresResource, url: str, target_db: str, archive: str, redact: Redactor):
    """A function that runs pg_restore with some arguments on `archive` into `target_db` and raises BackupError
    with its message when it fails."""
    env = postgres.tool_env(url, target_db)
    base = [postgres.binary("pg_restore"), "--exit-on-error", "--no-owner", "--no-privileges"]

    def pg_restore(*args: str) -> None:
        proc = subprocess.run([*base, *args, "--dbname", target_db, archive], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**env, "PGOPTIONS": RESTORE_OPTIONS})
        if proc.returncode != 0:
            raise BackupError(f"pg_restore {' '.join(args)} into {target_db} failed: {redact(proc.stderr.strip()[-1500:])}")

    return pg_restore


def _restore_from_file(postgres: PostgresResource, url: str, target_db: str, chunks: Iterator[bytes], tmpdir: str, *,
                       jobs: int, redact: Redactor, created: list[bool], sha, manifest: dict) -> dict:
    """The archive to a temp file (sha256 checked), then `pg_restore -j` and ANALYZE."""
    t = time.monotonic()
    path = os.path.join(tmpdir, "dump.pgc")
    with open(path, "wb") as f:
        f.writelines(chunks)
    _check_sha256(manifest, sha.hexdigest())
    phases = {"fetch_s": time.monotonic() - t}
    _create_database(postgres, url, target_db, created)
    t = time.monotonic()
    _pg_restore_runner(postgres, url, target_db, path, redact)(f"--jobs={jobs}")
    phases["pg_restore_s"] = time.monotonic() - t
    t = time.monotonic()
    _analyze_all(postgres, ConnInfo.parse(url).url(target_db), jobs)
    phases["analyze_s"] = time.monotonic() - t
    return {k: round(v, 3) for k, v in phases.items()} | {"path": "pg_restore"}


@dataclass
class _Task:
    key: tuple[str, int]  # what `needs` refers to
    name: str  # for messages
    run: Callable[[Callable[[], psycopg.Connection]], None]
    needs: set[tuple[str, int]]  # task keys that must be done first
    locks: frozenset[int]  # tables (dump ids) it locks: tasks sharing one do not run at the same time, unless
    shared: bool = False  # both only take SHARE locks (CREATE INDEX): those may
    rank: tuple = ()  # lower starts first
    ready: Callable[[], bool] = lambda: True


class _Budget:
    """Bytes of table rows the restore may hold in memory, shared by all its spools."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self.lock:
            if self.left < n:
                return False
            self.left -= n
            return True

    def give(self, n: int) -> None:
        with self.lock:
            self.left += n


class _Spool:
    """One table's COPY rows as they arrive, for a loader that may run behind the splitter: in memory while the
    restore's budget allows, in a file after that (once spilled, the rest of the table follows in the file)."""

    def __init__(self, path: str, budget: _Budget) -> None:
        self.path, self.budget = path, budget
        self.blocks: collections.deque[bytes] = collections.deque()
        self.spilled = False
        self.file_size = 0
        self.started = False
        self.done = False
        self.cond = threading.Condition()
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        if not self.spilled and self.budget.take(len(data)):
            with self.cond:
                self.blocks.append(data)
                self.started = True
                self.cond.notify_all()
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        view = memoryview(data)
        while view:  # a short write (disk nearly full) is continued; a full disk raises OSError
            view = view[os.write(self._fd, view):]
        with self.cond:
            self.spilled = self.started = True
            self.file_size += len(data)
            self.cond.notify_all()

    def finish(self) -> None:
        self.close()
        with self.cond:
            self.started = self.done = True
            self.cond.notify_all()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def chunks(self, failed: threading.Event) -> Iterator[bytes]:
        """The rows in order, as they come; raises BackupError("stopped: ...") once `failed` is set."""
        f, pos = None, 0
        try:
            while True:
                with self.cond:
                    while not (self.blocks or pos < self.file_size or self.done or failed.is_set()):
                        self.cond.wait(0.5)
                    if failed.is_set():
                        raise BackupError("stopped: another part of the restore failed")
                    block = self.blocks.popleft() if self.blocks else None
                    size, done = self.file_size, self.done
                if block is not None:
                    self.budget.give(len(block))
                    yield block
                elif pos < size:
                    if f is None:
                        f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed below
                    while pos < size:
                        data = f.read(min(CHUNK, size - pos))
                        if not data:
                            raise BackupError(f"restore temp file {self.path} ends at {pos} of {size} bytes")
                        pos += len(data)
                        yield data
                elif done:
                    return
        finally:
            if f is not None:
                f.close()
                os.unlink(self.path)


class _StreamedRestore:
    """One pass over the archive:

    - pre-data first: `pg_restore --section=pre-data` of the header+TOC file (definitions live in the TOC);
    - a feeder thread decompresses the stored dump into `pg_restore --data-only --file=-` (which turns the
      archive's one-chunk-per-row data blocks into plain COPY text, at C speed), and a splitter thread cuts that
      text into one spool per table (in memory up to ROWS_IN_MEMORY, then in temp files);
    - `jobs` worker threads, each with one connection, run tasks as their inputs become ready, loads first: load
      a table (its rows have started to arrive), build an index or add a constraint (its definition from the
      TOC, once the tables it depends on are loaded), ANALYZE a table (once its indexes and constraints are
      in), sequence values (`pg_restore` of those entries). Tasks on one table never overlap, except index
      builds, which take compatible locks;
    - then the post-data entries left (triggers, comments, materialized view data, partition index attachments,
      anything that depends on them) go to one `pg_restore -j` in pg_restore's own order, and what has no
      statistics yet (partitioned parents, materialized views) is analyzed.
    """

    def __init__(self, postgres: PostgresResource, url: str, target_db: str, reader: ArchiveReader, tmpdir: str, *,
                 jobs: int, redact: Redactor, created: list[bool], rows: dict[str, int]) -> None:
        self.postgres, self.url, self.target_db, self.reader = postgres, url, target_db, reader
        self.tmpdir, self.jobs, self.redact, self.created = tmpdir, jobs, redact, created
        self.target_url = ConnInfo.parse(url).url(target_db)
        entries = reader.entries
        self.by_id = {e.dump_id: e for e in entries}
        for e in entries:
            if e.had_dumper and not (e.desc == "TABLE DATA" and e.copy_stmt.startswith("COPY ")):
                raise UnsupportedArchive(f"entry {e.dump_id} ({e.desc} {e.tag}) has data this path does not load")
        encoding = next((e.defn for e in entries if e.desc == "ENCODING"), "")
        if "'UTF8'" not in encoding:  # names and COPY text are handled as UTF-8 here; pg_restore handles the rest
            raise UnsupportedArchive(f"archive encoding is not UTF8 ({encoding.strip() or 'none'})")
        self.data = [e for e in entries if e.desc == "TABLE DATA" and e.had_dumper]
        self.table_of_data = {e.dump_id: next((d for d in e.deps if self.by_id.get(d) and self.by_id[d].desc != "TABLE DATA"),
                                              e.dump_id) for e in self.data}
        self.data_of_table = {t: d for d, t in self.table_of_data.items()}
        self.failed = threading.Event()
        self.connections: list[psycopg.Connection] = []  # the workers', for _fail to cancel what runs on them
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.toc_path = os.path.join(tmpdir, "toc.pgc")
        self.pg_restore = _pg_restore_runner(postgres, url, target_db, self.toc_path, redact)  # on the header+TOC
        self.settings = [e.defn for e in entries if e.desc in ("ENCODING", "STDSTRINGS", "SEARCHPATH") and e.defn]
        self.analyzed: set[str] = set()
        self.finished: dict[tuple[str, int], float] = {}  # task key -> when it finished (time.monotonic)
        budget = _Budget(ROWS_IN_MEMORY)
        self.spools = {e.dump_id: _Spool(os.path.join(tmpdir, f"data-{e.dump_id}.copy"), budget) for e in self.data}
        self.tasks = self._tasks(self.spools, {e.dump_id: rows.get(_copy_table(e), 0) for e in self.data})

    # -- the plan -------------------------------------------------------------------------------------
    def _tasks(self, spools: dict[int, _Spool], rows: dict[int, int]) -> list[_Task]:
        entries = self.reader.entries
        tasks: list[_Task] = []
        early: dict[int, frozenset[int]] = {}  # post-data entry -> tables it locks

        def load(dump_id: int) -> tuple[str, int]:  # task keys: names may repeat across schemas, dump ids do not
            return ("load", dump_id)

        def entry(dump_id: int) -> tuple[str, int]:
            return ("entry", dump_id)

        def label(e: TocEntry) -> str:
            return f"{e.desc} {e.namespace + '.' if e.namespace else ''}{e.tag}"

        def settled(d: int) -> bool:  # a dependency that is done once its tables are loaded and its early entries run
            dep = self.by_id.get(d)
            if dep is None or d in self.data_of_table or d in early:
                return True
            # a table without data of its own (a partitioned parent...), a view, a post-data entry left for the end
            return dep.section != SECTION_POST_DATA and dep.desc not in _RELATIONS

        for e in entries:  # in TOC order: an entry's dependencies come before it
            if e.section == SECTION_POST_DATA and e.desc in EARLY_POST_DATA and all(settled(d) for d in e.deps):
                early[e.dump_id] = frozenset(
                    {d for d in e.deps if d in self.data_of_table}
                    | {t for d in e.deps if d in early for t in early[d]})
        for e in self.data:
            table = self.table_of_data[e.dump_id]
            # loads first, in archive order (the order their rows arrive in)
            tasks.append(_Task(load(e.dump_id), f"loading {_copy_table(e)}", self._loader(e, spools[e.dump_id]), set(),
                               frozenset({table}),
                               rank=(0, len(tasks)), ready=lambda s=spools[e.dump_id]: s.started))
        for dump_id, locks in early.items():
            e = self.by_id[dump_id]
            needs = {load(self.data_of_table[d]) for d in e.deps if d in self.data_of_table}
            needs |= {entry(d) for d in e.deps if d in early}
            if e.desc == "FK CONSTRAINT":  # after its tables' indexes, as in pg_restore: the check may use them
                needs |= {entry(d) for d, on in early.items() if on & locks and self.by_id[d].desc != "FK CONSTRAINT"}
            # then the biggest tables' indexes and constraints: the longest chains of work after the last load
            weight = max((rows.get(self.data_of_table[t], 0) for t in locks), default=0)
            tasks.append(_Task(entry(dump_id), label(e), self._ddl(e), needs, locks, shared=e.desc == "INDEX",
                               rank=(1, -weight, e.desc != "CONSTRAINT")))
        for e in self.data:
            table = self.table_of_data[e.dump_id]
            needs = {load(e.dump_id)} | {entry(d) for d, locks in early.items() if table in locks}
            tasks.append(_Task(("analyze", e.dump_id), f"ANALYZE {_copy_table(e)}", self._analyzer(_copy_table(e)), needs,
                               frozenset({table}), rank=(1, -rows.get(e.dump_id, 0), True)))
        misc = [e for e in entries if e.section == SECTION_DATA and not e.had_dumper and e.desc != "TABLE DATA"]
        if misc:  # sequence values and the like: definitions in the TOC, no data blocks
            tasks.append(_Task(("misc", 0), "data entries without data blocks (sequence values...)",
                               self._pg_restore_entries(misc, "data"), set(), frozenset(), rank=(0, -1)))
        self.early = set(early)
        return tasks

    # -- task bodies ----------------------------------------------------------------------------------
    def _listing(self, name: str, entries: list[TocEntry]) -> str:
        """A `pg_restore --use-list` file of these entries, in this order."""
        path = os.path.join(self.tmpdir, name)
        with open(path, "w") as f:
            f.writelines(e.list_line() + "\n" for e in entries)
        return path

    def _pg_restore_entries(self, entries: list[TocEntry], section: str):
        def run(_conn) -> None:
            self.pg_restore(f"--section={section}", f"--use-list={self._listing('misc.list', entries)}")

        return run

    def _ddl(self, entry: TocEntry):
        """An index or constraint entry, run as pg_restore would run it (its definition, in its tablespace), on the
        worker's connection: no process and no new backend per entry."""
        def run(conn_factory) -> None:
            conn = conn_factory()
            settings = fk_check_settings(conn, entry.defn) if entry.desc == "FK CONSTRAINT" else {}
            cur = psycopg.ClientCursor(conn)  # simple query protocol: a definition may hold several statements
            cur.execute(sql.SQL("SET default_tablespace = {}").format(
                sql.Identifier(entry.tablespace) if entry.tablespace else sql.Literal("")))
            for name, value in settings.items():
                cur.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
            cur.execute(entry.defn)
            for name in settings:
                cur.execute(sql.SQL("RESET {}").format(sql.Identifier(name)))

        return run

    def _loader(self, entry: TocEntry, spool: _Spool):
        copy_stmt = entry.copy_stmt.strip().removesuffix(";")
        table = _copy_table(entry)

        def run(conn_factory) -> None:
            conn = conn_factory()
            with conn.transaction():
                kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
                # A table truncated in this transaction may be loaded frozen. Only an empty one is truncated: an
                # extension's configuration table already holds the rows CREATE EXTENSION put there.
                freeze = (kind is not None and kind[0] == "r"
                          and not conn.execute(f"SELECT EXISTS (SELECT FROM ONLY {table})").fetchone()[0])
                if freeze:
                    conn.execute(f"TRUNCATE ONLY {table}")
                with conn.cursor().copy(copy_stmt + (" WITH (FREEZE)" if freeze else "")) as copy:
                    for block in spool.chunks(self.failed):
                        copy.write(block)

        return run

    def _analyzer(self, table: str):
        def run(conn_factory) -> None:
            conn_factory().execute(f"ANALYZE {table}")
            self.analyzed.add(table)

        return run

    # -- the stream -----------------------------------------------------------------------------------
    def _feed(self, proc: subprocess.Popen) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(self.reader.prefix)
            for chunk in self.reader.rest():
                if self.failed.is_set():
                    break
                proc.stdin.write(chunk)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # pg_restore stopped reading: the splitter reports why
        except StoreError as exc:
            self._fail(BackupError(f"reading the stored backup failed: {exc}"))
            proc.kill()
        except BaseException as exc:
            self._fail(exc)
            proc.kill()

    def _split(self, proc: subprocess.Popen, spools: list[_Spool], err: list[str], err_thread: threading.Thread) -> None:
        """Cut pg_restore's plain-text output (settings, then per table `COPY ... FROM stdin;`, rows, the end
        marker) into the spools, in order."""
        out = proc.stdout
        assert out is not None
        buf, eof, i, spool, at_start = b"", False, 0, None, False

        def failure(what: str) -> BackupError:
            rc = proc.wait()
            err_thread.join(5)
            return BackupError(f"pg_restore reading the archive's data failed ({what}; exit {rc}): "
                               f"{self.redact(' | '.join(err[-5:]))}")

        try:
            while True:
                if spool is None:  # between tables: look for the next COPY line
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if eof:
                            break
                        block = out.read(CHUNK)
                        eof, buf = not block, buf + block
                        continue
                    line, buf = buf[:nl], buf[nl + 1:]
                    if line.startswith(b"COPY ") and line.endswith(b" FROM stdin;"):
                        if i >= len(spools) or line.decode() != self.data[i].copy_stmt.strip():
                            raise BackupError(f"unexpected COPY statement from pg_restore: {line[:200]!r}")
                        spool, at_start, i = spools[i], True, i + 1
                    continue
                # in a table's rows: the end marker is a line of its own (no newline before it at the very start)
                if at_start and len(buf) < 3 and not eof:
                    block = out.read(CHUNK)
                    eof, buf = not block, buf + block
                    continue
                if at_start and buf.startswith(b"\\.\n"):
                    spool.finish()
                    buf, spool = buf[3:], None
                    continue
                end = buf.find(_COPY_END)
                if end >= 0:
                    spool.write(buf[: end + 1])
                    spool.finish()
                    buf, spool = buf[end + len(_COPY_END):], None
                    continue
                if eof:
                    raise failure(f"the rows of {_copy_table(self.data[i - 1])} end without the end marker")
                cut = len(buf) - (len(_COPY_END) - 1)
                if cut > 0:
                    spool.write(buf[:cut])
                    buf, at_start = buf[cut:], False
                block = out.read(CHUNK)
                eof, buf = not block, buf + block
            if proc.wait() != 0 or i != len(spools):
                raise failure(f"{i} of {len(spools)} tables")
        except OSError as exc:
            self._fail(BackupError(f"writing the restore's temp files failed: {exc}"))
            proc.kill()
            proc.wait()
        except BaseException as exc:
            self._fail(exc)
            proc.kill()
            proc.wait()

    def _fail(self, exc: BaseException) -> None:
        """Record the first and later errors, stop every part: no new tasks, statements running on the workers'
        connections cancelled (a long index build would otherwise run to its end)."""
        with self.lock:
            self.errors.append(exc)
            first = not self.failed.is_set()
            self.failed.set()
            connections = list(self.connections) if first else []
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=5)

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        spools = self.spools
        with open(self.toc_path, "wb") as f:
            f.write(self.reader.prefix)
        _create_database(self.postgres, self.url, self.target_db, self.created)
        phases = {}
        self.pg_restore("--section=pre-data")
        phases["pre_data_s"] = time.monotonic() - t0
        listing = self._listing("data.list", self.data)
        proc = subprocess.Popen([self.postgres.binary("pg_restore"), "--data-only", f"--use-list={listing}", "--file=-"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for pipe in (proc.stdin, proc.stdout):  # fewer, larger pipe transfers (Linux; the default is 64 kB)
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        err: list[str] = []
        err_thread = _stderr_reader(proc, err)
        threads = [threading.Thread(target=self._feed, args=(proc,), daemon=True),
                   threading.Thread(target=self._split, args=(proc, [spools[e.dump_id] for e in self.data], err, err_thread),
                                    daemon=True)]
        for t in threads:
            t.start()
        try:
            self._schedule(self.tasks)
        finally:
            if self.failed.is_set():
                proc.kill()
            for t in threads:
                t.join()
            err_thread.join(5)
            for spool in spools.values():
                spool.close()
        if self.errors:
            raise next((e for e in self.errors if not str(e).startswith("stopped:")), self.errors[0])
        # wall time until every table's rows were in, then until its indexes, constraints and statistics were
        rows_in = max((t for key, t in self.finished.items() if key[0] == "load"), default=t0)
        phases["rows_in_s"] = rows_in - t0 - phases["pre_data_s"]
        phases["indexes_constraints_analyze_s"] = time.monotonic() - rows_in
        t = time.monotonic()
        # The post-data entries not run yet, with the comments and labels that belong to post-data: an entry
        # without a section of its own (COMMENT, SECURITY LABEL) is in the section of the entry before it in the
        # TOC, which pg_restore would judge by the list's order instead.
        section, rest = SECTION_PRE_DATA, []
        for e in self.reader.entries:
            section = e.section if e.section != SECTION_NONE else section
            if section == SECTION_POST_DATA and e.dump_id not in self.early:
                rest.append(e)
        if rest:
            self.pg_restore(f"--use-list={self._listing('post-data-rest.list', rest)}", f"--jobs={self.jobs}")
        phases["other_post_data_s"] = time.monotonic() - t
        t = time.monotonic()
        _analyze_all(self.postgres, self.target_url, self.jobs, skip=self.analyzed)
        phases["analyze_rest_s"] = time.monotonic() - t
        return {k: round(v, 3) for k, v in phases.items()} | {"path": "streamed", "tables_loaded": len(self.data)}

    def _schedule(self, tasks: list[_Task]) -> None:
        """Run every task on `jobs` threads: each takes the first task (by rank) whose needs are done, whose input
        is ready and whose tables no running task locks (two index builds on one table may run together)."""
        cond = threading.Condition()
        pending = sorted(tasks, key=lambda task: task.rank)
        done: set[tuple[str, int]] = set()
        running: list[_Task] = []

        def free(task: _Task) -> bool:
            return all(not (task.locks & other.locks) or (task.shared and other.shared) for other in running)

        def take() -> _Task | None:
            with cond:
                while pending and not self.failed.is_set():
                    for task in pending:
                        if task.needs <= done and free(task) and task.ready():
                            pending.remove(task)
                            running.append(task)
                            return task
                    if not running and all(task.ready() for task in pending):  # nothing can change any more
                        self._fail(BackupError("restore tasks that can never start: "
                                               + ", ".join(task.name for task in pending[:10])))
                        break
                    cond.wait(0.05)  # also woken when a task finishes; a spool that starts is seen within 50 ms
                return None

        def worker() -> None:
            conn: psycopg.Connection | None = None

            def connection() -> psycopg.Connection:
                nonlocal conn
                if conn is None:
                    conn = self.postgres.connect(self.target_url, autocommit=True, options=RESTORE_OPTIONS)
                    with self.lock:
                        self.connections.append(conn)
                    cur = psycopg.ClientCursor(conn)
                    for stmt in (*SESSION_SETTINGS, *self.settings):  # + client_encoding, std strings, search_path
                        cur.execute(stmt)
                return conn

            try:
                while (task := take()) is not None:
                    try:
                        task.run(connection)
                    except (psycopg.Error, DatabaseError) as exc:
                        self._fail(BackupError(f"{task.name} failed: {self.redact(str(exc).strip()[:1500])}"))
                        return
                    except BaseException as exc:
                        self._fail(exc)
                        return
                    with cond:
                        done.add(task.key)
                        self.finished[task.key] = time.monotonic()
                        running.remove(task)
                        cond.notify_all()
            finally:
                if conn is not None:
                    with self.lock:
                        self.connections.remove(conn)
                    conn.close()

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(worker) for _ in range(self.jobs)]
            try:
                for future in futures:
                    future.result()
            except BaseException as exc:  # an interrupt (Ctrl-C, a terminated run) in this thread: stop the workers
                self._fail(exc)
                raise


def _on_connections(postgres: PostgresResource, url: str, items: list, work: Callable[[psycopg.Connection, object], None],
                    *, jobs: int, **connect_kw) -> None:
    """Run `work(conn, item)` for every item, in order, on `jobs` connections (one per thread, each taking the next
    item). The first failure stops the others from taking more and is raised."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    failed = threading.Event()

    def worker() -> None:
        with postgres.connect(url, autocommit=True, **connect_kw) as conn:
            while not failed.is_set():
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    work(conn, item)
                except BaseException:
                    failed.set()
                    raise

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(worker) for _ in range(min(max(1, jobs), max(1, len(items))))]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def _analyze_all(postgres: PostgresResource, target_url: str, jobs: int, skip: set[str] = frozenset()) -> None:
    """ANALYZE every table of the restored database (but `skip`), biggest first, on `jobs` connections."""
    with postgres.connect(target_url) as conn:
        tables = [r[0] for r in conn.execute(
            """SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'm', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg_toast%' ORDER BY pg_total_relation_size(c.oid) DESC""")
                  if r[0] not in skip]
    if tables:
        _on_connections(postgres, target_url, tables, lambda conn, table: conn.execute(f"ANALYZE {table}"), jobs=jobs)


def compare_counts(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    problems = []
    for table, n in sorted(expected.items()):
        if table not in actual:
            problems.append(f"{table}: missing after restore (expected {n} rows)")
        elif actual[table] != n:
            problems.append(f"{table}: {actual[table]} rows after restore, {n} in the backup")
    return problems


def amcheck(postgres: PostgresResource, url: str, database: str, log: LogFn) -> dict:
    """pg_amcheck --heapallindexed on `database` (needs the amcheck extension and rights to use it)."""
    t0 = time.monotonic()
    try:
        with postgres.connect(ConnInfo.parse(url).url(database)) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    except (DatabaseError, psycopg.Error) as exc:
        return {"ran": False, "reason": f"amcheck extension unavailable: {str(exc).splitlines()[0][:200]}"}
    # The database comes from PGDATABASE (tool_env): pg_amcheck's --database takes a pattern, not a name.
    proc = subprocess.run([postgres.binary("pg_amcheck"), "--heapallindexed", "--no-password"],
                          env=postgres.tool_env(url, database), capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    result = {"ran": True, "ok": proc.returncode == 0, "seconds": round(time.monotonic() - t0, 3), "output": out[-1000:]}
    log(f"pg_amcheck --heapallindexed: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s")
    return result


def drop_database(postgres: PostgresResource, url: str, database: str, attempts: int = 5) -> None:
    """DROP ... WITH (FORCE), retried: right after a restore an autovacuum worker may hold the database, and a
    non-superuser may not terminate it ("permission denied to terminate process") until it finishes."""
    for attempt in range(attempts):
        try:
            with postgres.connect(url) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            return
        except psycopg.Error:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


def data_loss_window(manifest: dict, now: float | None = None) -> timedelta:
    return timedelta(seconds=max(0.0, (now or time.time()) - manifest["finished_at"]))
