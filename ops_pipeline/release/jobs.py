"""The jobs: graphs of ops, nothing else.

Executors are chosen per job. Every job here is a chain of dependent steps, so nothing runs in parallel
anyway, and the in-process executor spares the process-per-step start-up (measured: 12 s of overhead on
7 no-op steps with the multiprocess executor, 0.03 s in-process). It also keeps one set of resources for
the whole run, so the environment's release lock is held from migration to the end of the health gate.
"""

import dagster as dg

from ops_pipeline.backup.ops import backup_database
from ops_pipeline.platform.hooks import announce_failure
from ops_pipeline.release.approval import record_approval
from ops_pipeline.release.ops.artifact import build_image
from ops_pipeline.release.ops.deploy import rolling_deploy
from ops_pipeline.release.ops.health import health_gate
from ops_pipeline.release.ops.hosts import verify_hosts
from ops_pipeline.release.ops.migrate import migrate_database
from ops_pipeline.release.ops.plan import plan_release
from ops_pipeline.release.ops.preflight import verify_env
from ops_pipeline.release.ops.rollback import plan_rollback, rollback_deploy, rollback_gate, stop_standby
from ops_pipeline.release.ops.tests import run_tests

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
        "target and rolling procedure, then the same health gate; with a warm standby of that version (PM2, "
        "target.standby_s) it is a traffic switch to it instead (possibly made already by the sensor that requested "
        "the run), and nothing is started. App only: when the bad release applied migrations "
        "the run points at the pre-migration backup (restore_database) or the release's restore point "
        "(restore_point_in_time), and never restores by itself."
    ),
    executor_def=dg.in_process_executor,
    tags=ROLLBACK_TAGS,
    hooks={announce_failure},
)
def rollback():
    rollback_gate(rollback_deploy(plan_rollback()))


@dg.job(
    name="plan",
    description=(
        "A dry run of a release with the same spec: version, artifact (built or reused), what serves now and the order "
        "in which instances would change, pending migrations against the live database, the backup it would take and "
        "its estimated time. No side effect: nothing is built, deployed, locked, backed up or recorded."
    ),
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "plan"},
    # The release's own spec file plans it: `ops.verify_env.config`, mapped onto plan_release.
    config=dg.ConfigMapping(
        config_fn=lambda c: {"ops": {"plan_release": {"config": c["ops"]["verify_env"]["config"]}}},
        config_schema={"ops": {"verify_env": {"config": plan_release.config_schema.as_field()}}},
    ),
)
def plan():
    plan_release()


@dg.job(
    name="approve_release",
    description=("Promotes or aborts a release waiting for approval (its spec's approval.required): run_id, decision "
                 "(promote | abort) and who decides. Recorded on the release run and as an approvals/<environment> event."),
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "approval"},
)
def approve_release():
    record_approval()


@dg.job(
    name="check_hosts",
    description=("Checks every host of a release spec over SSH: pinned host key, login, node and pm2, free disk, clock. "
                 "Changes nothing. Takes the release's own spec file (ops.verify_env.config)."),
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "check"},
    config=dg.ConfigMapping(
        config_fn=lambda c: {"ops": {"verify_hosts": {"config": c["ops"]["verify_env"]["config"]}}},
        config_schema={"ops": {"verify_env": {"config": verify_hosts.config_schema.as_field()}}},
    ),
)
def check_hosts_job():
    verify_hosts()


@dg.job(
    name="retire_standby",
    description=("Stops an environment's warm standby (the previous version's instances kept running out of traffic "
                 "after a release, target.standby_s) once its window ended; requested by the health watch, one run "
                 "per standby (run key standby:<environment>:<generation>)."),
    executor_def=dg.in_process_executor,
    tags={"ops/kind": "standby", "dagster/max_retries": "0"},
)
def retire_standby_job():
    stop_standby()
