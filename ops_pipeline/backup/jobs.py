"""The backup jobs: nightly backup (with retention), restore drill, restore into a new database.

In-process executor for the same reason as the release jobs (ops_pipeline/release/jobs.py): chains of dependent steps.
"""

import dagster as dg

from ops_pipeline.backup.ops import (
    backup_database,
    backup_target,
    drill_newest_backup,
    prune_backups,
    restore_into_new_database,
)
from ops_pipeline.backup.pitr_ops import restore_point_in_time


@dg.job(
    description=(
        "Backs up an environment's database (the same op the release uses: streamed, checksummed, read back and "
        "verified before it counts), then prunes old backups by the retention policy."
    ),
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "backup"},
)
def backup():
    prune_backups(backup_database(backup_target()))


@dg.job(
    name="restore_drill",
    description="Restore drill: proves the newest backup restores (row counts, pg_amcheck, restore time), then cleans up.",
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "drill"},
)
def restore_drill_job():
    drill_newest_backup(backup_target())


@dg.job(
    name="restore_database",
    description=(
        "Restores a backup into a NEW database and verifies it. Switches the application over only when switch_over is "
        "set and the live database's name is typed in confirm_database (a safety backup is taken first)."
    ),
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "restore"},
)
def restore_database_job():
    restore_into_new_database()


@dg.job(
    name="restore_point_in_time",
    description=(
        "Point-in-time restore of an environment whose WAL is archived (app.database.backups: archive): to the latest "
        "WAL, a time or a restore point, into a NEW data folder, verified. Switches over only with switch_over and the "
        "live data folder typed in confirm_data_dir."
    ),
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "restore"},
)
def restore_point_in_time_job():
    restore_point_in_time()
