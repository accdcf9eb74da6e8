"""Sensor logic with build_sensor_context / build_run_status_sensor_context against a real HTTP endpoint."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from ops_pipeline.platform import history
from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
from ops_pipeline.release.sensors import evaluate_environment, health_watch, rollback_on_release_failure
from ops_pipeline.targets.resource import DeployTargets


class FakeService:
    """A real HTTP server on loopback whose /health answer the test controls (status, version)."""

    def __init__(self) -> None:
        self.status = 200
        self.version = "v2"
        svc = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = json.dumps({"uptime": 1, "timestamp": 0, "database": "ok" if svc.status == 200 else "error",
                                   "redis": "ok", "version": svc.version}).encode()
                self.send_response(svc.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = FakeService()
    yield s
    s.close()


def record(instance, env: str, event: str, version: str, port: int, **fields):
    spec = ReleaseSpec(config=ReleaseConfig(environment=env, target={"port": port}), version=version, app_dir="/x")
    mat = history.materialization(env, event, version, spec=spec.to_json(), artifact={"kind": "bundle", "id": version}, **fields)
    instance.report_runless_asset_event(mat)


def released_twice(instance, env, port):
    record(instance, env, history.RELEASED, "v1", port)
    record(instance, env, history.RELEASED, "v2", port, migrations=["1800_add_column"], backup_id="b-123")


def tick(instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources={"deploy_targets": DeployTargets.with_defaults()}) as ctx:
        return health_watch.evaluate_tick(ctx)


def test_healthy_service_requests_nothing_and_keeps_a_cursor(instance, service):
    released_twice(instance, "prod", service.port)
    result = tick(instance)
    assert result.run_requests == [] and "healthy" in result.skip_message
    assert json.loads(result.cursor)["prod"]["failures"] == 0


def test_three_consecutive_failures_request_exactly_one_rollback_keyed_on_env_and_bad_version(instance, service, monkeypatch):
    import ops_pipeline.release.sensors as sensors

    monkeypatch.setattr(sensors, "PROBE_INTERVAL_S", 0.05)
    released_twice(instance, "prod", service.port)
    service.status = 503
    result = tick(instance)
    assert len(result.run_requests) == 1
    req = result.run_requests[0]
    assert req.run_key == "health:prod:v2"
    cfg = req.run_config["ops"]["plan_rollback"]["config"]
    assert cfg["environment"] == "prod" and cfg["bad_version"] == "v2" and "3 consecutive failed probes" in cfg["reason"]
    assert req.tags["ops/environment"] == "prod"
    state = json.loads(result.cursor)["prod"]
    assert state["failures"] >= 3 and state["bad_version"] == "v2"


def test_failures_accumulate_across_ticks_in_the_cursor(instance, service):
    released_twice(instance, "prod", service.port)
    service.status = 503
    hist = history.load(instance, "prod")
    state, req, note = evaluate_environment("prod", {}, hist, HttpProber(), instance, threshold=3, probes=2, interval_s=0.01)
    assert req is None and state["failures"] == 2 and "below threshold" in note
    state, req, _ = evaluate_environment("prod", state, hist, HttpProber(), instance, threshold=3, probes=2, interval_s=0.01)
    assert req is not None and req.run_key == "health:prod:v2"


def test_a_single_blip_never_triggers(instance, service):
    released_twice(instance, "prod", service.port)
    hist = history.load(instance, "prod")
    service.status = 503
    state, req, _ = evaluate_environment("prod", {}, hist, HttpProber(), instance, threshold=3, probes=1, interval_s=0.01)
    assert state["failures"] == 1 and req is None
    service.status = 200
    state, req, _ = evaluate_environment("prod", state, hist, HttpProber(), instance, threshold=3, probes=2, interval_s=0.01)
    assert state["failures"] == 0 and req is None


def test_connection_errors_are_failed_probes_not_crashed_ticks(instance, service):
    released_twice(instance, "prod", service.port)
    service.close()
    result = tick(instance)  # must not raise
    state = json.loads(result.cursor)["prod"]
    assert state["failures"] >= 1 and "ConnectError" in state["last_error"]


def test_no_rollback_while_a_release_of_that_environment_runs(instance, service):
    released_twice(instance, "prod", service.port)
    service.status = 503
    run = instance.create_run_for_job(dg.GraphDefinition(name="release").to_job(), tags={"ops/environment": "prod"},
                                      status=dg.DagsterRunStatus.STARTED)
    state, req, note = evaluate_environment("prod", {}, history.load(instance, "prod"), HttpProber(), instance, probes=3,
                                            interval_s=0.01)
    assert req is None and run.run_id[:8] in note


def test_no_rollback_when_the_last_good_version_is_the_one_failing(instance, service):
    record(instance, "prod", history.RELEASED, "v1", service.port)
    record(instance, "prod", history.RELEASED, "v2", service.port)
    record(instance, "prod", history.ROLLED_BACK, "v1", service.port, from_version="v2")
    service.status, service.version = 503, "v1"
    state, req, note = evaluate_environment("prod", {}, history.load(instance, "prod"), HttpProber(), instance, probes=3,
                                            interval_s=0.01)
    assert req is None and "would not help" in note


def test_history_marks_failed_and_rolled_back_versions_bad(instance, service):
    released_twice(instance, "prod", service.port)
    record(instance, "prod", history.RELEASE_FAILED, "v3", service.port, stage="health_gate")
    record(instance, "prod", history.ROLLED_BACK, "v1", service.port, from_version="v2")
    hist = history.load(instance, "prod")
    assert hist.bad_versions == {"v2", "v3"}
    assert hist.serving_version == "v1" and hist.last_good().version == "v1"
    assert history.environments(instance) == ["prod"]


# ---- release-failure sensor ------------------------------------------------------------------------

def stand_in_release(failing_step: str, job_name: str = "release", environment: str = "prod",
                     version: str = "v9") -> dg.JobDefinition:
    """A job shaped like `release` whose `failing_step` fails (the daemon test runs the real one); its verify_env tags
    the run with `environment` and `version` as the real one does."""
    names = ["verify_env", "run_tests", "build_image", "backup_database", "migrate_database", "rolling_deploy", "health_gate"]

    def make(name):
        @dg.op(name=name, ins={"after": dg.In(dg.Nothing)})
        def _op(context):
            if name == failing_step:
                raise dg.Failure(description=f"{name} failed")
            if name == "verify_env":
                context.instance.add_run_tags(context.run_id, {"ops/environment": environment, "ops/version": version})
        return _op

    @dg.job(name=job_name)
    def release():
        prev = None
        for n in names:
            prev = make(n)(after=prev) if prev is not None else make(n)()

    return release


@pytest.mark.parametrize("step, expect_rollback", [("health_gate", True), ("rolling_deploy", True), ("run_tests", False),
                                                   ("migrate_database", False), ("verify_env", False)])
def test_release_failure_sensor_rolls_back_only_after_deploy_started(instance, step, expect_rollback):
    result = stand_in_release(step).execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    ctx = dg.build_run_status_sensor_context(sensor_name="rollback_on_release_failure", dagster_instance=instance,
                                             dagster_run=result.dagster_run,
                                             dagster_event=result.get_run_failure_event()).for_run_failure()
    out = rollback_on_release_failure(ctx)
    if expect_rollback:
        assert isinstance(out, dg.RunRequest)
        assert out.run_key == f"release-failed:{result.run_id}"
        cfg = out.run_config["ops"]["plan_rollback"]["config"]
        assert cfg["environment"] == "prod" and cfg["bad_version"] == "v9"
    else:
        assert isinstance(out, dg.SkipReason) and "before anything was deployed" in out.skip_message


def test_release_failure_sensor_acts_only_on_the_release_job(instance):
    """It watches every code location (a `dagster job execute` release has its own), so the job name decides:
    a rollback (or any other job) failing at the same step requests nothing."""
    from ops_pipeline.release.jobs import rollback

    assert rollback_on_release_failure.job.name == rollback.name
    for job_name in ("rollback", "backup"):
        result = stand_in_release("rolling_deploy", job_name=job_name).execute_in_process(instance=instance,
                                                                                          raise_on_error=False)
        ctx = dg.build_run_status_sensor_context(sensor_name="rollback_on_release_failure", dagster_instance=instance,
                                                 dagster_run=result.dagster_run,
                                                 dagster_event=result.get_run_failure_event()).for_run_failure()
        out = rollback_on_release_failure(ctx)
        assert isinstance(out, dg.SkipReason) and "only failed releases" in out.skip_message, out


# ---- many environments at once ---------------------------------------------------------------------------

def test_all_environments_are_probed_at_the_same_time_with_a_readable_note_and_a_small_cursor(instance):
    import time as _time

    from ops_pipeline.release.sensors import SharedClientProber, tick_note, watch_tick

    services = [FakeService() for _ in range(12)]
    try:
        for i, svc in enumerate(services):
            released_twice(instance, f"env{i:02d}", svc.port)
        services[3].status = services[7].status = 503
        prober = SharedClientProber(HttpProber())
        t0 = _time.monotonic()
        cursor, requests, outcomes = watch_tick(instance, {}, prober, probes=3, interval_s=0.3, threshold=3)
        elapsed = _time.monotonic() - t0
        prober.close()
    finally:
        for svc in services:
            svc.close()
    # one environment alone takes (probes - 1) x interval = 0.6 s; twelve one after another would take 7 s
    assert elapsed < 3.5, elapsed
    assert sorted(r.run_key for r in requests) == ["health:env03:v2", "health:env07:v2"]
    assert all(cursor[f"env{i:02d}"]["probes"] == 3 for i in range(12) if i not in (3, 7))
    assert max(len(json.dumps(state)) for state in cursor.values()) < 400  # a few numbers, no probe history
    note = tick_note(outcomes, elapsed)
    lines = note.splitlines()
    assert lines[0].startswith("12 environment(s) probed in") and "10 healthy" in lines[0] and "2 requested" in lines[0]
    assert len(lines) == 3 and lines[1].startswith("env03:") and lines[2].startswith("env07:")


def test_the_note_names_at_most_twenty_environments():
    from ops_pipeline.release.sensors import tick_note

    outcomes = [(f"e{i}", "failing", f"e{i}: 1 consecutive failed probe(s), below threshold 3") for i in range(30)]
    outcomes += [(f"h{i}", "healthy", f"h{i}: v1 healthy") for i in range(20)]
    lines = tick_note(outcomes, 4.2).splitlines()
    assert lines[0] == "50 environment(s) probed in 4.2 s: 20 healthy, 30 failing"
    assert len(lines) == 22 and lines[-1].startswith("... and 10 more")


# ---- dead runs -------------------------------------------------------------------------------------------

def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def failure_event(instance, run):
    return instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records[-1] \
        .event_log_entry.dagster_event


def started_release(instance, env: str, pid: int, steps=("verify_env", "migrate_database", "rolling_deploy")):
    """A release run left STARTED by a process `pid`, in the middle of its last step (as a killed CLI run leaves it)."""
    from dagster._core.events import DagsterEvent, DagsterEventType

    job = dg.GraphDefinition(name="release").to_job()
    run = instance.create_run_for_job(job, tags={"ops/environment": env, "ops/version": "v2"},
                                      status=dg.DagsterRunStatus.NOT_STARTED)
    instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_START.value, "release", pid=pid), run.run_id)
    for i, step in enumerate(steps):
        instance.report_dagster_event(DagsterEvent(DagsterEventType.STEP_START.value, "release", pid=pid, step_key=step),
                                      run.run_id)
        if i + 1 < len(steps):
            instance.report_dagster_event(
                DagsterEvent(DagsterEventType.STEP_SUCCESS.value, "release", pid=pid, step_key=step,
                             event_specific_data=dg._core.execution.plan.objects.StepSuccessData(duration_ms=1.0)),
                run.run_id)
    return instance.get_run_by_id(run.run_id)


def test_a_dead_release_run_is_marked_failed_and_no_longer_blocks_the_rollback(instance, service):
    released_twice(instance, "prod", service.port)
    service.status = 503
    run = started_release(instance, "prod", dead_pid())
    assert run.status == dg.DagsterRunStatus.STARTED
    state, req, note = evaluate_environment("prod", {}, history.load(instance, "prod"), HttpProber(), instance, probes=3,
                                            interval_s=0.01)
    assert req is not None and req.run_key == "health:prod:v2", note
    assert f"run {run.run_id[:8]} (release) was dead" in note and "marked failed" in note
    failed = instance.get_run_by_id(run.run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    message = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records[-1] \
        .event_log_entry.dagster_event.message
    assert "health_watch" in message and "rolling_deploy" in message and "health:prod:v2" in message
    # the release-failure sensor sees the same failure and leaves the incident to the health watch's rollback
    ctx = dg.build_run_status_sensor_context(sensor_name="rollback_on_release_failure", dagster_instance=instance,
                                             dagster_run=failed, dagster_event=failure_event(instance, failed)
                                             ).for_run_failure()
    out = rollback_on_release_failure(ctx)
    assert isinstance(out, dg.SkipReason) and "health_watch requested its rollback" in out.skip_message


def test_a_live_release_run_still_blocks_the_rollback(instance, service):
    import os

    released_twice(instance, "prod", service.port)
    service.status = 503
    run = started_release(instance, "prod", os.getpid())  # this very process: alive, started before the run
    state, req, note = evaluate_environment("prod", {}, history.load(instance, "prod"), HttpProber(), instance, probes=3,
                                            interval_s=0.01)
    assert req is None and f"run {run.run_id[:8]} (release) is in progress" in note
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED


@pytest.mark.parametrize("steps, expect_rollback", [(("verify_env", "migrate_database", "rolling_deploy"), True),
                                                    (("verify_env", "run_tests"), False)])
def test_a_release_that_died_in_its_deploy_gets_a_rollback_from_the_release_failure_sensor(instance, steps,
                                                                                          expect_rollback):
    from ops_pipeline.release.sensors import run_liveness

    run = started_release(instance, "prod", dead_pid(), steps=steps)
    out = run_liveness(dg.build_sensor_context(instance=instance))
    assert "1 declared dead" in out.skip_message
    failed = instance.get_run_by_id(run.run_id)
    ctx = dg.build_run_status_sensor_context(sensor_name="rollback_on_release_failure", dagster_instance=instance,
                                             dagster_run=failed, dagster_event=failure_event(instance, failed)
                                             ).for_run_failure()
    out = rollback_on_release_failure(ctx)
    if expect_rollback:
        assert isinstance(out, dg.RunRequest) and out.run_key == f"release-failed:{run.run_id}"
        assert "rolling_deploy (its process died)" in out.run_config["ops"]["plan_rollback"]["config"]["reason"]
    else:
        assert isinstance(out, dg.SkipReason) and "before anything was deployed" in out.skip_message
