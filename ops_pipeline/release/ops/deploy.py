"""rolling_deploy: the new version replaces the serving instances one at a time, no request dropped."""

import dagster as dg

from ops_pipeline.platform import history
from ops_pipeline.platform.app_env import resolve_app_env
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import PostgresResource
from ops_pipeline.platform.spec import ReleaseSpec
from ops_pipeline.release.approval import wait_for_approval
from ops_pipeline.release.ops.migrate import MigrationResult, take_environment_lock
from ops_pipeline.targets import canary
from ops_pipeline.targets.base import Artifact, DeployTarget, RolloutError
from ops_pipeline.targets.resource import DeployTargets


def rollout_metadata(report, target: DeployTarget) -> dict:
    standby = {"standby": dg.MetadataValue.json(report.standby),
               "standby_rss_mb": round(report.standby.get("rss_bytes", 0) / 2**20, 1)} if report.standby else {}
    md = {
        "instances_rolled": dg.MetadataValue.json(report.instances),
        "order": dg.MetadataValue.json(report.order()),
        "previous_versions": dg.MetadataValue.json(report.previous_versions),
        "rollout_s": round(report.duration_s, 2),
        "target": target.kind,
        **standby,  # the warm standby the rollout left (PM2 target.standby_s) and its measured memory
    }
    if report.canary:
        md["canary_analysis"] = canary_table([canary.StepAnalysis.from_json(s) for s in report.canary])
        md["canary_verdict"] = report.canary[-1]["verdict"]
    return md


CANARY_COLUMNS = [("step", "int"), ("weight_pct", "int"), ("source", "string"), ("group", "string"),
                  ("requests", "int"), ("errors", "int"), ("error_rate", "float"), ("p50_ms", "float"),
                  ("p95_ms", "float"), ("verdict", "string")]


def canary_table(steps: list) -> dg.MetadataValue:
    """Every step's figures per group (front proxy, and the app's metrics when read): a table in the UI."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in CANARY_COLUMNS])
    return dg.MetadataValue.table(records=[dg.TableRecord(row) for row in canary.table_rows(steps)], schema=schema)


def canary_step_observation(environment: str, version: str, step) -> dg.AssetObservation:
    """One canary step's verdict and figures on the environment's release asset, as numbers the UI can plot."""
    md: dict = {"version": version, "step": step.step, "weight_pct": step.weight, "verdict": step.verdict,
                "window_s": round(step.window_s, 2), "analysis": canary_table([step])}
    for group, f in (("canary", step.canary), ("stable", step.stable)):
        md |= {f"{group}_requests": f.requests, f"{group}_error_rate": round(f.error_rate, 5),
               f"{group}_p50_ms": round(f.p50_ms, 2), f"{group}_p95_ms": round(f.p95_ms, 2)}
    if step.reasons:
        md["reasons"] = "; ".join(step.reasons)
    return dg.AssetObservation(asset_key=history.asset_key(environment), metadata=md,
                               description=f"canary step {step.step} ({step.weight}%) of {version}: {step.verdict}")


def hold_at_canary_step(context: dg.OpExecutionContext, spec: ReleaseSpec, step) -> str:
    """`approval.before: canary-<weight>`: wait at that step (its analysis passed, the canary serving its share) for
    the approve_release job. "" to carry on; why, when aborted or timed out (the canary is then withdrawn)."""
    try:
        wait_for_approval(context, spec, f"canary-{step.weight}")
    except dg.Failure as exc:
        return exc.description or "aborted"
    return ""


@dg.op(
    description=(
        "Rolls the new version out through the configured target (PM2 cluster, Docker Engine + nginx, or Kubernetes): "
        "one new instance at a time is started and must answer healthy with the new version on its own before one old "
        "instance is drained and stopped. A new instance that never gets healthy stops the rollout; the old ones keep serving."
    ),
    tags={"stage": "deploy"},
)
def rolling_deploy(
    context: dg.OpExecutionContext,
    spec: ReleaseSpec,
    artifact: Artifact,
    migration: MigrationResult,
    postgres: PostgresResource,
    local_stack: LocalStack,
    deploy_targets: DeployTargets,
) -> dict:
    env = resolve_app_env(spec.config, local_stack)
    take_environment_lock(context, spec, postgres, env.database_url)
    wait_for_approval(context, spec, "deploy")
    target = deploy_targets.for_spec(spec, env.redactor)
    try:
        kwargs = {}
        if spec.config.canary.enabled:  # validation allows a canary on the PM2 target only
            kwargs["on_canary_step"] = lambda step: context.log_event(
                canary_step_observation(spec.environment, spec.version, step))
            kwargs["on_canary_hold"] = lambda step: hold_at_canary_step(context, spec, step)
        report = target.rollout(artifact, spec.version, env.for_process(), context.log.info, **kwargs)
    except RolloutError as exc:
        context.log_event(history.materialization(
            spec.environment, history.RELEASE_FAILED, spec.version, run_id=context.run_id, stage="rolling_deploy",
            reason=env.redactor(str(exc))[:2000], serving_after=sorted({i.version for i in exc.serving}),
            rollout=exc.report.to_json(), artifact=artifact.to_json(),
        ))
        raise failure(env.redactor(str(exc)), metadata=rollout_metadata(exc.report, target)) from None
    context.add_output_metadata({**rollout_metadata(report, target), "deployed_url": dg.MetadataValue.url(spec.public_url)})
    return {
        "version": spec.version,
        "artifact": artifact.to_json(),
        "migrations": migration.applied,
        "backup_id": migration.backup_id,
        "rollout": report.to_json(),
        "previous_versions": report.previous_versions,
    }
