"""Restoring a backup into a new database: which backup (`find_backup`), and `restore_into`, which streams it
(streamed.py) or, for an archive that path does not handle, restores it with pg_restore from a temp file."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta

from ops_pipeline.backup.common import BackupError, LogFn
from ops_pipeline.backup.database import analyze_all, create_database, drop_database, pg_restore_runner
from ops_pipeline.backup.pg_archive import ArchiveError, ArchiveReader, UnsupportedArchive
from ops_pipeline.backup.store import DUMP_NAME, MANIFEST_NAME, BackupStore, StoreError
from ops_pipeline.backup.streamed import StreamedRestore
from ops_pipeline.backup.verify import decompressed
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource
from ops_pipeline.platform.redaction import Redactor


def newest_verified(store: BackupStore, scope: str) -> dict | None:
    for m in store.manifests(scope):
        if m.get("verified"):
            return m
    return None


def find_backup(store: BackupStore, scope: str, backup_id: str = "") -> dict:
    if backup_id.startswith("restore-point:"):  # a release's safety point in archive mode (archive_ops.py)
        raise BackupError(f"{backup_id} is a restore point of the WAL archive, not a dump: restore it with the "
                          f"restore_point_in_time job (target: name, target_value: {backup_id.split(':', 1)[1]})")
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


def restore_into(postgres: PostgresResource, store: BackupStore, manifest: dict, url: str, target_db: str, *,
                 jobs: int = RESTORE_JOBS, log: LogFn, redactor: Redactor | None = None) -> dict:
    """Create `target_db` (must not exist) and restore the backup into it, `jobs` connections at a time.

    The stored dump is read once, as a stream (`streamed.StreamedRestore`): its TOC first, then its table data, which
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
    try:
        store.keyring().check_manifest(manifest)  # a wrong or missing key: named before any byte is read
    except StoreError as exc:
        raise BackupError(f"backup {manifest['id']} cannot be restored: {exc}") from None
    t0 = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="ops-restore-")
    sha = hashlib.sha256()
    created: list[bool] = []
    try:
        reader = ArchiveReader(decompressed(store, manifest["scope"], manifest["id"], sha))
        try:
            reader.read_toc()
            restore = StreamedRestore(postgres, url, target_db, reader, tmpdir, jobs=jobs, redact=redact,
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



def _restore_from_file(postgres: PostgresResource, url: str, target_db: str, chunks: Iterator[bytes], tmpdir: str, *,
                       jobs: int, redact: Redactor, created: list[bool], sha, manifest: dict) -> dict:
    """The archive to a temp file (sha256 checked), then `pg_restore -j` and ANALYZE."""
    t = time.monotonic()
    path = os.path.join(tmpdir, "dump.pgc")
    with open(path, "wb") as f:
        f.writelines(chunks)
    _check_sha256(manifest, sha.hexdigest())
    phases = {"fetch_s": time.monotonic() - t}
    create_database(postgres, url, target_db, created)
    t = time.monotonic()
    pg_restore_runner(postgres, url, target_db, path, redact)(f"--jobs={jobs}")
    phases["pg_restore_s"] = time.monotonic() - t
    t = time.monotonic()
    analyze_all(postgres, ConnInfo.parse(url).url(target_db), jobs)
    phases["analyze_s"] = time.monotonic() - t
    return {k: round(v, 3) for k, v in phases.items()} | {"path": "pg_restore"}



def data_loss_window(manifest: dict, now: float | None = None) -> timedelta:
    return timedelta(seconds=max(0.0, (now or time.time()) - manifest["finished_at"]))
