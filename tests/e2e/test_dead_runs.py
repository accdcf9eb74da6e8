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

from ops_pipeline.local_stack import free_port
from tests import app_variants
from tests.conftest import release_run_config
from tests.e2e.servers import BIN, ROOT
from tests.e2e.test_rollback_daemon import release, rollbacks, versions_served, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemon")]

DETECTION_BOUND_S = 30  # the health watch's ticks last ~5 s; a dead run is seen on the first tick after the kill


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


def test_a_killed_cli_release_is_marked_failed_by_the_health_watch_and_rolled_back(
        dagster_stack, health_watch_alone, node_app, app_variant, environment_name, pm2_cleanup, tmp_path):
    env = environment_name
    pm2_cleanup(env)
    port = free_port()
    v1 = dagster_stack.wait_run(release(dagster_stack, node_app, env, "v1", port, instances=1))
    assert v1.status.value == "SUCCESS", dagster_stack.log_tail("daemon")

    break_file = tmp_path / "v2-breaks"
    v2 = app_variant("v2-killed", app_variants.health_503_when_file_exists(break_file))
    config = tmp_path / "release.yaml"
    # a long gate: the run is alive in health_gate for minutes unless killed
    config.write_text(json.dumps(release_run_config(v2, env, version="v2", port=port, fast=True, instances=1,
                                                    gate={"interval_s": 1, "deadline_s": 600, "required_successes": 500})))
    cli = subprocess.Popen([str(BIN / "dagster"), "job", "execute", "-m", "ops_pipeline.definitions", "-j", "release",
                            "-c", str(config), "--tags", json.dumps({"ops/environment": env})],
                           cwd=ROOT, env=dagster_stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def in_gate():
            from ops_pipeline import liveness

            runs = dagster_stack.runs("release", tags={"ops/environment": env})
            if runs and runs[0].run_id != v1.run_id:
                with dagster_stack.instance() as inst:
                    if "health_gate" in liveness.unfinished_steps(inst, runs[0].run_id):
                        return runs[0]
            assert cli.poll() is None, "the CLI release ended before its gate"
            return None

        run = wait_for(in_gate, 300, "the CLI release to reach its health gate", interval=1)
        assert versions_served(port, 4) == {"v2:200"}

        # v2 turns unhealthy while its release is alive and slow: the health watch waits for it, never declares it dead
        break_file.touch()
        time.sleep(15)
        with dagster_stack.instance() as inst:
            assert inst.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert rollbacks(dagster_stack, env) == []

        os.kill(cli.pid, signal.SIGKILL)  # the process executing the run dies; its children and PM2 stay
        cli.wait()
        killed_at = time.monotonic()
        with dagster_stack.instance() as inst:
            assert inst.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # what Dagster alone leaves

        def marked_failed():
            with dagster_stack.instance() as inst:
                r = inst.get_run_by_id(run.run_id)
                return r if r.status == dg.DagsterRunStatus.FAILURE else None

        wait_for(marked_failed, DETECTION_BOUND_S, "the dead release to be marked failed")
        detected_s = time.monotonic() - killed_at
        with dagster_stack.instance() as inst:
            failure = inst.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
            message = failure[-1].event_log_entry.dagster_event.message
        assert f"no process {cli.pid}" in message and "health_watch" in message and "health_gate" in message, message
        assert f"health:{env}:v2" in message

        rb = wait_for(lambda: [r for r in rollbacks(dagster_stack, env) if r.is_finished], 180, "the rollback to finish")
        assert len(rb) == 1 and rb[0].status.value == "SUCCESS", dagster_stack.log_tail("daemon")
        assert rb[0].tags["dagster/sensor_name"] == "health_watch"
        assert rb[0].tags["dagster/run_key"] == f"health:{env}:v2"
        wait_for(lambda: versions_served(port, 4) == {"v1:200"}, 30, "v1 serving")
        time.sleep(8)
        assert len(rollbacks(dagster_stack, env)) == 1  # the release-failure sensor left the incident to it
        print(f"killed -> marked failed: {detected_s:.1f} s")
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
