"""Taking a backup: `pg_dump -Fc -Z0` on a snapshot exported by a transaction that also counts every table's rows,
streamed through zstd into the store with size and sha256 computed in-stream, read back in full (verify.py), and
only then the manifest."""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime

import psycopg
import zstandard

from ops_pipeline.backup import common, crypt
from ops_pipeline.backup.common import BackupError, LogFn, stderr_reader, store_scope
from ops_pipeline.backup.store import DUMP_NAME, MANIFEST_NAME, BackupStore
from ops_pipeline.backup.verify import verify_stored
from ops_pipeline.platform.migration_tables import MigrationsTableError, applied_migrations
from ops_pipeline.platform.postgres import ConnInfo, DatabaseError, PostgresResource
from ops_pipeline.platform.redaction import Redactor

MANIFEST_VERSION = 1
TRIGGERS = ("nightly", "pre-release", "manual", "safety")


def _major(version_num: int) -> int:
    return version_num // 10000


def new_backup_id(database: str, trigger: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{trigger}-{uuid.uuid4().hex[:6]}"



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
    key = store.keyring().current  # a missing or short key fails here, before anything is dumped
    database = info.database
    scope = store_scope(environment, database)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    backup_id = new_backup_id(database, trigger, started)
    log(f"backup {backup_id} of {info.display} to {store.describe()} (trigger: {trigger})")

    snap = _Snapshot(postgres.connect(url, autocommit=False, application_name=f"ops-pipeline backup {backup_id}"))
    try:
        snapshot = snap.export()
        migrations, migrations_error = snap.migrations(migrations_table)
        migrations_error = redact(migrations_error)
        if migrations_error:
            log(f"applied migrations not recorded in the manifest: {migrations_error}")
        argv = [postgres.binary("pg_dump"), "--format=custom", "--compress=0", "--no-password", f"--snapshot={snapshot}",
                "--lock-wait-timeout=60000", "--dbname", info.database]
        # The store first: a read-only, full or missing store fails here, before pg_dump or the counting start.
        writer = store.writer(scope, backup_id, DUMP_NAME)
        raw_bytes, stored, digest = _dump_to_store(argv, postgres.tool_env(url), store, writer, snap.start_counting,
                                                   redact, key)
        counts = snap.counts(redact)
    finally:
        snap.close()
    dump_s = time.monotonic() - t0
    log(f"dumped {raw_bytes / 1e6:.1f} MB -> stored {stored / 1e6:.1f} MB zstd in {dump_s:.1f} s "
        f"({raw_bytes / 1e6 / max(dump_s, 1e-6):.0f} MB/s)"
        f"{f', encrypted with key {key.id}' if key else ''}, sha256 {digest[:16]}…")

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
        **({"encryption": {"cipher": crypt.CIPHER, "key_id": key.id}} if key else {}),
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
        **({"migrations_error": migrations_error} if migrations_error else {}),
        "verification": verification,
        "verified": bool(verify),
        "location": store.location(scope, backup_id),
        "host": socket.gethostname(),
        "tool": f"ops-pipeline (python {platform.python_version()}, zstandard {zstandard.__version__})",
    }
    store.put_json(manifest, scope, backup_id, MANIFEST_NAME)  # last: now the backup exists
    return manifest


class _Snapshot:
    """A repeatable-read transaction that exports the snapshot pg_dump uses and counts rows in that same snapshot,
    on a thread of its own while the dump runs."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.tables: list[str] = []
        self.counted: dict[str, int] = {}
        self.count_error: list[str] = []
        self.stop_counting = threading.Event()
        self.counter: threading.Thread | None = None

    def export(self) -> str:
        """The snapshot's name; lists the tables to count."""
        conn = self.conn
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        self.tables = [r[0] for r in conn.execute(
            """SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables
                WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1""")]
        self.counter = threading.Thread(target=self._count_rows, daemon=True)
        return snapshot

    def migrations(self, table: str) -> tuple[list[str], str]:
        """The migrations applied in the snapshot, and why they could not be read ("" when they could). Read in a
        savepoint: a table that cannot be read leaves the snapshot's transaction intact and the dump goes on."""
        try:
            return applied_migrations(self.conn, table), ""
        except MigrationsTableError as exc:
            return [], str(exc)

    def _count_rows(self) -> None:
        try:
            for t in self.tables:
                if self.stop_counting.is_set():
                    return
                self.counted[t] = self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        except psycopg.Error as exc:
            self.count_error.append(str(exc).splitlines()[0])

    def start_counting(self) -> None:
        assert self.counter is not None
        self.counter.start()

    def counts(self, redact: Redactor) -> dict[str, int]:
        """Every table's row count, once the counting has finished."""
        assert self.counter is not None
        self.counter.join()
        if self.count_error:
            raise BackupError(f"row counts failed: {redact(self.count_error[0])}")
        return self.counted

    def close(self) -> None:
        # The counting thread uses the connection: closing a connection another thread is executing on crashes libpq
        # (seen as "Fatal Python error: Aborted" when the store failed during a dump). Stop it, cancel, wait.
        if self.counter is not None and self.counter.is_alive():
            self.stop_counting.set()
            try:
                self.conn.cancel_safe(timeout=5)
            except Exception:  # noqa: BLE001 - best effort: the join below still waits for the query to end
                pass
            self.counter.join()
        self.conn.close()


def _dump_to_store(argv: list[str], env: dict[str, str], store: BackupStore, writer, started, redact: Redactor,
                   key: crypt.Key | None = None) -> tuple[int, int, str]:
    """Run pg_dump, compress its output (then encrypt it with `key`, if any) into the store's `writer` and commit it; `started()` once pg_dump runs.
    Returns (dump bytes, stored bytes, sha256 of the stored bytes). On any failure pg_dump is killed (it would
    hold its snapshot open on the server) and the partial object is removed."""
    proc: subprocess.Popen | None = None
    sha = hashlib.sha256()
    raw_bytes = 0
    head = b""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        errors: list[str] = []
        err_thread = stderr_reader(proc, errors)
        started()
        comp = store.compressor().compressobj(size=-1)
        enc = crypt.Encryptor(key) if key else None

        def put(out: bytes) -> None:
            sha.update(out)
            writer.write(out)

        def emit(out: bytes) -> None:
            if enc is None:
                put(out)
                return
            for frame in enc.update(out):
                put(frame)

        if enc is not None:
            put(enc.header)
        assert proc.stdout is not None
        while data := proc.stdout.read(common.CHUNK):
            if len(head) < 5:
                head += data[: 5 - len(head)]
            raw_bytes += len(data)
            out = comp.compress(data)
            if out:
                emit(out)
        emit(comp.flush())
        if enc is not None:
            put(enc.finish())
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
    return raw_bytes, stored, sha.hexdigest()


def _discard(store: BackupStore, scope: str, backup_id: str) -> None:
    try:
        store.delete_backup(scope, backup_id)
    except Exception:
        pass
