"""The jobs: graphs of ops, nothing else.

Executors are chosen per job. Every job here is a chain of dependent steps, so nothing runs in parallel
anyway, and the in-process executor spares the process-per-step start-up (measured: 12 s of overhead on
7 no-op steps with the multiprocess executor, 0.03 s in-process). It also keeps one set of resources for
the whole run, so the environment's release lock is held from migration to the end of the health gate.
"""

import dagster as dg

from ops_pipeline.hooks import announce_failure
from ops_pipeline.ops.artifact import build_image
from ops_pipeline.ops.backup import (
    backup_database,
    backup_target,
    drill_newest_backup,
    prune_backups,
    restore_into_new_database,
)
from ops_pipeline.ops.deploy import rolling_deploy
from ops_pipeline.ops.health import health_gate
from ops_pipeline.ops.migrate import migrate_database
from ops_pipeline.ops.preflight import verify_env
from ops_pipeline.ops.rollback import plan_rollback, rollback_deploy, rollback_gate
from ops_pipeline.ops.tests import run_tests

RELEASE_TAGS = {"ops/kind": "release", "dagster/max_retries": "0"}
ROLLBACK_TAGS = {"ops/kind": "rollback", "dagster/priority": "10", "dagster/max_retries": "0"}


@dg.job(
    description=(
        "Releases the service to one environment: verify env -> test -> build artifact -> back up the database -> "
        "migrate -> rolling deploy -> health gate. Each step runs only if the previous one succeeded: no verified "
        "backup, no migration; a failed migration, no deploy. A release that passes its gate joins the release history."
    ),
    executor_def=dg.in_process_executor,
    tags=RELEASE_TAGS,
    hooks={announce_failure},
)
def release():
    spec = verify_env()
    tested = run_tests(spec)
    artifact = build_image(tested)
    backup = backup_database(tested, start_after=artifact)
    migration = migrate_database(tested, artifact, backup)
    deployment = rolling_deploy(tested, artifact, migration)
    health_gate(tested, deployment)


@dg.job(
    description=(
        "Redeploys the last known-good version of an environment (or an explicit target_version) through the same "
        "target and rolling procedure, then the same health gate. App only: when the bad release applied migrations "
        "the run points at the pre-migration backup and the restore_database job, and never restores by itself."
    ),
    executor_def=dg.in_process_executor,
    tags=ROLLBACK_TAGS,
    hooks={announce_failure},
)
def rollback():
    rollback_gate(rollback_deploy(plan_rollback()))


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
