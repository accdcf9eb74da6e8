"""Sensor logic with build_sensor_context / build_run_status_sensor_context against a real HTTP endpoint."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from ops_pipeline import history
from ops_pipeline.resources.health import HttpProber
from ops_pipeline.resources.targets import DeployTargets
from ops_pipeline.sensors import evaluate_environment, health_watch, rollback_on_release_failure
from ops_pipeline.spec import ReleaseConfig, ReleaseSpec


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
    import ops_pipeline.sensors as sensors

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

def stand_in_release(failing_step: str, job_name: str = "release") -> dg.JobDefinition:
    """A job shaped like `release` whose `failing_step` fails (the daemon test runs the real one)."""
    names = ["verify_env", "run_tests", "build_image", "backup_database", "migrate_database", "rolling_deploy", "health_gate"]

    def make(name):
        @dg.op(name=name, ins={"after": dg.In(dg.Nothing)})
        def _op(context):
            if name == failing_step:
                raise dg.Failure(description=f"{name} failed")
            if name == "verify_env":
                context.instance.add_run_tags(context.run_id, {"ops/environment": "prod", "ops/version": "v9"})
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
    from ops_pipeline.jobs import rollback

    assert rollback_on_release_failure.job.name == rollback.name
    for job_name in ("rollback", "backup"):
        result = stand_in_release("rolling_deploy", job_name=job_name).execute_in_process(instance=instance,
                                                                                          raise_on_error=False)
        ctx = dg.build_run_status_sensor_context(sensor_name="rollback_on_release_failure", dagster_instance=instance,
                                                 dagster_run=result.dagster_run,
                                                 dagster_event=result.get_run_failure_event()).for_run_failure()
        out = rollback_on_release_failure(ctx)
        assert isinstance(out, dg.SkipReason) and "only failed releases" in out.skip_message, out
