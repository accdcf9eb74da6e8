"""Sensors that roll a bad release back: a health watch over every released environment, release failures, and
dead runs swept so they never block either.

The sensor daemon evaluates a sensor about every 5 s whatever its interval says, so the health watch
probes several times per evaluation (default 5 probes 1 s apart, so evaluations follow each other with no
gap) and keeps consecutive failures in its JSON cursor across evaluations: three failed probes in a row (never a single blip) request one rollback
per incident, keyed on environment + bad version.

Every environment is probed at the same time (one thread each, up to OPS_HEALTH_MAX_PARALLEL, all through one
HTTP client with a bounded number of connections, a fresh connection per probe), so an evaluation lasts about
probes x interval whatever the number of environments (bench/health_watch.py). Its cursor keeps a few numbers per
environment; its note is one summary line plus the environments that are not healthy.

A run of an environment that is in progress blocks the health watch's rollback, unless its process is dead
(ops_pipeline/release/liveness.py): then it is marked failed and the rollback goes ahead. A rollback of the incident
that died (e.g. killed with the daemon) does not count as requested: another one is requested under a run key of its
own (at most MAX_DEAD_ROLLBACKS dead ones per incident). `run_liveness` sweeps every
in-progress run of this project's jobs on its own, so a dead one never keeps the queue blocked.

With a warm standby of the last good version (PM2 target, `target.standby_s`), the sensor that confirms the failure
(the health watch, or the release-failure sensor) first switches the traffic to it itself, then requests the rollback
run, which finishes the job: the reasoning (latency) is in ops_pipeline/release/standby.py. The health watch also
requests a `retire_standby` run for a standby whose window ended.

Settings (platform/settings.py, parsed once at load): OPS_HEALTH_FAILURE_THRESHOLD (3), OPS_HEALTH_PROBES_PER_TICK (5),
OPS_HEALTH_PROBE_INTERVAL_S (1.0), OPS_HEALTH_PROBE_TIMEOUT_S (2.0), OPS_HEALTH_MAX_PARALLEL (64).
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg

from ops_pipeline.backup.jobs import backup, restore_database_job, restore_drill_job
from ops_pipeline.platform import history
from ops_pipeline.platform.prober import HttpProber, Probe
from ops_pipeline.platform.settings import settings
from ops_pipeline.platform.spec import ReleaseSpec, SpecError
from ops_pipeline.release import liveness
from ops_pipeline.release import standby as warm
from ops_pipeline.release.approval import APPROVAL_TAG
from ops_pipeline.release.jobs import approve_release, plan, release, retire_standby_job, rollback
from ops_pipeline.release.liveness import FAILED_RUN_TAG
from ops_pipeline.targets.resource import DeployTargets

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED]
DEPLOY_STEPS = {"rolling_deploy", "health_gate"}
RELEASE_FAILURE_GRACE_S = 60


THRESHOLD = settings().health_failure_threshold
PROBES_PER_TICK = settings().health_probes_per_tick
PROBE_INTERVAL_S = settings().health_probe_interval_s
PROBE_TIMEOUT_S = settings().health_probe_timeout_s
MAX_PARALLEL = settings().health_max_parallel
PROBE_TIMEOUT_FLOOR_S = 0.5  # a probe started at the deadline (the one every environment gets) waits this long at least
MAX_DEAD_ROLLBACKS = 3  # rollbacks of one incident that died before the health watch stops requesting another
NOTE_MAX_ENVIRONMENTS = 20  # environments named in a tick's note beyond the summary line
PROJECT_JOBS = {release.name, rollback.name, plan.name, approve_release.name, backup.name, restore_drill_job.name,
                restore_database_job.name, retire_standby_job.name}


class SharedClientProber:
    """HttpProber.probe through one shared client for a whole evaluation (250 probes at 50 environments)."""

    def __init__(self, prober: HttpProber, max_connections: int = MAX_PARALLEL) -> None:
        self.prober = prober
        self.user_agent = prober.user_agent
        self.client = prober.shared_client(max_connections)

    def probe(self, url: str, timeout_s: float = 5.0, version_from: str = "json:version") -> Probe:
        return self.prober.probe(url, timeout_s=timeout_s, version_from=version_from, client=self.client)

    def close(self) -> None:
        self.client.close()


def active_runs(instance: dg.DagsterInstance, environment: str) -> list:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={"ops/environment": environment}, statuses=ACTIVE), limit=5))


def rollback_request(environment: str, bad_version: str, reason: str, run_key: str, trigger: str,
                     failed_run: str = "") -> dg.RunRequest:
    """`failed_run`: the failed release this rollback answers; if that release is resumed (re-executed from failure)
    before the rollback runs, the rollback stands down (plan_rollback)."""
    return dg.RunRequest(
        job_name=rollback.name,
        run_key=run_key,
        run_config={"ops": {"plan_rollback": {"config": {"environment": environment, "bad_version": bad_version,
                                                         "reason": reason}}}},
        tags={"ops/environment": environment, "ops/trigger": trigger, "ops/bad_version": bad_version,
              **({FAILED_RUN_TAG: failed_run} if failed_run else {})},
    )


def rollback_died(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """A rollback run whose process died: declared dead by the liveness checks, or in progress with a dead process."""
    if run.status == dg.DagsterRunStatus.FAILURE:
        return liveness.death_record(instance, run.run_id) is not None
    if run.status in liveness.IN_PROGRESS:
        return liveness.check_run(instance, run).dead
    return False


def evaluate_environment(environment: str, state: dict, hist: history.EnvironmentHistory, prober: HttpProber,
                         instance: dg.DagsterInstance, *, threshold: int = THRESHOLD, probes: int = PROBES_PER_TICK,
                         interval_s: float = PROBE_INTERVAL_S, timeout_s: float = PROBE_TIMEOUT_S,
                         deadline: float | None = None, log=None, targets: DeployTargets | None = None,
                         ) -> tuple[dict, dg.RunRequest | None, str]:
    """Probe one environment; returns (new state, run request or None, note). `deadline` (time.monotonic()) bounds
    the probing: no probe starts after it, but one probe always happens. With `targets`, a confirmed failure first
    switches the traffic to a warm standby of the last good version (ops_pipeline/release/standby.py)."""
    serving = hist.serving_version
    record = hist.release_of(serving) if serving else None
    recorded = history.spec_json(record) if record else None
    if not recorded:
        return {}, None, f"{environment}: nothing released yet"
    try:
        spec = ReleaseSpec.from_json(recorded)
    except SpecError as exc:
        return state, None, f"{environment}: not watched, the release record of {serving} is invalid: {exc.problems[0]}"
    url = spec.health_url
    if state.get("serving") != serving:
        state = {"serving": serving, "failures": 0}
    for i in range(probes):
        left = timeout_s if deadline is None else min(timeout_s, max(PROBE_TIMEOUT_FLOOR_S, deadline - time.monotonic()))
        p = prober.probe(url, timeout_s=left, version_from=spec.app.health_version)
        state["probes"] = state.get("probes", 0) + 1
        if p.ok:
            if state.get("failures"):
                state["recovered_at"] = round(time.time(), 1)
            state["failures"] = 0
            for key in ("first_failure_at", "last_error", "bad_version"):
                state.pop(key, None)
            state["last_ok"] = p.version
        else:
            state["failures"] = state.get("failures", 0) + 1
            state.setdefault("first_failure_at", round(time.time(), 1))
            state["bad_version"] = p.version or serving
            state["last_error"] = p.summary()[:200]
            if state["failures"] >= threshold:
                break
        if i + 1 < probes:
            if deadline is not None and time.monotonic() + interval_s > deadline:
                break
            time.sleep(interval_s)
    if state.get("failures", 0) < threshold:
        return state, None, f"{environment}: {serving} healthy" if not state.get("failures") else \
            f"{environment}: {state['failures']} consecutive failed probe(s), below threshold {threshold} " \
            f"({state.get('last_error', '')[:120]})"
    bad = state.get("bad_version") or serving
    latest = hist.latest()
    if (latest is not None and latest.event == history.RELEASE_FAILED and latest.version == bad
            and time.time() - latest.timestamp < RELEASE_FAILURE_GRACE_S):
        # A release that failed at deploy/gate is the release-failure sensor's incident; take over only if it has
        # not acted within the grace period (e.g. it is stopped).
        return state, None, f"{environment}: {bad} failed its release; rollback_on_release_failure handles it"
    requested = list(instance.get_runs(filters=dg.RunsFilter(
        job_name=rollback.name, tags={"ops/environment": environment, "ops/bad_version": bad}), limit=MAX_DEAD_ROLLBACKS))
    key = f"health:{environment}:{bad}"
    retry_note = ""
    if requested:
        prior = requested[0]
        if not rollback_died(instance, prior):
            return state, None, f"{environment}: rollback of {bad} already requested (run {prior.run_id[:8]})"
        # The rollback requested for this incident died (its process killed, e.g. with the daemon): marked failed by
        # the liveness checks, it rolled nothing back. Another one, under a run key of its own (a run key is used once).
        dead = sum(1 for r in requested if rollback_died(instance, r))
        if dead >= MAX_DEAD_ROLLBACKS:
            return state, None, (f"{environment}: {dead} rollbacks of {bad} died (last: run {prior.run_id[:8]}); not "
                                 "requesting another: roll back by hand")
        key = f"{key}:after-{prior.run_id[:8]}"
        retry_note = f"; rollback run {prior.run_id[:8]} died, requesting another"
    good = hist.last_good(exclude={bad})
    running, declared = [], []
    for run in active_runs(instance, environment):
        verdict = liveness.check_run(instance, run) if run.status in liveness.IN_PROGRESS else None
        if verdict is not None and verdict.dead:
            declared.append((run, verdict))
        else:
            running.append(run)
    for run, verdict in declared:
        # the rollback goes ahead only when nothing else of this environment runs and there is somewhere to go
        liveness.declare_dead(instance, run, verdict, detected_by="health_watch",
                              rollback=key if good is not None and not running else "")
    dead_note = "".join(f"; run {r.run_id[:8]} ({r.job_name}) was dead ({v.reason}): marked failed" for r, v in declared)
    if running:
        return state, None, (f"{environment}: unhealthy, but run {running[0].run_id[:8]} ({running[0].job_name}) is in "
                             f"progress{dead_note}")
    if good is None:
        latest = hist.latest()
        if latest is not None and latest.event == history.ROLLED_BACK and latest.version == bad:
            return state, None, f"{environment}: the last good version {bad} is what is failing; a rollback would not help{dead_note}"
        return state, None, f"{environment}: {bad} unhealthy and no known-good version to roll back to{dead_note}"
    reason = (f"health watch: {state['failures']} consecutive failed probes of {url} since "
              f"{time.strftime('%H:%M:%S', time.gmtime(state['first_failure_at']))}Z ({state.get('last_error', '')})")
    switch_note = ""
    if targets is not None:
        switched, switch_note = warm.switch(spec, good.version, targets, by="health_watch")
        if switched:
            state["switched_at"] = round(time.time(), 1)
            reason += f"; traffic switched to the warm standby of {good.version} by the health watch"
    state["requested"] = key
    return state, rollback_request(environment, bad, reason, key, "health_watch"), \
        f"{environment}: rollback of {bad} requested{switch_note}{retry_note}{dead_note}"


def watch_tick(instance: dg.DagsterInstance, cursor: dict, prober: HttpProber, *, probes: int | None = None,
               interval_s: float | None = None, timeout_s: float | None = None, threshold: int | None = None,
               max_parallel: int | None = None, targets: DeployTargets | None = None,
               ) -> tuple[dict, list[dg.RunRequest], list[tuple[str, str, str]]]:
    """One evaluation over every released environment, all probed at the same time. Returns (new cursor, run
    requests, [(environment, kind, note)]) with kind one of healthy | failing | unhealthy | requested | idle | error.
    Settings default to the module's (read at call time). With `targets`, warm standbys are used and swept."""
    probes = PROBES_PER_TICK if probes is None else probes
    interval_s = PROBE_INTERVAL_S if interval_s is None else interval_s
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    threshold = THRESHOLD if threshold is None else threshold
    max_parallel = MAX_PARALLEL if max_parallel is None else max_parallel
    envs = history.environments(instance)
    # probing lasts about probes x interval; the bound leaves room for a last probe's timeout, and never passes half
    # of Dagster's sensor timeout (a tick cut by it saves no cursor and requests nothing), whatever OPS_HEALTH_* say
    budget_s = min(max(probes - 1, 0) * interval_s + timeout_s, tick_limit_s())
    deadline = time.monotonic() + budget_s

    def one(env: str):
        try:
            hist = history.load(instance, env, limit=100)
            state, request, note = evaluate_environment(env, dict(cursor.get(env, {})), hist, prober, instance,
                                                        threshold=threshold, probes=probes, interval_s=interval_s,
                                                        timeout_s=timeout_s, deadline=deadline, targets=targets)
            extra = warm.expiry_for(env, hist, targets) if targets is not None and request is None else None
            if extra is not None:
                note += (f"; retire_standby requested (warm standby of {extra.tags['ops/standby_version']}: "
                         f"{extra.tags['ops/standby_reason']})")
            if request is not None:
                kind = "requested"
            elif not state:
                kind = "idle"
            elif state.get("failures", 0) == 0:
                kind = "healthy"
            elif state.get("failures", 0) < threshold:
                kind = "failing"
            else:
                kind = "unhealthy"
            return env, state, [r for r in (request, extra) if r is not None], kind, note
        except Exception as exc:  # noqa: BLE001 - one environment's error never crashes the tick
            return env, cursor.get(env, {}), [], "error", f"{env}: sensor error {type(exc).__name__}: {str(exc)[:200]}"

    results = []
    if envs:
        with ThreadPoolExecutor(max_workers=max(1, min(len(envs), max_parallel)), thread_name_prefix="health") as pool:
            results = list(pool.map(one, envs))
    new_cursor = {env: state for env, state, _, _, _ in results if state}  # environments gone leave the cursor
    requests = [r for _, _, rs, _, _ in results for r in rs]
    return new_cursor, requests, [(env, kind, note) for env, _, _, kind, note in results]


def tick_limit_s() -> float:
    """Half of Dagster's sensor evaluation timeout (DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS, 60 s by default)."""
    from dagster._grpc.utils import default_sensor_grpc_timeout

    return default_sensor_grpc_timeout() / 2


def tick_note(outcomes: list[tuple[str, str, str]], elapsed_s: float, limit: int = NOTE_MAX_ENVIRONMENTS,
              summary_suffix: str = "") -> str:
    """One summary line, then only the environments that are not healthy (at most `limit`)."""
    if not outcomes:
        return "no released environment"
    counts: dict[str, int] = {}
    for _, kind, _ in outcomes:
        counts[kind] = counts.get(kind, 0) + 1
    order = ["healthy", "failing", "unhealthy", "requested", "error", "idle"]
    summary = (f"{len(outcomes)} environment(s) probed in {elapsed_s:.1f} s: "
               + ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) + summary_suffix)
    attention = [note for _, kind, note in outcomes if kind not in ("healthy", "idle")]
    lines = [summary] + attention[:limit]
    if len(attention) > limit:
        lines.append(f"... and {len(attention) - limit} more not healthy (see the sensor's cursor)")
    return "\n".join(lines)


@dg.sensor(
    name="health_watch",
    jobs=[rollback, retire_standby_job],
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches every environment's health endpoint after release, all environments at once: several probes per "
        "evaluation, consecutive failures kept in the cursor; at 3 (default) it requests one rollback per incident (run "
        "key: environment + bad version), none while a release or rollback of that environment runs (unless that run's "
        "process is dead: then it is marked failed and the rollback goes ahead), none when the last good version is the "
        "one failing. A single blip never triggers a rollback; an HTTP error is a failed probe, never a crashed tick. "
        "With a warm standby of the last good version it switches the traffic to it first (one nginx reload), and "
        "requests retire_standby when a standby's window ends."
    ),
)
def health_watch(context: dg.SensorEvaluationContext, deploy_targets: DeployTargets) -> dg.SensorResult:
    try:
        cursor = json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        cursor = {}
    started = time.monotonic()
    prober = SharedClientProber(deploy_targets.prober)
    try:
        cursor, requests, outcomes = watch_tick(context.instance, cursor, prober, targets=deploy_targets)
    except Exception as exc:  # noqa: BLE001 - a tick must never crash
        return dg.SensorResult(skip_reason=f"cannot read release history: {type(exc).__name__}", cursor=json.dumps(cursor))
    finally:
        prober.close()
    natural_s = max(PROBES_PER_TICK - 1, 0) * PROBE_INTERVAL_S + PROBE_TIMEOUT_S
    cut = (f" (probing cut at {tick_limit_s():.0f} s, half the sensor timeout; OPS_HEALTH_* ask for {natural_s:.0f} s)"
           if natural_s > tick_limit_s() else "")
    note = tick_note(outcomes, time.monotonic() - started, summary_suffix=cut)
    for env, kind, text in outcomes:
        if kind == "requested":
            request = next(r for r in requests if r.tags.get("ops/environment") == env and r.job_name == rollback.name)
            context.log.warning(f"{text}: {request.run_config['ops']['plan_rollback']['config']['reason']}")
    if any(kind not in ("healthy", "idle") for _, kind, _ in outcomes):
        context.log.info(note)
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor),
                           skip_reason=None if requests else note)


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
    died = ""
    if not failed_steps:
        # A run whose process died (declared dead by ops_pipeline.release.liveness, or by Dagster's run monitoring) has no
        # step failure: it failed in the steps it started and never finished.
        death = liveness.death_record(context.instance, run.run_id)
        if death and death.get("rollback"):
            return dg.SkipReason(f"release {run.run_id[:8]} died; {death.get('detected_by')} requested its rollback "
                                 f"({death['rollback']})")
        failed_steps = liveness.unfinished_steps(context.instance, run.run_id)
        died = " (its process died)" if failed_steps else ""
    if not set(failed_steps) & DEPLOY_STEPS:
        return dg.SkipReason(f"release {run.run_id[:8]} failed at {', '.join(failed_steps) or 'start'}, before anything "
                             "was deployed: nothing to roll back")
    if run.tags.get(APPROVAL_TAG) in ("aborted", "timed out"):
        return dg.SkipReason(f"release {run.run_id[:8]} was {run.tags[APPROVAL_TAG]} while waiting for approval before "
                             f"{run.tags.get('ops/approval_stage')}: nothing was deployed")
    resumed = liveness.resumed_by(context.instance, run.run_id)
    if resumed is not None:
        return dg.SkipReason(f"release {run.run_id[:8]} failed at {', '.join(failed_steps)} and was resumed by run "
                             f"{resumed.run_id[:8]} ({resumed.status.value}): no rollback")
    cfg = (run.run_config or {}).get("ops", {}).get("verify_env", {}).get("config", {})
    environment = run.tags.get("ops/environment") or cfg.get("environment") or "local"
    bad = run.tags.get("ops/version") or cfg.get("version") or ""
    if died:
        # the health watch may have seen the same incident first: one rollback per (environment, bad version)
        requested = [r for r in context.instance.get_runs(filters=dg.RunsFilter(
            job_name=rollback.name, tags={"ops/environment": environment, "ops/bad_version": bad}), limit=5)]
        if requested:
            return dg.SkipReason(f"release {run.run_id[:8]} died{died}; rollback of {bad} already requested "
                                 f"(run {requested[0].run_id[:8]})")
    reason = f"release run {run.run_id[:8]} failed at {', '.join(failed_steps)}{died}"
    try:
        note = warm.switch_for_failed_release(context.instance, environment, bad, "rollback_on_release_failure",
                                              active_runs)
    except Exception as exc:  # noqa: BLE001 - the rollback is requested whatever happens to the switch
        note = f"warm standby not used ({type(exc).__name__}: {str(exc)[:200]})"
    if note:
        context.log.info(f"{environment}: {note}")
        reason += f"; {note}"
    return rollback_request(environment, bad, reason, f"release-failed:{run.run_id}", "release_failure",
                            failed_run=run.run_id)


@dg.sensor(
    name="run_liveness",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Sweeps every in-progress run of this project's jobs, however it was launched (including `dagster job "
        "execute` / `dg launch`, which have no run launcher): a run whose process is dead (gone, a zombie, or its pid "
        "reused) is marked failed with the evidence, so it never keeps the run queue, the health watch or the next "
        "release waiting. A run that is only slow is never declared dead. See ops_pipeline/release/liveness.py."
    ),
)
def run_liveness(context: dg.SensorEvaluationContext):
    results = liveness.sweep(context.instance, job_names=PROJECT_JOBS, detected_by="run_liveness")
    for run, verdict, declared in results:
        if declared:
            context.log.warning(f"run {run.run_id[:8]} ({run.job_name}) declared dead: {verdict.reason}")
    dead = [f"{r.run_id[:8]} ({r.job_name}): {v.reason}" for r, v, d in results if d]
    unknown = [f"{r.run_id[:8]} ({r.job_name}): {v.reason}" for r, v, _ in results if v.state == liveness.UNKNOWN]
    alive = sum(1 for _, v, _ in results if v.state == liveness.ALIVE)
    lines = [f"{len(results)} run(s) in progress: {alive} alive, {len(dead)} declared dead, {len(unknown)} unknown"]
    lines += [f"dead: {d}" for d in dead] + [f"unknown: {u}" for u in unknown[:10]]
    return dg.SkipReason("\n".join(lines))
