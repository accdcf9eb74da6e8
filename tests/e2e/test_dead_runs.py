"""A release executed by `dagster job execute` and killed with SIGKILL during its deploy, with a real dagster-daemon
and a real app under PM2: the health watch finds the run dead, marks it failed with the explanation, and its rollback
runs through the queue (never stuck QUEUED behind the dead run). While the same run was alive, it was never declared
dead."""

import json
import os
import signal
import subprocess
import time

import dagster as dg
import pytest

from ops_pipeline.platform.local_stack import free_port
from tests import app_variants
from tests.conftest import release_run_config
from tests.e2e.servers import BIN, ROOT
from tests.e2e.test_rollback_daemon import release, rollbacks, versions_served, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemon")]

# the health watch's ticks last ~5 s and run_liveness runs every 10 s: a dead run is seen on the first one after the kill
DETECTION_BOUND_S = 30


def sensor_cli(stack, action: str, name: str) -> None:
    out = subprocess.run([str(BIN / "dagster"), "sensor", action, name, "-w", "workspace.yaml"], cwd=ROOT, env=stack.env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-1000:] + out.stderr[-2000:]


@pytest.fixture
def health_watch_alone(dagster_stack):
    """The run_liveness sweep stopped for the test, so that the health watch is the one that finds the dead run."""
    sensor_cli(dagster_stack, "stop", "run_liveness")
    yield
    sensor_cli(dagster_stack, "start", "run_liveness")


def release_v1(stack, node_app, env, port):
    v1 = stack.wait_run(release(stack, node_app, env, "v1", port, instances=1))
    assert v1.status.value == "SUCCESS", stack.log_tail("daemon")
    return v1


def cli_release_in_its_gate(stack, app, env, port, tmp_path, after_run_id):
    """`dagster job execute` of a v2 release whose gate lasts minutes; returns (process, run) once in health_gate."""
    from ops_pipeline.release import liveness

    config = tmp_path / "release.yaml"
    config.write_text(json.dumps(release_run_config(app, env, version="v2", port=port, fast=True, instances=1,
                                                    gate={"interval_s": 1, "deadline_s": 600, "required_successes": 500})))
    cli = subprocess.Popen([str(BIN / "dagster"), "job", "execute", "-m", "ops_pipeline.definitions", "-j", "release",
                            "-c", str(config), "--tags", json.dumps({"ops/environment": env})],
                           cwd=ROOT, env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def in_gate():
        runs = stack.runs("release", tags={"ops/environment": env})
        if runs and runs[0].run_id != after_run_id:
            with stack.instance() as inst:
                if "health_gate" in liveness.unfinished_steps(inst, runs[0].run_id):
                    return runs[0]
        assert cli.poll() is None, "the CLI release ended before its gate"
        return None

    try:
        return cli, wait_for(in_gate, 300, "the CLI release to reach its health gate", interval=1)
    except BaseException:
        cli.kill()
        cli.wait()
        raise


def kill(cli) -> float:
    os.kill(cli.pid, signal.SIGKILL)  # the process executing the run dies; its children and PM2 stay
    cli.wait()
    return time.monotonic()


def failure_message(stack, run_id: str) -> str:
    with stack.instance() as inst:
        failure = inst.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return failure[-1].event_log_entry.dagster_event.message


def status(stack, run_id: str) -> dg.DagsterRunStatus:
    with stack.instance() as inst:
        return inst.get_run_by_id(run_id).status


def test_a_killed_cli_release_is_marked_failed_by_the_health_watch_and_rolled_back(
        dagster_stack, health_watch_alone, node_app, app_variant, environment_name, pm2_cleanup, tmp_path):
    env = environment_name
    pm2_cleanup(env)
    port = free_port()
    v1 = release_v1(dagster_stack, node_app, env, port)
    break_file = tmp_path / "v2-breaks"
    v2 = app_variant("v2-killed", app_variants.health_503_when_file_exists(break_file))
    cli, run = cli_release_in_its_gate(dagster_stack, v2, env, port, tmp_path, v1.run_id)
    try:
        assert versions_served(port, 4) == {"v2:200"}
        # v2 turns unhealthy while its release is alive and slow: the health watch waits for it, never declares it dead
        break_file.touch()
        time.sleep(15)
        assert status(dagster_stack, run.run_id) == dg.DagsterRunStatus.STARTED
        assert rollbacks(dagster_stack, env) == []

        killed_at = kill(cli)
        assert status(dagster_stack, run.run_id) == dg.DagsterRunStatus.STARTED  # what Dagster alone leaves
        wait_for(lambda: status(dagster_stack, run.run_id) == dg.DagsterRunStatus.FAILURE, DETECTION_BOUND_S,
                 "the dead release to be marked failed")
        detected_s = time.monotonic() - killed_at
        message = failure_message(dagster_stack, run.run_id)
        assert f"no process {cli.pid}" in message and "health_watch" in message and "health_gate" in message, message
        assert f"health:{env}:v2" in message

        rb = wait_for(lambda: [r for r in rollbacks(dagster_stack, env) if r.is_finished], 180, "the rollback to finish")
        assert len(rb) == 1 and rb[0].status.value == "SUCCESS", dagster_stack.log_tail("daemon")
        assert rb[0].tags["dagster/sensor_name"] == "health_watch"
        assert rb[0].tags["dagster/run_key"] == f"health:{env}:v2"
        wait_for(lambda: versions_served(port, 4) == {"v1:200"}, 30, "v1 serving")
        time.sleep(8)
        assert len(rollbacks(dagster_stack, env)) == 1  # the release-failure sensor left the incident to it
        print(f"killed -> marked failed by the health watch: {detected_s:.1f} s")
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_a_run_queued_behind_a_killed_cli_release_is_unblocked_by_the_sweep(
        dagster_stack, node_app, app_variant, environment_name, pm2_cleanup, tmp_path):
    """No incident (v2 stays healthy): run_liveness alone finds the dead release; a rollback queued behind it (one run
    per ops/environment) starts and completes, and the release-failure sensor adds no second one."""
    env = environment_name
    pm2_cleanup(env)
    port = free_port()
    v1 = release_v1(dagster_stack, node_app, env, port)
    cli, run = cli_release_in_its_gate(dagster_stack, app_variant("v2-healthy"), env, port, tmp_path, v1.run_id)
    try:
        killed_at = kill(cli)
        queued = dagster_stack.submit("rollback", {"ops": {"plan_rollback": {"config": {
            "environment": env, "bad_version": "v2", "reason": "operator: the release died"}}}},
            tags={"ops/environment": env, "ops/bad_version": "v2"})
        wait_for(lambda: status(dagster_stack, run.run_id) == dg.DagsterRunStatus.FAILURE, DETECTION_BOUND_S,
                 "the sweep to mark the dead release failed")
        detected_s = time.monotonic() - killed_at
        message = failure_message(dagster_stack, run.run_id)
        assert f"no process {cli.pid}" in message and "run_liveness" in message and "health_gate" in message, message
        done = dagster_stack.wait_run(queued, 180)
        assert done.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
        wait_for(lambda: versions_served(port, 4) == {"v1:200"}, 30, "v1 serving")
        time.sleep(8)
        assert [r.run_id for r in rollbacks(dagster_stack, env)] == [queued]
        print(f"killed -> marked failed by the sweep: {detected_s:.1f} s")
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
