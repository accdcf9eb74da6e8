"""PostgreSQL backups that can be trusted: streamed, checksummed, verified, rotated safely, restorable.

One backup: `pg_dump -Fc -Z0` (custom format, uncompressed) is streamed through zstd into the store,
with size and sha256 computed in-stream (memory stays flat whatever the database size). The dump runs
on a snapshot exported by a transaction that also counts every table's rows, so the counts in the
manifest are exactly what the dump holds. After the upload the stored object is read back in full:
its sha256 must match and `pg_restore` must parse every byte of it. Only then is the manifest written,
and only a backup with a manifest exists.

    common.py      BackupError, LogFn, the pipe read size (CHUNK), store_scope
    dump.py        take_backup: preflight, the snapshot and its row counts, pg_dump -> zstd [-> AES-GCM] -> store, manifest
    crypt.py       encryption at rest of dumps: AES-256-GCM framed chunks, key ids, the keyring for rotation
    verify.py      reading a stored backup back: decrypted and decompressed stream, sha256 + full pg_restore read
    retention.py   grandfather-father-son over verified backups
    restore.py     find_backup, restore_into (streamed, or pg_restore from a temp file), data_loss_window
    streamed.py    the streamed restore: plan of tasks from the archive's TOC, feeder, the run
    spool.py       pg_restore's COPY text cut into per-table spools (memory, then temp files)
    scheduler.py   the restore's tasks run on `jobs` connections as their inputs become ready
    database.py    create / pg_restore into / ANALYZE / drop the database a restore or drill works on
    drill.py       checks on a restored database: row counts, pg_amcheck
    switch.py      the restored database takes the live one's name (the live one is kept aside)
    pg_archive.py  the TOC of a pg_dump custom archive, read from a stream

Archive mode (app.database.backups: archive), continuous WAL archiving instead of dumps:

    pgbackrest.py  the one class running pgBackRest (why pgBackRest: its docstring)
    archiving.py   the server side: finding it, turning archiving on, the release's restore point, WAL gaps
    pitr.py        point-in-time restore into a new data folder and server, the switch-over
    archive_ops.py / pitr_ops.py   what the backup and restore_point_in_time jobs do with them

Everything the rest of the code uses is importable from `ops_pipeline.backup`.
"""

from ops_pipeline.backup import common, spool, streamed
from ops_pipeline.backup.common import BackupError, LogFn, store_scope
from ops_pipeline.backup.database import drop_database
from ops_pipeline.backup.drill import amcheck, compare_counts
from ops_pipeline.backup.dump import MANIFEST_VERSION, TRIGGERS, new_backup_id, preflight, take_backup
from ops_pipeline.backup.restore import RESTORE_JOBS, data_loss_window, find_backup, newest_verified, restore_into
from ops_pipeline.backup.retention import RetentionPlan, RetentionPolicy, apply_retention, plan_retention
from ops_pipeline.backup.streamed import fk_check_settings
from ops_pipeline.backup.switch import switch_databases
from ops_pipeline.backup.verify import decompressed, stream_decompressed, verify_stored

__all__ = [
    "MANIFEST_VERSION", "RESTORE_JOBS", "TRIGGERS", "BackupError", "LogFn", "RetentionPlan", "RetentionPolicy",
    "amcheck", "apply_retention", "common", "compare_counts", "data_loss_window", "decompressed", "drop_database",
    "find_backup", "fk_check_settings", "new_backup_id", "newest_verified", "plan_retention", "preflight",
    "restore_into", "spool", "store_scope", "stream_decompressed", "streamed", "switch_databases", "take_backup",
    "verify_stored",
]
