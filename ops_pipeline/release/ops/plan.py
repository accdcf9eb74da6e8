"""plan_release: what a release of this spec would do, with no side effect (the `plan` job, a dry run).

It validates the spec like `verify_env`, then only reads: the version it would get, whether its artifact exists
already (same commit), what serves now and the order in which instances would change (`rollout_plan`, the order the
release itself follows), the migrations the app folder has that the live database has not applied, and the backup it
would take (database size, time estimated from the newest verified backup's speed). Nothing is built, started,
locked, backed up or recorded; an embedded stack that is not running is not started (the database figures then say
so).
"""


import json
import os
from pathlib import Path

import dagster as dg
import psycopg

from ops_pipeline import backup as backups
from ops_pipeline.backup.store import BackupStore, StoreError
from ops_pipeline.platform import history, paths
from ops_pipeline.platform.app_env import resolve_reference
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.migration_tables import MigrationsTableError, applied_migrations
from ops_pipeline.platform.spec import DeployTargetKind, ReleaseConfig, ReleaseSpec
from ops_pipeline.release.ops.preflight import check_release_config, default_version, git_state
from ops_pipeline.targets.base import rollout_plan
from ops_pipeline.targets.resource import DeployTargets

MIGRATION_DIRS = ("migrations", "db/migrations", "src/migrations", "database/migrations")
MIGRATION_SUFFIXES = {".js", ".cjs", ".mjs", ".ts", ".sql"}


def migration_files(app_dir: Path) -> tuple[str, list[str]]:
    """(folder, migration names) of the first conventional migrations folder of the app, names sorted."""
    for rel in MIGRATION_DIRS:
        folder = app_dir / rel
        if folder.is_dir():
            return rel, sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in MIGRATION_SUFFIXES)
    return "", []


def pending_migrations(files: list[str], applied: list[str]) -> list[str]:
    """Files whose name, with or without its extension, the migrations table does not hold (tools store either)."""
    done = set(applied)
    return [f for f in files if f not in done and Path(f).stem not in done]


def artifact_outlook(spec: ReleaseSpec) -> dict:
    """Which artifact the build would make or reuse. A bundle's id ends with its content hash, known only after
    staging; an artifact of the same clean commit is what the build reuses when the content is the same."""
    if spec.target.kind != DeployTargetKind.pm2:
        return {"kind": "image", "action": "build an image (reused by the engine's layer cache when unchanged)"}
    prefix = f"{spec.app.name}-{spec.commit or 'nogit'}"
    built = sorted((p for p in paths.artifacts_dir().glob(f"{prefix}-*.json")), key=lambda p: p.stat().st_mtime)
    if built and spec.commit and not spec.dirty:
        return {"kind": "bundle", "action": f"reuse {built[-1].stem} if the content is unchanged (same commit)",
                "candidate": built[-1].stem}
    why = "uncommitted changes" if spec.dirty else "no artifact of this commit yet"
    return {"kind": "bundle", "action": f"build a new bundle ({why})"}


def database_outlook(spec: ReleaseSpec, url: str | None, store: BackupStore) -> dict:
    """Applied and pending migrations, the database's size and the backup the release would take."""
    folder, files = migration_files(Path(spec.app_dir))
    out: dict = {"migrations_folder": folder or "none found (the migrate command decides)", "migration_files": len(files)}
    if not url:
        out["database"] = "not reachable without starting the embedded stack (not running): nothing read"
        return out
    with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
        info = conn.execute("SELECT current_database(), pg_database_size(current_database())").fetchone()
        out["database"], size = info[0], int(info[1])
        try:
            applied = applied_migrations(conn, spec.app.migrations_table) if spec.app.migrations_table else []
        except MigrationsTableError as exc:
            applied, out["migrations_table"] = [], f"unreadable: {exc}"
    out["database_bytes"] = size
    out["applied_migrations"] = len(applied)
    out["pending_migrations"] = pending_migrations(files, applied) if folder else "unknown (no migrations folder)"
    newest = None
    try:
        newest = backups.newest_verified(store, backups.store_scope(spec.environment, out["database"]))
    except StoreError as exc:
        out["backup_store"] = f"unreadable: {exc}"
    if newest:
        # The newest verified backup of the same database is the estimate: a release's backup is the same dump.
        out["backup_estimate_s"] = newest.get("duration_s", 0.0)
        out["backup_estimate_bytes"] = newest.get("stored_bytes", 0)
        out["backup"] = (f"a verified pre-migration backup of the {size / 1e6:.1f} MB database: about "
                         f"{out['backup_estimate_s']:.1f} s and {out['backup_estimate_bytes'] / 1e6:.1f} MB stored, as "
                         f"the newest backup {newest['id']} took")
    else:
        out["backup"] = f"a verified pre-migration backup of the {size / 1e6:.1f} MB database (no earlier backup to estimate from)"
    return out


def canary_outlook(config: ReleaseConfig, version: str, serving: list) -> dict:
    """The canary steps the release would take (or why it takes none) and what judges each step."""
    canary = config.canary
    if not canary.enabled:
        return {"canary": "none (all traffic moves instance by instance as above)"}
    if not serving:
        return {"canary": "none this time: no version serves yet, so there is nothing to compare with (rolling deploy)"}
    a = canary.analysis
    hold = config.approval.before if config.approval.required and config.approval.before.startswith("canary-") else ""
    limits = (f"at least {a.min_requests} requests per group; canary 5xx at most {a.max_error_rate:.1%} and at most "
              f"the stable's + {a.max_error_rate_increase:.1%}; canary p95 at most {a.max_p95_ratio:g}x the stable's"
              + (f" and {a.max_p95_ms:g} ms" if a.max_p95_ms else "")
              + f"; inconclusive past {a.max_inconclusive_s:g} s fails the release")
    order = [(f"1. start {config.target.instances} instance(s) of {version} beside the serving ones, each healthy on "
              "its own port, none in the front proxy yet"),
             *(f"{n}. {step.weight}% of the requests to {version} for {step.pause_s:g} s, then judged"
               + (" and held for approval (approve_release)" if hold == f"canary-{step.weight}" else "")
               for n, step in enumerate(canary.steps, 2)),
             f"{len(canary.steps) + 2}. promote: all requests to {version}; the old instances drain and stop"
             + (" (or stay warm, see standby)" if config.target.standby_s else "")]
    return {"canary": f"{len(canary.steps)} step(s) judged on the front proxy's records: {limits}", "order": order}


def standby_outlook(config: ReleaseConfig, serving: list) -> str:
    if not config.target.standby_s:
        return "none (target.standby_s is 0: a rollback redeploys)"
    if not serving:
        return "none this time (nothing serves yet)"
    versions = ", ".join(sorted({i.version for i in serving}))
    return (f"the replaced instances of {versions} ({len(serving)}) stay running out of traffic for "
            f"{config.target.standby_s:g} s: a rollback inside that window is a traffic switch")


def _no_side_effect_url(spec: ReleaseSpec, local_stack: LocalStack) -> str | None:
    """The environment's database URL as the release would use it, without starting an embedded stack, creating its
    database or generating a secret (resolve_app_env may do all three)."""
    config = spec.config
    url, _ = resolve_reference(config.app.database.url_from, dict(os.environ))
    if url or config.production or not config.embedded_services or config.app.database.url_from.startswith("file:"):
        return url or None
    running = local_stack.running_services(database=config.app.database.embedded_database,
                                           role=config.app.database.embedded_role)
    return running.database_url if running else None


@dg.op(
    description=(
        "Shows what a release of this spec would do, with no side effect: version, artifact (built or reused), what "
        "serves now and the order instances would change in (with its canary steps, their limits and approval), "
        "the warm standby it would leave, pending migrations against the live database, and the backup it would take "
        "with its estimated time. Nothing is built, deployed, locked, backed up or recorded."
    ),
    tags={"stage": "plan"},
)
def plan_release(context: dg.OpExecutionContext, config: ReleaseConfig, local_stack: LocalStack,
                 deploy_targets: DeployTargets, backup_store: BackupStore) -> dict:
    check_release_config(config)
    app_dir = paths.resolve(config.app.path)
    commit, dirty = git_state(app_dir)
    version = config.version or default_version(commit, dirty)
    spec = ReleaseSpec(config=config, version=version, app_dir=str(app_dir), commit=commit, dirty=dirty)
    hist = history.load(context.instance, config.environment)
    serving = deploy_targets.for_spec(spec).serving()
    steps = rollout_plan([i.name for i in serving], config.target.instances)
    by_name = {i.name: i for i in serving}
    order = []
    for n, step in enumerate(steps, 1):
        leaving = by_name[step.retire] if step.retire else None
        start = f"start {version} in slot {step.slot}, wait until healthy on its own" if step.slot is not None else ""
        stop = f"take {leaving.name} ({leaving.version}) out, drain, stop" if leaving else ""
        order.append(f"{n}. " + "; then ".join(s for s in (start, stop) if s))
    plan = {
        "environment": config.environment,
        "version": version,
        "already_released": version in {e.version for e in hist.events if e.event == history.RELEASED},
        "commit": f"{commit or 'nogit'}{'-dirty' if dirty else ''}",
        "artifact": artifact_outlook(spec),
        "target": f"{config.target.kind.value} x{config.target.instances} at {spec.public_url}",
        "serving": [f"{i.name} ({i.version}, {i.status})" for i in serving],
        "last_good": (hist.last_good().version if hist.last_good() else None),
        "order": order,
        **canary_outlook(config, version, serving),
        "standby": standby_outlook(config, serving),
        **database_outlook(spec, _no_side_effect_url(spec, local_stack), backup_store),
    }
    lines = [f"Plan: release {version} to '{config.environment}' ({plan['target']})",
             f"  artifact: {plan['artifact']['action']}",
             f"  serving now: {', '.join(plan['serving']) or 'nothing'}",
             *(f"  {line}" for line in plan["order"]),
             f"  canary: {plan['canary']}",
             f"  standby: {plan['standby']}",
             f"  migrations: {plan.get('pending_migrations', plan['migrations_folder'])}",
             f"  backup: {plan.get('backup', plan.get('database'))}"]
    if plan["already_released"]:
        lines.append(f"  note: {version} was released to '{config.environment}' before (versions are immutable)")
    context.log.info("\n".join(lines))
    context.add_output_metadata({
        "plan": dg.MetadataValue.md("\n".join(f"- {line.strip()}" for line in lines[1:])),
        "version": version,
        "changes": len(steps),
        "pending_migrations": dg.MetadataValue.json(plan.get("pending_migrations", [])),
        "database_bytes": plan.get("database_bytes", 0),
        "all": dg.MetadataValue.json(json.loads(json.dumps(plan, default=str))),
    })
    return plan
