"""Rollback: the last known-good version back, through the same target, procedure and health gate.

With a warm standby of that version (PM2 target, `target.standby_s`), the rollback is a traffic switch: the standby is
checked on its own ports, one nginx reload routes only to it, the replaced instances drain and stop. A sensor may
have switched already (ops_pipeline/release/standby.py): then this run finds the traffic on the standby, stops the
replaced instances and records the rollback. Without a usable standby it redeploys, and its log says why.
`retire_standby` stops a standby whose window ended (requested by the health watch).
"""

import time

import dagster as dg
from dagster._core.errors import DagsterInvalidPropertyError
from pydantic import Field

from ops_pipeline.platform import history
from ops_pipeline.platform.app_env import resolve_app_env
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.notify import Notifier
from ops_pipeline.platform.postgres import PostgresResource
from ops_pipeline.platform.spec import ENV_NAME, ReleaseSpec, SpecError
from ops_pipeline.release import liveness
from ops_pipeline.release.liveness import FAILED_RUN_TAG
from ops_pipeline.release.ops.deploy import rollout_metadata
from ops_pipeline.release.ops.health import run_gate
from ops_pipeline.release.ops.migrate import take_environment_lock
from ops_pipeline.targets.base import Artifact, RolloutError
from ops_pipeline.targets.resource import DeployTargets


class RollbackConfig(dg.Config):
    """Which environment to roll back, and optionally to which version."""

    environment: str = Field("local", description="Environment to roll back.")
    target_version: str = Field("", description="Version to roll back to (empty: the last known-good version).")
    bad_version: str = Field("", description="Version being rolled back (empty: whatever is serving).")
    reason: str = Field("manual rollback", description="Why; recorded in the release history and announced.")
    force: bool = Field(False, description="Allow a target_version that is marked bad.")


def _run_tag(context: dg.OpExecutionContext, name: str) -> str:
    try:
        return context.run.tags.get(name, "")
    except DagsterInvalidPropertyError:  # invoked directly (tests): no run
        return ""


def restore_advice(backup_id: str) -> str:
    """How to get the database of before the bad release back: its safety point names the job that restores it."""
    if backup_id.startswith("restore-point:"):
        point = backup_id.split(":", 1)[1]
        return (f"If the schema change is not backward compatible, restore to the release's restore point {point} with "
                f"the restore_point_in_time job (target: name, target_value: {point}) after reviewing the data-loss "
                "window (every write after that point is lost).")
    return (f"If the schema change is not backward compatible, restore the pre-migration backup "
            f"{backup_id or '(unknown)'} with the restore_database job (backup_id: {backup_id}) after reviewing the "
            "data-loss window.")


@dg.op(
    description=(
        "Decides the rollback from the release history: the version to remove (serving now) and the last known-good "
        "version to restore (never one marked bad). Lists migrations the bad release applied and points at the "
        "pre-migration backup (restore_database) or restore point (restore_point_in_time); it never restores the "
        "database itself."
    ),
    tags={"stage": "rollback"},
)
def plan_rollback(context: dg.OpExecutionContext, config: RollbackConfig, deploy_targets: DeployTargets,
                  notifier: Notifier) -> dict:
    if not ENV_NAME.match(config.environment or ""):
        raise failure(f"environment: {config.environment!r} is not a valid environment name")
    failed_run = _run_tag(context, FAILED_RUN_TAG)
    resumed = liveness.resumed_by(context.instance, failed_run) if failed_run else None
    if resumed is not None:
        context.log.info(f"release run {failed_run[:8]} was resumed by run {resumed.run_id[:8]} ({resumed.status.value}) "
                         "after this rollback was requested: standing down, nothing rolled back")
        return {"environment": config.environment, "noop": True, "stood_down": True, "bad_version": config.bad_version,
                "target_version": "", "reason": f"release {failed_run[:8]} resumed by {resumed.run_id[:8]}"}
    hist = history.load(context.instance, config.environment)
    if not hist.events:
        raise failure(f"environment: no release history for '{config.environment}' (unknown environment?)")
    # What is serving, read from the runtime (the record may lag behind a crashed release).
    newest_spec = next((history.spec_json(e) for e in hist.events if history.spec_json(e)), None)
    serving_versions: set[str] = set()
    standby = None
    if newest_spec:
        try:
            target = deploy_targets.for_spec(ReleaseSpec.from_json(newest_spec))
            serving_versions = target.serving_versions()
            standby = target.standby()
        except Exception as exc:  # noqa: BLE001 - reported, the plan continues from the record
            context.log.warning(f"could not read the serving state from the target: {type(exc).__name__}: {exc}")
    recorded = hist.serving_version
    if len(serving_versions) > 1:
        context.log.warning(f"inconsistent state: {', '.join(sorted(serving_versions))} are all serving "
                            f"'{config.environment}' (an interrupted rollout?); the rollback replaces every instance")
    if config.bad_version:
        bad = config.bad_version
    elif not serving_versions:
        bad = ""  # nothing serves (e.g. the process manager lost its processes): restore the last good version
        context.log.warning(f"nothing is serving '{config.environment}' according to the target")
    else:
        unrecorded = sorted(v for v in serving_versions if v != recorded or v in hist.bad_versions)
        bad = unrecorded[0] if unrecorded else (recorded or "")
    if config.target_version:
        good = hist.release_of(config.target_version)
        if not good:
            raise failure(f"target_version: {config.target_version!r} was never released to '{config.environment}'")
        if config.target_version in hist.bad_versions and not config.force:
            raise failure(f"target_version: {config.target_version} is marked bad; set force: true to use it anyway")
    else:
        good = hist.last_good(exclude={bad} if bad else None)
        if not good:
            raise failure(f"no known-good version of '{config.environment}' to roll back to "
                             f"(history: {'; '.join(hist.summary(5))})")
    try:  # the one validation of this run's spec: the later steps trust the plan
        ReleaseSpec.from_json(history.spec_json(good) or {}, version=good.version)
    except SpecError as exc:
        raise failure(f"the release record of {good.version} cannot be rolled back to: {exc}") from None
    switched = (standby.switched if standby and standby.switched.get("to_version") == good.version and standby.retiring
                else {})
    noop = serving_versions == {good.version} and not switched
    bad_record = hist.release_of(bad) if bad else None
    bad_events = [e for e in hist.events if e.version == bad]
    migrations = next((e.get("migrations") for e in bad_events if e.get("migrations")), []) or []
    backup_id = next((e.get("backup_id") for e in bad_events if e.get("backup_id")), "") or ""
    plan = {
        "environment": config.environment,
        "bad_version": bad,
        "target_version": good.version,
        "target_spec": history.spec_json(good),
        "target_artifact": good.get("artifact"),
        "serving_before": sorted(serving_versions),
        "reason": config.reason,
        "noop": noop,
        "bad_release_migrations": migrations,
        "pre_migration_backup": backup_id,
        "bad_was_recorded_serving": bool(bad_record),
        "switched": switched,
        "standby": standby.to_json() if standby else {},
    }
    if migrations:
        context.log.warning(f"{bad} applied migrations {', '.join(migrations)}; this rollback restores the app only. "
                            f"{restore_advice(backup_id)} Nothing is restored automatically.")
    if switched:
        context.log.info(f"traffic of '{config.environment}' is already on the warm standby of {good.version} (switched by "
                         f"{switched.get('by') or '?'} at {time.strftime('%H:%M:%S', time.gmtime(switched['at']))}Z); "
                         f"this run stops the replaced instances ({', '.join(r['name'] for r in standby.retiring)}) "
                         "and records the rollback")
    if noop:
        context.log.info(f"{good.version} is already what serves '{config.environment}'; nothing to roll back")
    else:
        notifier.announce(context.log, f":rewind: rollback of {config.environment} started: {bad or '?'} -> {good.version} "
                                       f"({config.reason})", level="warning")
    context.add_output_metadata({
        "environment": config.environment,
        "from_version": bad or "unknown",
        "to_version": good.version,
        "serving_before": dg.MetadataValue.json(sorted(serving_versions)),
        "noop": noop,
        "bad_release_migrations": dg.MetadataValue.json(migrations),
        "pre_migration_backup": backup_id or "none",
        "standby": standby.summary() if standby else "none",
    })
    return plan


@dg.op(
    description="Puts the rollback target back. With a warm standby of it (PM2, target.standby_s): a traffic switch "
                "(the standby healthy on its own ports, one nginx reload, the bad instances drained and stopped), or "
                "only the stop of the bad instances when a sensor switched already. Otherwise it redeploys through the "
                "same target and rolling procedure, built for speed: the last good release's artifact is kept ready "
                "(no rebuild) and every new instance starts at once; an old instance leaves only when a new one is "
                "healthy, so no request is dropped.",
    tags={"stage": "rollback"},
)
def rollback_deploy(context: dg.OpExecutionContext, plan: dict, local_stack: LocalStack, postgres: PostgresResource,
                    deploy_targets: DeployTargets) -> dict:
    if plan["noop"]:
        return {**plan, "rollout": None}
    spec = ReleaseSpec.from_json(plan["target_spec"], version=plan["target_version"], validate=False)
    env = resolve_app_env(spec.config, local_stack)
    take_environment_lock(context, spec, postgres, env.database_url)
    target = deploy_targets.for_spec(spec, env.redactor)
    if plan.get("switched"):
        stopped = target.finish_switch(context.log.info)
        switch = {"ok": True, "already": True, "by": plan["switched"].get("by", ""), "stopped": stopped,
                  "version": spec.version}
        context.add_output_metadata({"switch": dg.MetadataValue.json(switch), "new_processes": 0, "target": target.kind})
        return {**plan, "rollout": None, "switch": switch}
    result = target.switch_to_standby(spec.version, context.log.info, retire=True, by=f"rollback run {context.run_id[:8]}")
    if result.ok:
        context.add_output_metadata({"switch": dg.MetadataValue.json(result.to_json()), "switch_s": result.seconds,
                                     "new_processes": 0, "target": target.kind})
        return {**plan, "rollout": None, "switch": result.to_json()}
    if target.kind == "pm2":
        context.log.info(f"no traffic switch to a standby of {spec.version}: {result.detail}; redeploying it")
    artifact = Artifact.from_json(plan["target_artifact"])
    try:
        report = target.rollout(artifact, spec.version, env.for_process(), context.log.info, surge_all=True)
    except RolloutError as exc:
        context.log_event(history.materialization(
            spec.environment, history.ROLLBACK_FAILED, spec.version, run_id=context.run_id, from_version=plan["bad_version"],
            reason=env.redactor(str(exc))[:2000], stage="rollback_deploy"))
        raise failure(f"rollback to {spec.version} failed: {env.redactor(str(exc))}",
                         metadata=rollout_metadata(exc.report, target)) from None
    # the instances this rollout replaced are the bad version's: never kept as a standby
    discarded = target.retire_standby(context.log.info, f"{plan['bad_version'] or 'the replaced version'} is being "
                                      "rolled back: not kept as a standby")
    context.add_output_metadata({**rollout_metadata(report, target), "standby_discarded": dg.MetadataValue.json(discarded)})
    return {**plan, "rollout": report.to_json(), "switch": None}


@dg.op(
    description="The same health gate as a release, for the restored version; then the history records the rollback "
                "(the removed version is marked bad) and the rollback is announced.",
    tags={"stage": "rollback"},
)
def rollback_gate(context: dg.OpExecutionContext, deployed: dict, local_stack: LocalStack, deploy_targets: DeployTargets,
                  notifier: Notifier) -> dict:
    if deployed.get("stood_down"):
        context.log.info(f"no rollback: {deployed['reason']}")
        return {"version": "", "stood_down": True}
    spec = ReleaseSpec.from_json(deployed["target_spec"], version=deployed["target_version"], validate=False)
    env = resolve_app_env(spec.config, local_stack)
    target = deploy_targets.for_spec(spec, env.redactor)
    ok, evidence, _ = run_gate(spec, spec.version, deploy_targets.prober, target, context.log.info)
    if not ok:
        context.log_event(history.materialization(
            spec.environment, history.ROLLBACK_FAILED, spec.version, run_id=context.run_id, from_version=deployed["bad_version"],
            reason="health gate failed after rollback", gate=evidence, stage="rollback_gate"))
        notifier.announce(context.log, f":x: rollback of {spec.environment} to {spec.version} FAILED its health gate", level="error")
        raise failure("rollback health gate failed. Last answers:\n" + "\n".join(evidence["last_answers"]))
    if not deployed["noop"] or deployed["bad_version"] != spec.version:
        context.log_event(history.materialization(
            spec.environment, history.ROLLED_BACK, spec.version, run_id=context.run_id, url=spec.public_url,
            description=f"rolled back {deployed['bad_version'] or '?'} -> {spec.version}: {deployed['reason']}",
            from_version=deployed["bad_version"] if deployed["bad_version"] != spec.version else None,
            reason=deployed["reason"], artifact=deployed["target_artifact"], spec=deployed["target_spec"], gate=evidence,
            migrations_left_in_place=deployed["bad_release_migrations"], pre_migration_backup=deployed["pre_migration_backup"],
            standby_switch=deployed.get("switch"),
        ))
    if not deployed["noop"]:
        notifier.announce(context.log, f":white_check_mark: rollback of {spec.environment} finished: {spec.version} serving "
                                       f"(p95 {evidence['p95_ms']} ms)")
    context.add_output_metadata({"version": spec.version, "probes": evidence["probes"], "p95_ms": evidence["p95_ms"],
                                 "deployed_url": dg.MetadataValue.url(spec.public_url)})
    return {"version": spec.version, "gate": evidence}


class RetireStandbyConfig(dg.Config):
    """Which environment's standby to stop, and which generation (the deploy that made it)."""

    environment: str = Field("local", description="Environment whose warm standby's window ended.")
    generation: str = Field("", description="Only this standby generation (empty: whichever, once expired).")


@dg.op(
    description="Stops an environment's warm standby once its window ended (and any instance a traffic switch left "
                "running): its PM2 processes are deleted, their ports freed. A standby replaced since, or not expired "
                "yet, is left alone.",
    tags={"stage": "rollback"},
)
def stop_standby(context: dg.OpExecutionContext, config: RetireStandbyConfig, deploy_targets: DeployTargets) -> list:
    if not ENV_NAME.match(config.environment or ""):
        raise failure(f"environment: {config.environment!r} is not a valid environment name")
    hist = history.load(context.instance, config.environment)
    newest_spec = next((history.spec_json(e) for e in hist.events if history.spec_json(e)), None)
    if not newest_spec:
        raise failure(f"environment: no release history for '{config.environment}' (unknown environment?)")
    target = deploy_targets.for_spec(ReleaseSpec.from_json(newest_spec))
    before = target.standby()
    stopped = target.retire_standby(context.log.info, "the standby window ended", only_expired=True,
                                    generation=config.generation)
    context.log.info(f"stopped {', '.join(stopped)}" if stopped else
                     f"nothing to stop: {before.summary() if before else 'no standby'}")
    context.add_output_metadata({"environment": config.environment, "stopped": dg.MetadataValue.json(stopped),
                                 "standby_before": before.summary() if before else "none"})
    return stopped
