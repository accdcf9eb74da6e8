"""Backup ops: the backup the release and the nightly schedule share, retention, restore drills, restore.

(Over 400 lines on purpose: every op of the dump-mode jobs with its config, read in one file; archive mode's ops
live in archive_ops.py and pitr_ops.py, and only branch off here.)"""

import errno
import time
import uuid
from datetime import UTC, datetime

import dagster as dg
import psycopg
import urllib3
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field

from ops_pipeline import backup as backups
from ops_pipeline.backup import archive_ops
from ops_pipeline.backup.store import BackupStore, StoreError
from ops_pipeline.platform import history
from ops_pipeline.platform.app_env import resolve_app_env
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import ConnInfo, DatabaseError, PostgresResource
from ops_pipeline.platform.spec import (
    ENV_NAME,
    ENV_VAR,
    AppConfig,
    DatabaseConfig,
    RedisConfig,
    ReleaseConfig,
    ReleaseSpec,
    SpecError,
    validate_release_config,
)

BACKUP_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class BackupTargetConfig(dg.Config):
    """Which environment's database a standalone backup job works on."""

    environment: str = Field("local", description="Environment whose database is backed up.")
    production: bool = Field(False, description="Production environment (no embedded services).")
    embedded_services: bool = Field(True, description="Use the embedded local PostgreSQL when DATABASE_URL is not set.")
    database_url_env: str = Field("DATABASE_URL", description="Variable holding the database URL.")
    migrations_table: str = Field("pgmigrations", description="Table listing applied migrations (recorded in the manifest).")
    trigger: str = Field("manual", description="Why this backup is taken: nightly | manual.")


def target_spec(config: BackupTargetConfig, instance: dg.DagsterInstance | None = None, *,
                also: list[str] = ()) -> ReleaseSpec:
    """The environment's database settings: those of its newest recorded release (database source, embedded database
    and role, migrations table), so a backup, drill or restore works on exactly what the release used; an environment
    never released yet is described by this config alone. `also`: problems of the run's other ops' config."""
    problems = list(also)
    if config.trigger not in ("nightly", "manual"):
        problems.append(f"trigger: must be nightly or manual (got {config.trigger!r})")
    url_env = config.database_url_env
    if not ENV_VAR.match(url_env or ""):  # named here, not as the app.database.url_from it becomes
        problems.append(f"database_url_env: {url_env!r} is not a valid environment variable name")
        url_env = "DATABASE_URL"
    recorded = None
    if instance is not None and ENV_NAME.match(config.environment or ""):
        hist = history.load(instance, config.environment)
        recorded = next((history.spec_json(e) for e in hist.events if history.spec_json(e)), None)
    try:
        rc = ReleaseSpec.from_json(recorded).config if recorded else None
    except SpecError as exc:
        problems += exc.problems
        rc = None
    if rc is not None:
        rc = rc.model_copy(update={"embedded_services": rc.embedded_services and config.embedded_services})
    else:
        app = AppConfig(migrations_table=config.migrations_table, required_env=[], secret_env=[], jwt_secret_env="",
                        node_env_var="", database=DatabaseConfig(url_from=f"env:{url_env}"),
                        redis=RedisConfig(enabled=False))
        rc = ReleaseConfig(environment=config.environment, production=config.production,
                           embedded_services=config.embedded_services and not config.production, app=app)
    problems += [p for p in validate_release_config(rc, check_paths=False)]
    if problems:
        raise failure(str(SpecError(problems)))
    return ReleaseSpec(config=rc, version="", app_dir="", extra={"trigger": config.trigger})


@dg.op(description="Resolves which environment's database the backup job works on: the settings of its newest "
                   "recorded release (validated, no side effects).",
       tags={"stage": "backup"})
def backup_target(context: dg.OpExecutionContext, config: BackupTargetConfig) -> ReleaseSpec:
    # The backup job's retention settings are checked here, before the backup, not after it in prune_backups.
    prune = ((context.run_config or {}).get("ops") or {}).get("prune_backups") or {}
    also = [f"prune_backups.{p}" for p in retention_problems(RetentionConfig(**(prune.get("config") or {})))] if prune else []
    drill = (((context.run_config or {}).get("ops") or {}).get("drill_newest_backup") or {}).get("config") or {}
    if "jobs" in drill:
        also += [f"drill_newest_backup.{p}" for p in jobs_problems(drill["jobs"])]
    return target_spec(config, context.instance, also=also)


def database_url(spec: ReleaseSpec, local_stack: LocalStack):
    env = resolve_app_env(spec.config, local_stack)
    if not env.database_url:
        raise failure(f"no database for environment '{spec.environment}': {'; '.join(env.missing)}")
    return env.database_url, env


def backup_materialization(manifest: dict, store: BackupStore) -> dg.AssetMaterialization:
    location = manifest["location"]
    return dg.AssetMaterialization(
        asset_key=dg.AssetKey(["backups", manifest["environment"], manifest["database"]]),
        description=f"{manifest['trigger']} backup {manifest['id']} (verified)",
        metadata={
            "backup_id": manifest["id"],
            "trigger": manifest["trigger"],
            "release_version": manifest.get("release_version") or "",
            "size_bytes": dg.MetadataValue.int(manifest["stored_bytes"]),
            "dump_bytes": dg.MetadataValue.int(manifest["dump_bytes"]),
            "sha256": manifest["sha256"],
            "duration_s": dg.MetadataValue.float(manifest["duration_s"]),
            "mb_per_s": dg.MetadataValue.float(manifest["mb_per_s"]),
            "location": dg.MetadataValue.url(location) if location.startswith("http") else dg.MetadataValue.path(location),
            "verification": dg.MetadataValue.json(manifest["verification"]),
            "table_counts": dg.MetadataValue.json(manifest["table_counts"]),
            "migrations": dg.MetadataValue.json(manifest.get("migrations", [])),
            "pg_versions": f"server {manifest['server_version_num']}, pg_dump {manifest['pg_dump_version_num']}",
            "store": store.describe(),
        },
    )


@dg.op(
    description=(
        "Backs up the environment's database: pg_dump (custom format) streamed through zstd into the backup store, "
        "sha256 and size computed in-stream, then read back in full (checksum + pg_restore) before the manifest is "
        "written. Only a verified backup counts; no verified backup, no migration. Retries with backoff on store errors."
    ),
    retry_policy=BACKUP_RETRY,
    tags={"stage": "backup"},
    ins={"start_after": dg.In(dg.Nothing, description="Orders the backup after the build in a release.")},
)
def backup_database(
    context: dg.OpExecutionContext,
    spec: ReleaseSpec,
    postgres: PostgresResource,
    backup_store: BackupStore,
    local_stack: LocalStack,
) -> dict:
    url, env = database_url(spec, local_stack)
    trigger = "pre-release" if spec.version else spec.extra.get("trigger", "manual")
    if spec.app.database.backups == "archive":  # WAL archiving: a restore point for a release, else a base backup
        return archive_ops.backup_step(context, spec, url, env.redactor, backup_store, trigger)
    try:
        manifest = backups.take_backup(
            postgres, backup_store, url, trigger=trigger, environment=spec.environment, log=context.log.info,
            redactor=env.redactor, release_version=spec.version, migrations_table=spec.app.migrations_table,
        )
    except Exception as exc:
        known = backup_failure(exc, env.redactor)
        if known is not None:
            raise known from None
        # a bug: fails the same way every time, so not retried; its traceback stays attached
        raise failure(f"backup failed, nothing was registered (not retried): {type(exc).__name__}: "
                                     f"{env.redactor(str(exc))[:500]}") from exc
    context.log_event(backup_materialization(manifest, backup_store))
    context.add_output_metadata({
        "backup_id": manifest["id"],
        "size_bytes": manifest["stored_bytes"],
        "sha256": manifest["sha256"],
        "location": manifest["location"],
        "duration_s": manifest["duration_s"],
        "mb_per_s": manifest["mb_per_s"],
    })
    return manifest


def backup_failure(exc: Exception, redact) -> dg.Failure | None:
    """The op's failure for a known error of take_backup (None for anything else). Only what may heal is retried
    (BACKUP_RETRY): a lost or refused database connection, a server shutting down, a serialization failure or lock
    timeout, a store error that is not a full or read-only store. A BackupError or any other answer of PostgreSQL
    (a missing column, a permission, an aborted transaction) fails the same way every time: at once, with its cause."""
    if isinstance(exc, backups.BackupError):
        return failure(f"backup failed, nothing was registered: {redact(str(exc))}")
    if isinstance(exc, (DatabaseError, psycopg.OperationalError)):
        return dg.Failure(description=f"database error (will retry), nothing was registered: {type(exc).__name__}: "
                                      f"{redact(str(exc))[:500]}", allow_retries=True)
    if isinstance(exc, psycopg.Error):
        return failure(f"backup failed, nothing was registered (not retried: PostgreSQL answered "
                                      f"{type(exc).__name__}): {redact(str(exc))[:500]}")
    if isinstance(exc, OSError):
        # A full or read-only store does not heal by retrying: fail now, nothing partial was kept.
        permanent = exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)
        return dg.Failure(description=f"backup store error ({'not retried' if permanent else 'will retry'}), nothing "
                                      f"partial kept: {redact(str(exc))[:500]}", allow_retries=not permanent)
    if isinstance(exc, (StoreError, BotoCoreError, ClientError, urllib3.exceptions.HTTPError)):
        return dg.Failure(description=f"backup store error, nothing partial kept: {redact(str(exc))[:500]}",
                          allow_retries=True)
    return None


class RetentionConfig(dg.Config):
    """Grandfather-father-son retention over verified backups."""

    daily: int = Field(7, description="Keep the newest backup of each of the last N days.")
    weekly: int = Field(4, description="Keep the newest backup of each of the last M ISO weeks.")
    monthly: int = Field(6, description="Keep the newest backup of each of the last K months.")
    floor: int = Field(3, description="Never leave fewer verified backups than this.")
    keep_pre_release: int = Field(10, description="Keep the newest N pre-release backups.")
    dry_run: bool = Field(False, description="Only list what would be deleted.")


def retention_problems(config: "RetentionConfig") -> list[str]:
    return [f"{k}: must be >= {lo} (got {getattr(config, k)})"
            for k, lo in (("daily", 0), ("weekly", 0), ("monthly", 0), ("floor", 1), ("keep_pre_release", 0))
            if getattr(config, k) < lo]


@dg.op(
    description=(
        "Prunes old backups after a new one was verified (it takes the new manifest as input, so it never runs after "
        "a failed backup). Keeps N daily / M weekly / K monthly, never the newest verified, never below the floor. "
        "Dry run lists what it would delete."
    ),
    tags={"stage": "backup"},
)
def prune_backups(context: dg.OpExecutionContext, config: RetentionConfig, manifest: dict, backup_store: BackupStore) -> dict:
    problems = retention_problems(config)
    if problems:
        raise failure(str(SpecError(problems)))
    if not manifest.get("verified"):
        raise failure("refusing to prune: the new backup is not verified")
    if manifest.get("kind") == "base_backup":  # pgBackRest's expire ran after the backup
        return archive_ops.expired_with_backup(context, manifest)
    scope = manifest["scope"]
    policy = backups.RetentionPolicy(config.daily, config.weekly, config.monthly, config.floor, config.keep_pre_release)
    manifests = backup_store.manifests(scope)
    plan = backups.plan_retention(manifests, policy, incomplete=backup_store.incomplete(scope))
    if config.dry_run:
        context.log.info(f"dry run: would delete {len(plan.delete)} backup(s): {', '.join(plan.delete) or 'none'}; "
                         f"orphans: {', '.join(plan.orphans) or 'none'}")
        deleted = []
    else:
        deleted = backups.apply_retention(backup_store, scope, plan, context.log.info)
        backup_store.abort_stale_uploads()
    result = {"dry_run": config.dry_run, "kept": plan.keep, "deleted" if not config.dry_run else "would_delete": plan.delete,
              "orphans": plan.orphans, "verified_before": len(manifests)}
    context.add_output_metadata({
        "dry_run": config.dry_run,
        "kept": dg.MetadataValue.json(plan.keep),
        "deleted": dg.MetadataValue.json(deleted),
        "would_delete": dg.MetadataValue.json(plan.delete if config.dry_run else []),
        "verified_backups_left": len(manifests) - len(deleted),
    })
    return result


def jobs_problems(jobs: int) -> list[str]:
    """A restore's connection count, refused with the run's other problems before anything is read or created."""
    return [] if 1 <= jobs <= 16 else [f"jobs: must be between 1 and 16 (got {jobs})"]


class DrillConfig(dg.Config):
    """Restore drill: prove the newest backup restores."""

    backup_id: str = Field("", description="Backup to drill (empty: the newest verified).")
    jobs: int = Field(backups.RESTORE_JOBS, description="Connections the restore loads, indexes and analyzes on (1-16).")
    keep_scratch_database: bool = Field(False, description="Keep the scratch database for inspection.")


@dg.op(
    description=(
        "Restore drill: restores the newest verified backup into a scratch database (parallel, tables loaded frozen), compares "
        "every table's row count with the manifest, runs pg_amcheck where available, records the restore time (the "
        "measured RTO) and drops the scratch database. A corrupted or unrestorable backup fails the drill."
    ),
    tags={"stage": "drill"},
)
def drill_newest_backup(context: dg.OpExecutionContext, config: DrillConfig, spec: ReleaseSpec, postgres: PostgresResource,
                  backup_store: BackupStore, local_stack: LocalStack) -> dict:
    url, env = database_url(spec, local_stack)
    if spec.app.database.backups == "archive":  # the drill proves point-in-time recovery to the latest WAL
        return archive_ops.pitr_drill(context, spec, url, env.redactor, backup_store)
    info = ConnInfo.parse(url)
    scope = backups.store_scope(spec.environment, info.database)
    try:
        manifest = backups.find_backup(backup_store, scope, config.backup_id)
    except backups.BackupError as exc:
        raise failure(str(exc)) from None
    scratch = f"{info.database[:30]}_drill_{datetime.now(UTC):%Y%m%d%H%M%S}_{uuid.uuid4().hex[:4]}"
    admin_url = _admin_url(spec, local_stack, url)
    result: dict = {"backup_id": manifest["id"], "scratch_database": scratch}
    try:
        try:
            timing = backups.restore_into(postgres, backup_store, manifest, url, scratch, jobs=config.jobs,
                                          log=context.log.info, redactor=env.redactor)
        except (backups.BackupError, DatabaseError, psycopg.Error, StoreError) as exc:
            raise failure(f"restore drill FAILED for backup {manifest['id']}: {env.redactor(str(exc))}",
                             metadata={"backup_id": manifest["id"]}) from None
        counts = postgres.table_row_counts(url, scratch)
        mismatches = backups.compare_counts(manifest["table_counts"], counts)
        check = backups.amcheck(postgres, admin_url, scratch, context.log.info)
        result.update({"timing": timing, "tables": len(counts), "rows": sum(counts.values()), "count_mismatches": mismatches,
                       "amcheck": check})
        if mismatches or (check.get("ran") and not check.get("ok")):
            raise failure(f"restore drill FAILED for backup {manifest['id']}: "
                             + "; ".join(mismatches + ([f"pg_amcheck: {check.get('output', '')[:300]}"] if check.get("ran") and not check.get("ok") else [])),
                             metadata={"result": dg.MetadataValue.json(result)})
    finally:
        if not config.keep_scratch_database:
            try:
                backups.drop_database(postgres, url, scratch)
            except Exception as exc:  # noqa: BLE001 - report, do not mask the drill's own result
                context.log.warning(f"could not drop scratch database {scratch}: {type(exc).__name__}")
    age_h = (time.time() - manifest["finished_at"]) / 3600
    context.log_event(dg.AssetMaterialization(
        asset_key=dg.AssetKey(["restore_drills", spec.environment, info.database]),
        description=f"backup {manifest['id']} restored and checked",
        metadata={
            "backup_id": manifest["id"],
            "restore_s": dg.MetadataValue.float(timing["restore_s"]),
            "total_s (RTO)": dg.MetadataValue.float(timing["total_s"]),
            "restore_phases_s": dg.MetadataValue.json({k.removesuffix("_s"): v for k, v in timing.items()
                                                       if k.endswith("_s") and k not in ("restore_s", "total_s")}),
            "restore_path": timing["path"],
            "tables": len(counts),
            "rows": dg.MetadataValue.int(sum(counts.values())),
            "row_counts_match": not mismatches,
            "amcheck": check.get("reason") or ("ok" if check.get("ok") else "failed"),
            "backup_age_hours": round(age_h, 2),
        },
    ))
    context.add_output_metadata({"backup_id": manifest["id"], "restore_s": timing["restore_s"],
                                 "rows_checked": sum(counts.values())})
    return result


def _admin_url(spec: ReleaseSpec, local_stack: LocalStack, url: str) -> str:
    """pg_amcheck needs rights the app role rarely has: the embedded stack's superuser, else the app URL."""
    import os

    if os.environ.get("OPS_PG_ADMIN_URL"):
        return os.environ["OPS_PG_ADMIN_URL"]
    if spec.config.embedded_services and not spec.config.production:
        services = local_stack.services()
        if services.database_url == url:
            return services.admin_database_url
    return url


class RestoreConfig(dg.Config):
    """Restore a backup into a NEW database; switch the app over only with explicit confirmation."""

    environment: str = Field("local", description="Environment whose database is restored.")
    production: bool = Field(False, description="Production environment.")
    embedded_services: bool = Field(True, description="Use the embedded local PostgreSQL when DATABASE_URL is not set.")
    database_url_env: str = Field("DATABASE_URL", description="Variable holding the live database URL.")
    backup_id: str = Field("", description="Backup to restore (empty: the newest verified).")
    jobs: int = Field(backups.RESTORE_JOBS, description="Connections the restore loads, indexes and analyzes on (1-16).")
    switch_over: bool = Field(False, description="After a verified restore, make the restored database the live one.")
    confirm_database: str = Field(
        "", description="Required with switch_over: type the live database's name to confirm data written after the backup is set aside."
    )


@dg.op(
    description=(
        "Restores a backup (by id; default the newest verified) into a NEW database and verifies it (row counts vs the "
        "manifest). Shows the data-loss window. Only with switch_over and the database name typed in confirm_database "
        "does it take a safety backup of the live database and swap the databases by renaming (the old one is kept)."
    ),
    tags={"stage": "restore"},
)
def restore_into_new_database(context: dg.OpExecutionContext, config: RestoreConfig, postgres: PostgresResource,
                     backup_store: BackupStore, local_stack: LocalStack) -> dict:
    spec = target_spec(BackupTargetConfig(environment=config.environment, production=config.production,
                                          embedded_services=config.embedded_services, database_url_env=config.database_url_env),
                       context.instance, also=jobs_problems(config.jobs))
    url, env = database_url(spec, local_stack)
    info = ConnInfo.parse(url)
    live = info.database
    if config.switch_over and config.confirm_database != live:
        raise failure(f"switch_over requires confirm_database: {live!r} (got {config.confirm_database!r}); "
                         "nothing was touched")
    scope = backups.store_scope(spec.environment, live)
    try:
        manifest = backups.find_backup(backup_store, scope, config.backup_id)
    except backups.BackupError as exc:
        raise failure(str(exc)) from None
    window = backups.data_loss_window(manifest)
    context.log.warning(f"backup {manifest['id']} was taken {manifest['finished']}: writes of the last {window} "
                        f"(since then) are NOT in it")
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    restored = f"{live[:30]}_restored_{stamp}_{uuid.uuid4().hex[:4]}"
    timing = backups.restore_into(postgres, backup_store, manifest, url, restored, jobs=config.jobs, log=context.log.info,
                                  redactor=env.redactor)
    counts = postgres.table_row_counts(url, restored)
    mismatches = backups.compare_counts(manifest["table_counts"], counts)
    if mismatches:
        backups.drop_database(postgres, url, restored)
        raise failure(f"restored database failed verification, dropped it: {'; '.join(mismatches)}")
    result = {"backup_id": manifest["id"], "restored_database": restored, "data_loss_window_s": round(window.total_seconds()),
              "timing": timing, "switched": False}
    if config.switch_over:
        safety = backups.take_backup(postgres, backup_store, url, trigger="safety", environment=spec.environment,
                                     log=context.log.info, redactor=env.redactor)
        context.log_event(dg.AssetMaterialization(asset_key=dg.AssetKey(["backups", spec.environment, live]),
                                                  description=f"safety backup {safety['id']} before restore",
                                                  metadata={"backup_id": safety["id"], "sha256": safety["sha256"],
                                                            "size_bytes": safety["stored_bytes"]}))
        aside = f"{live[:30]}_before_restore_{stamp}_{uuid.uuid4().hex[:4]}"
        try:
            backups.switch_databases(postgres, url, live=live, restored=restored, aside=aside)
        except DatabaseError as exc:
            raise failure(f"{env.redactor(str(exc))} (safety backup {safety['id']} was taken)",
                             metadata={"restored_database": restored, "safety_backup_id": safety["id"]}) from None
        result.update({"switched": True, "safety_backup_id": safety["id"], "previous_database": aside})
        context.log.warning(f"switched: {restored} is now {live}; the previous database is kept as {aside}")
    else:
        context.log.info(f"restored into {restored}; the live database {live} was not touched (switch_over is false)")
    context.add_output_metadata({
        "backup_id": manifest["id"],
        "restored_database": result["restored_database"] if not result["switched"] else live,
        "data_loss_window": str(window),
        "switched": result["switched"],
        "restore_s": timing["restore_s"],
    })
    return result
