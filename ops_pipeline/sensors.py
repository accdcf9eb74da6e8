"""Sensors that roll a bad release back: a health watch over every released environment, and release failures.

The sensor daemon evaluates a sensor about every 5 s whatever its interval says, so the health watch
probes several times per evaluation (default 5 probes 1 s apart, so evaluations follow each other with no
gap) and keeps consecutive failures in its JSON cursor across evaluations: three failed probes in a row (never a single blip) request one rollback
per incident, keyed on environment + bad version.

Settings (environment, read at load): OPS_HEALTH_FAILURE_THRESHOLD (3), OPS_HEALTH_PROBES_PER_TICK (5),
OPS_HEALTH_PROBE_INTERVAL_S (1.0), OPS_HEALTH_PROBE_TIMEOUT_S (2.0).
"""

import json
import os
import time

import dagster as dg

from ops_pipeline import history
from ops_pipeline.spec import ReleaseSpec
from ops_pipeline.jobs import release, rollback
from ops_pipeline.resources.health import HttpProber
from ops_pipeline.resources.targets import DeployTargets

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED]
DEPLOY_STEPS = {"rolling_deploy", "health_gate"}
RELEASE_FAILURE_GRACE_S = 60


def _setting(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum} (got {value})")
    return value


THRESHOLD = int(_setting("OPS_HEALTH_FAILURE_THRESHOLD", 3, 1))
PROBES_PER_TICK = int(_setting("OPS_HEALTH_PROBES_PER_TICK", 5, 1))
PROBE_INTERVAL_S = _setting("OPS_HEALTH_PROBE_INTERVAL_S", 1.0, 0.05)
PROBE_TIMEOUT_S = _setting("OPS_HEALTH_PROBE_TIMEOUT_S", 2.0, 0.1)


def active_runs(instance: dg.DagsterInstance, environment: str) -> list:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={"ops/environment": environment}, statuses=ACTIVE), limit=5))


def rollback_request(environment: str, bad_version: str, reason: str, run_key: str, trigger: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=run_key,
        run_config={"ops": {"plan_rollback": {"config": {"environment": environment, "bad_version": bad_version,
                                                         "reason": reason}}}},
        tags={"ops/environment": environment, "ops/trigger": trigger, "ops/bad_version": bad_version},
    )


def evaluate_environment(environment: str, state: dict, hist: history.EnvironmentHistory, prober: HttpProber,
                         instance: dg.DagsterInstance, *, threshold: int = THRESHOLD, probes: int = PROBES_PER_TICK,
                         interval_s: float = PROBE_INTERVAL_S, timeout_s: float = PROBE_TIMEOUT_S,
                         log=None) -> tuple[dict, dg.RunRequest | None, str]:
    """Probe one environment; returns (new state, run request or None, note)."""
    serving = hist.serving_version
    record = hist.release_of(serving) if serving else None
    recorded = history.spec_json(record) if record else None
    if not recorded:
        return {}, None, f"{environment}: nothing released yet"
    spec = ReleaseSpec.from_json(recorded)
    url = spec.health_url
    if state.get("serving") != serving:
        state = {"serving": serving, "failures": 0}
    for i in range(probes):
        p = prober.probe(url, timeout_s=timeout_s, version_from=spec.app.health_version)
        state["probes"] = state.get("probes", 0) + 1
        if p.ok:
            if state.get("failures"):
                state["recovered_at"] = time.time()
            state["failures"] = 0
            state.pop("first_failure_at", None)
            state["last_ok"] = p.version
        else:
            state["failures"] = state.get("failures", 0) + 1
            state.setdefault("first_failure_at", time.time())
            state["bad_version"] = p.version or serving
            state["last_error"] = p.summary()[:300]
            if state["failures"] >= threshold:
                break
        if i + 1 < probes:
            time.sleep(interval_s)
    if state.get("failures", 0) < threshold:
        return state, None, f"{environment}: {serving} healthy" if not state.get("failures") else \
            f"{environment}: {state['failures']} consecutive failed probe(s), below threshold {threshold}"
    bad = state.get("bad_version") or serving
    latest = hist.latest()
    if (latest is not None and latest.event == history.RELEASE_FAILED and latest.version == bad
            and time.time() - latest.timestamp < RELEASE_FAILURE_GRACE_S):
        # A release that failed at deploy/gate is the release-failure sensor's incident; take over only if it has
        # not acted within the grace period (e.g. it is stopped).
        return state, None, f"{environment}: {bad} failed its release; rollback_on_release_failure handles it"
    requested = list(instance.get_runs(filters=dg.RunsFilter(
        job_name=rollback.name, tags={"ops/environment": environment, "ops/bad_version": bad}), limit=1))
    if requested:
        return state, None, f"{environment}: rollback of {bad} already requested (run {requested[0].run_id[:8]})"
    running = active_runs(instance, environment)
    if running:
        return state, None, f"{environment}: unhealthy, but run {running[0].run_id[:8]} ({running[0].job_name}) is in progress"
    good = hist.last_good(exclude={bad})
    if good is None:
        latest = hist.latest()
        if latest is not None and latest.event == history.ROLLED_BACK and latest.version == bad:
            return state, None, f"{environment}: the last good version {bad} is what is failing; a rollback would not help"
        return state, None, f"{environment}: {bad} unhealthy and no known-good version to roll back to"
    reason = (f"health watch: {state['failures']} consecutive failed probes of {url} since "
              f"{time.strftime('%H:%M:%S', time.gmtime(state['first_failure_at']))}Z ({state.get('last_error', '')})")
    key = f"health:{environment}:{bad}"
    state["requested"] = key
    return state, rollback_request(environment, bad, reason, key, "health_watch"), f"{environment}: rollback of {bad} requested"


@dg.sensor(
    name="health_watch",
    job=rollback,
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches every environment's health endpoint after release: several probes per evaluation, consecutive "
        "failures kept in the cursor; at 3 (default) it requests one rollback per incident (run key: environment + "
        "bad version), none while a release or rollback of that environment runs, none when the last good version is "
        "the one failing. A single blip never triggers a rollback; an HTTP error is a failed probe, never a crashed tick."
    ),
)
def health_watch(context: dg.SensorEvaluationContext, deploy_targets: DeployTargets) -> dg.SensorResult:
    try:
        cursor = json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        cursor = {}
    requests, notes = [], []
    try:
        envs = history.environments(context.instance)
    except Exception as exc:  # noqa: BLE001 - a tick must never crash
        return dg.SensorResult(skip_reason=f"cannot read release history: {type(exc).__name__}", cursor=json.dumps(cursor))
    for env in envs:
        try:
            hist = history.load(context.instance, env, limit=100)
            state, request, note = evaluate_environment(env, cursor.get(env, {}), hist, deploy_targets.prober, context.instance)
            cursor[env] = state
            notes.append(note)
            if request:
                requests.append(request)
                context.log.warning(f"{note}: {request.run_config['ops']['plan_rollback']['config']['reason']}")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"{env}: sensor error {type(exc).__name__}: {str(exc)[:200]}")
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor),
                           skip_reason=None if requests else ("; ".join(notes) or "no released environment"))


@dg.run_failure_sensor(
    name="rollback_on_release_failure",
    # All code locations, then only runs of the release job (below): a release started with `dagster job execute`
    # belongs to the location the CLI names after the module, not to this workspace's `ops_pipeline`, and
    # `monitored_jobs` would never see it fail.
    monitor_all_code_locations=True,
    request_job=rollback,
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "When a release fails at or after the deploy started (rolling_deploy or health_gate), requests a rollback of "
        "that environment (one per failed run). A release that failed before anything was deployed requests nothing. "
        "It acts only on the release job (however it was launched: UI, `dagster job launch`, `dagster job execute`), "
        "so a failing rollback never requests another rollback."
    ),
)
def rollback_on_release_failure(context: dg.RunFailureSensorContext):
    run = context.dagster_run
    if run.job_name != release.name:
        return dg.SkipReason(f"{run.job_name} run {run.run_id[:8]} failed: only failed releases request a rollback")
    failed_steps = sorted({e.step_key for e in context.get_step_failure_events() if e.step_key})
    if not set(failed_steps) & DEPLOY_STEPS:
        return dg.SkipReason(f"release {run.run_id[:8]} failed at {', '.join(failed_steps) or 'start'}, before anything "
                             "was deployed: nothing to roll back")
    cfg = (run.run_config or {}).get("ops", {}).get("verify_env", {}).get("config", {})
    environment = run.tags.get("ops/environment") or cfg.get("environment") or "local"
    bad = run.tags.get("ops/version") or cfg.get("version") or ""
    return rollback_request(environment, bad, f"release run {run.run_id[:8]} failed at {', '.join(failed_steps)}",
                            f"release-failed:{run.run_id}", "release_failure")
