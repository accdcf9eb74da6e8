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
from ops_pipeline.targets.base import Artifact, DeployTarget, RolloutError
from ops_pipeline.targets.resource import DeployTargets


def rollout_metadata(report, target: DeployTarget) -> dict:
    standby = {"standby": dg.MetadataValue.json(report.standby),
               "standby_rss_mb": round(report.standby.get("rss_bytes", 0) / 2**20, 1)} if report.standby else {}
    return {
        "instances_rolled": dg.MetadataValue.json(report.instances),
        "order": dg.MetadataValue.json(report.order()),
        "previous_versions": dg.MetadataValue.json(report.previous_versions),
        "rollout_s": round(report.duration_s, 2),
        "target": target.kind,
        **standby,  # the warm standby the rollout left (PM2 target.standby_s) and its measured memory
    }


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
        report = target.rollout(artifact, spec.version, env.for_process(), context.log.info)
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
