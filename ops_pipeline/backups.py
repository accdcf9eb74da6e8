"""PostgreSQL backups that can be trusted: streamed, checksummed, verified, rotated safely, restorable.

One backup: `pg_dump -Fc -Z0` (custom format, uncompressed) is streamed through zstd into the store,
with size and sha256 computed in-stream (memory stays flat whatever the database size). The dump runs
on a snapshot exported by a transaction that also counts every table's rows, so the counts in the
manifest are exactly what the dump holds. After the upload the stored object is read back in full:
its sha256 must match and `pg_restore` must parse every byte of it. Only then is the manifest written,
and only a backup with a manifest exists.
"""

from __future__ import annotations

import concurrent.futures
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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
import zstandard
from psycopg import sql

from ops_pipeline.redaction import Redactor
from ops_pipeline.resources.backup_store import DUMP_NAME, MANIFEST_NAME, BackupStore, StoreError
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
    """Read a stored dump, feeding the sha256 of the stored bytes and writing decompressed bytes to `sink`."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    n = 0
    for chunk in store.read(scope, backup_id, DUMP_NAME):
        n += len(chunk)
        if sha is not None:
            sha.update(chunk)
        try:
            out = dobj.decompress(chunk)
        except zstandard.ZstdError as exc:
            raise BackupError(f"backup {backup_id} is corrupted: zstd: {exc}") from None
        if out:
            sink(out)
    if not dobj.eof:
        raise BackupError("compressed stream is truncated (zstd frame incomplete)")
    return n


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
# Tables the restore loads itself, frozen: the biggest, at most this many, each with at least this many rows and 1% of
# all rows. Each one costs a pg_restore that reads the archive up to its data (a dump streamed to the store has no
# data offsets), about 1.2 s per GB skipped: fine for a few big tables, not for hundreds of small ones.
FREEZE_TABLES_MAX = 4
FREEZE_MIN_ROWS = 10_000
FREEZE_MIN_SHARE = 0.01
RESTORE_OPTIONS = "-c maintenance_work_mem=512MB -c synchronous_commit=off"


def restore_into(postgres: PostgresResource, store: BackupStore, manifest: dict, url: str, target_db: str, *,
                 jobs: int = RESTORE_JOBS, log: LogFn, redactor: Redactor | None = None) -> dict:
    """Create `target_db` (must not exist) and restore the backup into it, `jobs` connections at a time.

    Phases: decompress to a temp file (sha256 checked), pre-data (`pg_restore --section=pre-data`), the biggest
    tables' data by our own loader (below), the rest of the data section (smaller tables, sequence values, large
    objects) and post-data (indexes, constraints) by `pg_restore -j`, then ANALYZE of every table, biggest first,
    in parallel.

    The loader streams a table's COPY data out of `pg_restore` into `COPY ... WITH (FREEZE)` after a TRUNCATE in
    the same transaction, which PostgreSQL allows because the table is new. Rows then land frozen and marked
    visible: index builds and ANALYZE do not set hint bits on every page (with data checksums each such first
    touch after a checkpoint also writes a full page to WAL), and the first VACUUM, or the first autovacuum on
    the live database after a switch-over, has nothing to do (bench/backup.py, 1 GB: 0.16 s and 1 MB of WAL after
    ours, 1.2-1.4 s and 560-620 MB after the seed's restore). `pg_restore -j` cannot do this: it creates a table and
    loads it in different transactions.
    """
    redact = redactor or Redactor()
    info = ConnInfo.parse(url)
    jobs = max(1, jobs)
    if postgres.database_exists(url, target_db):
        raise BackupError(f"database {target_db!r} already exists; a restore only ever goes into a new database")
    t0 = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="ops-restore-")
    path = os.path.join(tmpdir, "dump.pgc")
    sha = hashlib.sha256()
    phases: dict[str, float] = {}
    created = False
    try:
        with open(path, "wb") as f:
            stream_decompressed(store, manifest["scope"], manifest["id"], f.write, sha)
        if sha.hexdigest() != manifest["sha256"]:
            raise BackupError(f"backup {manifest['id']} is corrupted: stored sha256 {sha.hexdigest()[:16]}… "
                              f"!= manifest {manifest['sha256'][:16]}…")
        phases["fetch_s"] = time.monotonic() - t0
        with postgres.connect(url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_db)))
        created = True
        target_url = info.url(target_db)
        env = postgres.tool_env(url, target_db)
        env["PGOPTIONS"] = RESTORE_OPTIONS
        base = [postgres.binary("pg_restore"), "--exit-on-error", "--no-owner", "--no-privileges"]

        def start_pg_restore(*args: str) -> subprocess.Popen:
            return subprocess.Popen([*base, *args, "--dbname", target_db, path], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)

        def finish(proc: subprocess.Popen) -> None:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise BackupError(f"pg_restore {' '.join(proc.args[len(base):-3])} into {target_db} failed: "
                                  f"{redact(err.strip()[-1500:])}")

        def pg_restore(*args: str) -> None:
            finish(start_pg_restore(*args))

        toc = subprocess.run([postgres.binary("pg_restore"), "--list", path], capture_output=True, text=True)
        if toc.returncode != 0:
            raise BackupError(f"pg_restore --list failed: {redact(toc.stderr.strip()[-500:])}")
        entries = [line for line in toc.stdout.splitlines() if line and not line.startswith(";")]
        rows = manifest.get("table_counts", {})
        floor = max(FREEZE_MIN_ROWS, sum(rows.values()) * FREEZE_MIN_SHARE)
        frozen = sorted((line for line in entries if " TABLE DATA " in line and rows.get(_toc_table(line), 0) >= floor),
                        key=lambda line: -rows.get(_toc_table(line), 0))[:FREEZE_TABLES_MAX]  # biggest first
        rest_list = os.path.join(tmpdir, "rest.list")
        with open(rest_list, "w") as f:
            f.writelines((";" if line in frozen else "") + line + "\n" for line in entries)

        t = time.monotonic()
        pg_restore("--section=pre-data")
        phases["pre_data_s"] = time.monotonic() - t
        t = time.monotonic()
        # The big tables on the loader's connections and, beside them, everything else in the data section
        # (smaller tables, sequence values, large objects) on the connections left: `jobs` in all.
        loader_jobs = min(jobs, len(frozen))
        rest = start_pg_restore("--section=data", f"--use-list={rest_list}", f"--jobs={max(1, jobs - loader_jobs)}")
        try:
            _load_table_data(postgres, base[0], path, tmpdir, frozen, target_url, jobs=max(1, loader_jobs), redact=redact)
        except BaseException:
            rest.kill()
            rest.communicate()
            raise
        finish(rest)
        phases["data_s"] = time.monotonic() - t
        t = time.monotonic()
        pg_restore("--section=post-data", f"--jobs={jobs}")
        phases["post_data_s"] = time.monotonic() - t
        t = time.monotonic()
        _analyze_all(postgres, target_url, jobs)
        phases["analyze_s"] = time.monotonic() - t
    except BaseException:
        if created:  # only what this restore created: a database of that name made meanwhile by someone else stays
            drop_database(postgres, url, target_db)
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    restore_s = sum(v for k, v in phases.items() if k != "fetch_s")
    log(f"restored {manifest['id']} into {target_db} with {jobs} connections: fetch+check {phases['fetch_s']:.1f} s, "
        + ", ".join(f"{k.removesuffix('_s').replace('_', '-')} {v:.1f} s" for k, v in phases.items() if k != "fetch_s"))
    return {**{k: round(v, 3) for k, v in phases.items()}, "restore_s": round(restore_s, 3), "jobs": jobs,
            "tables_loaded_frozen": [_toc_table(line) for line in frozen], "total_s": round(time.monotonic() - t0, 3)}


def _toc_table(line: str) -> str:
    """'3345; 0 16390 TABLE DATA public events app' -> 'public.events', the manifest's key (quote_ident'ed parts)."""
    words = line.split(" TABLE DATA ", 1)[1].split(" ") if " TABLE DATA " in line else []
    if len(words) < 3:
        return ""
    schema, name = words[0], " ".join(words[1:-1])  # the last word is the owner; a name may contain spaces

    def quote(ident: str) -> str:
        return ident if re.fullmatch(r"[a-z_][a-z0-9_$]*", ident) else '"' + ident.replace('"', '""') + '"'

    return f"{quote(schema)}.{quote(name)}"


_COPY_END = b"\n\\.\n"


def _on_connections(postgres: PostgresResource, url: str, items: list, work: Callable[[psycopg.Connection, object], None],
                    *, jobs: int, failed: threading.Event | None = None, **connect_kw) -> None:
    """Run `work(conn, item)` for every item, in order, on `jobs` connections (one per thread, each taking the next
    item). The first failure sets `failed` (work in progress may watch it), stops the others from taking more and
    is raised (before any "stopped: ..." error it caused)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    failed = failed or threading.Event()

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
        raise next((e for e in errors if not str(e).startswith("stopped:")), errors[0])


def _load_table_data(postgres: PostgresResource, pg_restore: str, path: str, tmpdir: str, entries: list[str],
                     target_url: str, *, jobs: int, redact: Redactor) -> None:
    """Load each TABLE DATA entry on one of `jobs` connections: TRUNCATE + COPY FREEZE in one transaction."""
    stop = threading.Event()  # set when any table fails: the others abandon their COPY

    def load(conn: psycopg.Connection, item: tuple[int, str]) -> None:
        i, entry = item
        one = os.path.join(tmpdir, f"entry-{i}.list")
        with open(one, "w") as f:
            f.write(entry + "\n")
        proc = subprocess.Popen([pg_restore, f"--use-list={one}", "--file=-", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        err: list[str] = []
        reader = _stderr_reader(proc, err)
        out = proc.stdout
        assert out is not None

        def failure() -> BackupError:
            return BackupError(f"pg_restore of entry {entry.split(';')[0]} failed: {redact(' | '.join(err[-5:]))}")

        try:
            _copy_entry(conn, out, stop)
            while out.read(CHUNK):  # the rest of pg_restore's output (comments)
                pass
        except BaseException as exc:
            exited_by_itself = proc.poll() is not None or _wait_briefly(proc)
            if not exited_by_itself:
                proc.kill()
            rc = proc.wait()
            reader.join(5)
            if exited_by_itself and rc != 0:  # pg_restore's own error is the cause, not the cut stream
                raise failure() from exc
            raise
        rc = proc.wait()
        reader.join(5)
        if rc != 0:
            raise failure()

    try:
        _on_connections(postgres, target_url, list(enumerate(entries)), load, jobs=jobs, failed=stop,
                        options=RESTORE_OPTIONS)
    except psycopg.Error as exc:
        raise BackupError(f"loading table data failed: {redact(str(exc).splitlines()[0])}") from exc


def _wait_briefly(proc: subprocess.Popen, seconds: float = 1.0) -> bool:
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


_COPY_TABLE = re.compile(r'^COPY ((?:"(?:[^"]|"")*"|[^".\s]+)\.(?:"(?:[^"]|"")*"|[^".\s]+)) ')


def _copy_entry(conn: psycopg.Connection, out, failed: threading.Event) -> None:
    """Feed one entry's plain-text output of pg_restore (settings, `COPY ... FROM stdin;`, rows, the end marker)."""
    settings, copy_stmt = [], ""
    for raw in iter(out.readline, b""):
        line = raw.decode()
        if line.startswith("COPY ") and line.rstrip().endswith("FROM stdin;"):
            copy_stmt = line.rstrip().removesuffix(";")
            break
        if line.startswith(("SET ", "SELECT pg_catalog.set_config(")):
            settings.append(line)
    if not copy_stmt:  # nothing to load
        return
    match = _COPY_TABLE.match(copy_stmt)
    if not match:
        raise BackupError(f"unexpected COPY statement in the backup: {copy_stmt[:200]}")
    table = match.group(1)
    with conn.transaction():
        for stmt in settings:
            conn.execute(stmt)
        kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
        freeze = kind is not None and kind[0] == "r"
        if freeze:  # a table truncated in this transaction may be loaded frozen
            conn.execute(f"TRUNCATE ONLY {table}")
        with conn.cursor().copy(copy_stmt + (" WITH (FREEZE)" if freeze else "")) as copy:
            pending, sent = b"", False  # bytes read but not sent yet: never more than the end marker minus one
            while True:
                if failed.is_set():
                    raise BackupError("stopped: another table failed")
                block = out.read(CHUNK)
                # The end marker is a line of its own; at the very start of the data no newline precedes it.
                head = b"" if sent else b"\n"
                buf = head + pending + block
                end = buf.find(_COPY_END)
                if end >= 0:
                    rows = buf[len(head) : end + 1]
                    if rows:
                        copy.write(rows)
                    break
                if not block:
                    raise BackupError(f"the COPY data of {table} ended without its end marker")
                cut = max(len(head), len(buf) - (len(_COPY_END) - 1))
                rows, pending = buf[len(head) : cut], buf[cut:]
                if rows:
                    copy.write(rows)
                    sent = True


def _analyze_all(postgres: PostgresResource, target_url: str, jobs: int) -> None:
    """ANALYZE every table of the restored database, biggest first, on `jobs` connections."""
    with postgres.connect(target_url) as conn:
        tables = [r[0] for r in conn.execute(
            """SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'm', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg_toast%' ORDER BY pg_total_relation_size(c.oid) DESC""")]
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
