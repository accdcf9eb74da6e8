"""health_gate: K consecutive healthy answers reporting the NEW version, within a deadline; then recorded."""

import time

import dagster as dg

from ops_pipeline.platform import history
from ops_pipeline.platform.app_env import resolve_app_env
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import PostgresResource
from ops_pipeline.platform.prober import HttpProber, Probe, percentile
from ops_pipeline.platform.spec import DeployTargetKind, ReleaseSpec
from ops_pipeline.release.approval import approval_record
from ops_pipeline.release.ops.artifact import prune_artifacts
from ops_pipeline.release.ops.migrate import take_environment_lock
from ops_pipeline.targets.resource import DeployTargets


def run_gate(spec: ReleaseSpec, version: str, prober: HttpProber, target, log) -> tuple[bool, dict, list[Probe]]:
    """The gate both releases and rollbacks pass: the public URL, then every instance on its own."""
    g = spec.gate
    t0 = time.monotonic()
    wait = prober.wait_healthy(spec.health_url, version=version, successes=g.required_successes,
                               interval_s=g.interval_s, timeout_s=g.request_timeout_s, deadline_s=g.deadline_s,
                               version_from=spec.app.health_version)
    ok, probes = wait.ok, wait.probes
    instance_probes: list[Probe] = []
    if ok:
        for inst in target.serving():
            if inst.probe_url:
                instance_probes.append(prober.probe(inst.probe_url, timeout_s=g.request_timeout_s,
                                                           version_from=spec.app.health_version))
        stale = [p for p in instance_probes if not p.healthy_for(version)]
        if stale:
            ok = False
            log(f"instances not serving {version} healthily: {'; '.join(p.summary() for p in stale)}")
    latencies = [p.latency_ms for p in probes + instance_probes]
    evidence = {
        "url": spec.health_url,
        "version": version,
        "probes": len(probes) + len(instance_probes),
        "healthy_probes": sum(1 for p in probes if p.healthy_for(version)),
        "required_consecutive": g.required_successes,
        "seconds": round(time.monotonic() - t0, 2),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
        "instances_checked": len(instance_probes),
        "last_answers": [p.summary() for p in (probes[-5:] + instance_probes[-5:])],
    }
    return ok, evidence, probes + instance_probes


@dg.op(
    description=(
        "Polls the health endpoint until K consecutive healthy answers report the new version (defaults: 1 s interval, "
        "5 s request timeout, K=3, 120 s deadline), then checks every instance on its own. Records probe count and "
        "p50/p95 latency. On success the release joins the release history (deployments/<environment>); on failure "
        "the version is marked bad and the last answers are shown."
    ),
    tags={"stage": "gate"},
)
def health_gate(
    context: dg.OpExecutionContext,
    spec: ReleaseSpec,
    deployment: dict,
    local_stack: LocalStack,
    postgres: PostgresResource,
    deploy_targets: DeployTargets,
) -> dict:
    env = resolve_app_env(spec.config, local_stack)
    # Held since the migration in a whole run; a run resumed from here (re-execute from failure) takes it now.
    take_environment_lock(context, spec, postgres, env.database_url)
    target = deploy_targets.for_spec(spec, env.redactor)
    ok, evidence, _ = run_gate(spec, spec.version, deploy_targets.prober, target, context.log.info)
    md = {
        "probes": evidence["probes"],
        "p50_ms": evidence["p50_ms"],
        "p95_ms": evidence["p95_ms"],
        "gate_s": evidence["seconds"],
        "last_answers": dg.MetadataValue.json(evidence["last_answers"]),
        "deployed_url": dg.MetadataValue.url(spec.public_url),
    }
    if not ok:
        context.log_event(history.materialization(
            spec.environment, history.RELEASE_FAILED, spec.version, run_id=context.run_id, stage="health_gate",
            reason="health gate failed", gate=evidence, artifact=deployment["artifact"], migrations=deployment["migrations"],
            backup_id=deployment["backup_id"],
        ))
        raise failure((f"health gate failed: no {spec.gate.required_successes} consecutive healthy answers reporting "
                         f"{spec.version} from {spec.health_url} within {spec.gate.deadline_s:g} s. Last answers:\n"
                         + "\n".join(evidence["last_answers"])),
            metadata=md)
    hist = history.load(context.instance, spec.environment)
    previous = hist.serving_version
    context.log_event(history.materialization(
        spec.environment, history.RELEASED, spec.version, run_id=context.run_id, url=spec.public_url,
        description=f"released {spec.version}" + (f" over {previous}" if previous else ""),
        artifact=deployment["artifact"], commit=deployment["artifact"].get("commit"), migrations=deployment["migrations"],
        backup_id=deployment["backup_id"], gate=evidence, spec=spec.to_json(), previous_version=previous or "",
        target=spec.target.kind.value, instances=spec.target.instances, **approval_record(context),
    ))
    last_good = hist.last_good(exclude={spec.version})
    keep = {spec.version} | ({last_good.version} if last_good else set())
    target.prune(keep, context.log.info)
    if spec.target.kind == DeployTargetKind.pm2:
        prune_artifacts(spec.app.name, spec.target.pm2.keep_releases, target.artifacts_in_use(), context.log.info)
    context.add_output_metadata(md)
    context.log.info(f"{spec.version} is serving at {spec.public_url} ({evidence['probes']} probes, p95 {evidence['p95_ms']} ms)")
    return {"version": spec.version, "url": spec.public_url, "gate": evidence}
