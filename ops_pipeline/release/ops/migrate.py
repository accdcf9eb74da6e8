"""migrate_database: the new artifact's migrations, one migrator at a time, bounded locks, recorded."""

from dataclasses import asdict, dataclass, field

import dagster as dg

from ops_pipeline.platform import migration_tables
from ops_pipeline.platform.app_env import resolve_app_env
from ops_pipeline.platform.commands import Command, CommandError, run
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import DatabaseError, LockTimeout, PostgresResource
from ops_pipeline.platform.spec import ReleaseSpec
from ops_pipeline.release.approval import wait_for_approval
from ops_pipeline.targets.base import Artifact
from ops_pipeline.targets.docker.engine import DockerEngine


def environment_lock_name(environment: str) -> str:
    return f"environment:{environment}"


def take_environment_lock(context: dg.OpExecutionContext, spec: ReleaseSpec, postgres: PostgresResource, url: str) -> None:
    """One release or rollback per environment, however it was launched: a PostgreSQL advisory lock on the
    environment's database, held from migration to the end of the health gate. A crashed holder's lock dies
    with its connection."""
    try:
        job = context.job_name
    except Exception:  # noqa: BLE001 - invoked directly (build_op_context) there is no job
        job = "direct"
    holder = f"{job} {spec.version} run {context.run_id[:8]}"
    try:
        took = postgres.hold_lock(url, environment_lock_name(spec.environment), holder=holder, wait_s=spec.config.lock_wait_s,
                                  on_wait=context.log.warning)
    except LockTimeout as exc:
        raise failure(f"another release of '{spec.environment}' is in progress: {exc}") from None
    except DatabaseError as exc:
        raise failure(f"cannot take the environment lock: {exc}") from None
    if took:
        context.log.info(f"holding the release lock of environment '{spec.environment}'")


def applied_migrations(postgres: PostgresResource, url: str, table: str) -> list[str]:
    """What the migration tool recorded as applied in `table` (any tool's table shape, see migration_tables)."""
    if not table:
        return []
    with postgres.connect(url) as conn:
        return migration_tables.applied_migrations(conn, table)


@dataclass
class MigrationResult:
    applied: list[str] = field(default_factory=list)
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    backup_id: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dg.op(
    description=(
        "Runs the new artifact's migration command under the environment's release lock (a PostgreSQL advisory lock: "
        "two migrators never overlap), with lock_timeout and statement_timeout set. Records which migrations were "
        "applied. On failure the release stops before any deploy and the error names the backup to restore from."
    ),
    tags={"stage": "migrate"},
)
def migrate_database(
    context: dg.OpExecutionContext,
    spec: ReleaseSpec,
    artifact: Artifact,
    backup: dict,
    postgres: PostgresResource,
    local_stack: LocalStack,
    docker_engine: DockerEngine,
) -> MigrationResult:
    if not backup.get("verified"):
        raise failure("no verified backup: refusing to migrate")
    env = resolve_app_env(spec.config, local_stack)
    url = env.database_url
    take_environment_lock(context, spec, postgres, url)
    wait_for_approval(context, spec, "migrate")  # holding the lock: nothing else changes the environment meanwhile
    table = spec.app.migrations_table
    before = applied_migrations(postgres, url, table)
    pgoptions = (f"-c lock_timeout={int(spec.app.migration_lock_timeout_s * 1000)} "
                 f"-c statement_timeout={int(spec.app.migration_statement_timeout_s * 1000)}")
    run_env = {**env.for_process(), "PGOPTIONS": pgoptions, "PGAPPNAME": f"ops-pipeline migrate {spec.version}"[:63]}
    command = spec.app.commands.migrate
    context.log.info(f"migrating with `{command}` from artifact {artifact.id} "
                     f"(lock_timeout {spec.app.migration_lock_timeout_s:g} s, statement_timeout {spec.app.migration_statement_timeout_s:g} s)")
    try:
        if artifact.kind == "bundle":
            result = run(Command(command, cwd=artifact.ref, env=run_env, timeout_s=spec.app.migration_statement_timeout_s + 60,
                                 label="migration"), log=context.log.info, redactor=env.redactor)
            duration = result.duration_s
        else:
            duration = docker_engine.run_once(artifact, command, run_env, log=context.log.info, redactor=env.redactor,
                                              timeout_s=spec.app.migration_statement_timeout_s + 60)
    except CommandError as exc:
        try:
            after = applied_migrations(postgres, url, table)
            partial = [m for m in after if m not in before]
            state = (f"Migrations applied before the failure: {', '.join(partial)}. " if partial
                     else "The database schema is unchanged (the migration ran in a transaction). ")
        except DatabaseError as db_exc:
            partial = []
            state = (f"The schema could not be re-checked ({db_exc}); migrations run in one transaction, so the "
                     "failed batch left it unchanged. ")
        raise failure((
                "migration failed; nothing was deployed. " + state
                + f"Pre-migration backup: {backup['id']} ({backup['location']}); restore it with the restore_database "
                f"job (backup_id: {backup['id']}) only if the data is damaged.\n{exc}"
            ),
            metadata={"backup_id": backup["id"], "applied_before_failure": dg.MetadataValue.json(partial)}) from None
    after = applied_migrations(postgres, url, table)
    applied = [m for m in after if m not in before]
    context.add_output_metadata({
        "migrations_applied": dg.MetadataValue.json(applied),
        "migrations_total": len(after),
        "duration_s": round(duration, 2),
        "backup_id": backup["id"],
    })
    shown = ", ".join(applied[:5] + (["..."] if len(applied) > 10 else []) + applied[max(5, len(applied) - 5):])
    context.log.info(f"applied {len(applied)} migration(s) ({len(after)} in {table or 'no table'}): {shown or 'none pending'}")
    return MigrationResult(applied=applied, before=before, after=after, duration_s=round(duration, 2), backup_id=backup["id"])
