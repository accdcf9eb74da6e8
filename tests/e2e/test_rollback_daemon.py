"""Automatic rollback with a real dagster-daemon (sensors, run queue) and a real app under PM2."""

import json
import time

import httpx
import pytest
from dagster import DagsterEventType

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from tests import app_variants
from tests.conftest import release_run_config

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemon")]


def versions_served(port: int, n: int = 12) -> set[str]:
    seen = set()
    for _ in range(n):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=3, headers={"Connection": "close"})
            seen.add(f"{r.json().get('version')}:{r.status_code}")
        except httpx.HTTPError as exc:
            seen.add(type(exc).__name__)
    return seen


def release(stack, app, env, version, port, **kw) -> str:
    run_id = stack.submit("release", release_run_config(app, env, version=version, port=port, fast=True, **kw),
                          tags={"ops/environment": env})
    return run_id


def wait_for(predicate, timeout_s: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def rollbacks(stack, env):
    return stack.runs("rollback", tags={"ops/environment": env})


@pytest.fixture
def released_v1(dagster_stack, node_app, environment_name, pm2_cleanup):
    env = environment_name
    pm2_cleanup(env)
    port = free_port()
    run = dagster_stack.wait_run(release(dagster_stack, node_app, env, "v1", port))
    assert run.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert versions_served(port) == {"v1:200"}
    return env, port


@pytest.mark.parametrize("standby_s", [0, 300], ids=["redeploy", "warm-standby"])
def test_health_watch_rolls_back_a_release_that_turns_unhealthy(dagster_stack, released_v1, app_variant, tmp_path,
                                                                standby_s):
    """Without a standby the rollback run redeploys v1; with one (target.standby_s), the health watch itself switches
    the traffic to v1's warm instances and the run only stops v2's (no process started)."""
    env, port = released_v1
    break_file = tmp_path / "v2-breaks"
    v2 = app_variant("v2", app_variants.health_503_when_file_exists(break_file))
    run = dagster_stack.wait_run(release(dagster_stack, v2, env, "v2", port, target={"standby_s": standby_s}))
    assert run.status.value == "SUCCESS"
    assert versions_served(port) == {"v2:200"}

    break_file.touch()  # v2 starts answering 503
    t0 = time.monotonic()
    wait_for(lambda: versions_served(port, 4) == {"v1:200"}, 90, "v1 serving again")
    recovered_s = time.monotonic() - t0
    rb = wait_for(lambda: [r for r in rollbacks(dagster_stack, env) if r.is_finished], 60, "the rollback run to finish")
    assert len(rb) == 1 and rb[0].status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert rb[0].tags["dagster/sensor_name"] == "health_watch"
    assert rb[0].tags["dagster/run_key"] == f"health:{env}:v2"
    with dagster_stack.instance() as inst:
        hist = history.load(inst, env)
    assert hist.events[0].event == history.ROLLED_BACK and hist.events[0].version == "v1"
    assert hist.events[0].get("from_version") == "v2"
    assert "v2" in hist.bad_versions and hist.serving_version == "v1"
    assert versions_served(port, 20) == {"v1:200"}
    with dagster_stack.instance() as inst:
        outputs = {e.step_key: e.dagster_event.event_specific_data.metadata
                   for e in inst.all_logs(rb[0].run_id, of_type=DagsterEventType.STEP_OUTPUT)}
        logs = "\n".join(e.user_message for e in inst.all_logs(rb[0].run_id))
    deploy = outputs["rollback_deploy"]
    if standby_s:
        assert deploy["new_processes"].value == 0, deploy
        assert "is already on the warm standby of v1 (switched by health_watch" in logs, logs[-2000:]
    else:
        assert "new_processes" not in deploy and len(deploy["instances_rolled"].value) == 2, deploy
        assert "no traffic switch to a standby of v1" in logs and "redeploying it" in logs
    time.sleep(12)  # more sensor ticks: still exactly one rollback for this incident
    assert len(rollbacks(dagster_stack, env)) == 1
    print(f"first failing probe -> v1 serving ({'warm standby' if standby_s else 'redeploy'}): {recovered_s:.1f} s")


@pytest.mark.parametrize("launched_with", ["ui", "dagster job execute"])
def test_failed_health_gate_triggers_the_release_failure_rollback(dagster_stack, released_v1, app_variant, launched_with,
                                                                  tmp_path):
    env, port = released_v1
    # Each new instance passes its own readiness check in its first second, then the whole version turns 503
    # after 4 s of uptime: 8 consecutive healthy answers 1 s apart can never be reached.
    v2 = app_variant("v2-gate", app_variants.health_503_after_uptime(4))
    gate = {"deadline_s": 12, "interval_s": 1, "required_successes": 8}
    if launched_with == "ui":
        run = dagster_stack.wait_run(release(dagster_stack, v2, env, "v2", port, gate=gate))
    else:  # executes in the CLI process, in a code location of its own: the sensor must still see it fail
        config = tmp_path / "release.yaml"
        config.write_text(json.dumps(release_run_config(v2, env, version="v2", port=port, fast=True, gate=gate)))
        cli = dagster_stack.execute_cli("release", config, tags={"ops/environment": env})
        assert cli.returncode != 0, cli.stdout[-2000:]
        run = dagster_stack.runs("release", tags={"ops/environment": env})[0]  # newest first
        assert run.tags.get("dagster/sensor_name") is None and run.is_finished
    assert run.status.value == "FAILURE"
    rb = wait_for(lambda: [r for r in rollbacks(dagster_stack, env) if r.is_finished], 90, "a finished rollback")
    assert rb[0].status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert rb[0].tags["dagster/sensor_name"] == "rollback_on_release_failure"
    assert rb[0].tags["dagster/run_key"] == f"release-failed:{run.run_id}"
    wait_for(lambda: versions_served(port, 6) == {"v1:200"}, 30, "v1 serving")
    time.sleep(8)
    assert len(rollbacks(dagster_stack, env)) == 1  # the health watch did not pile a second rollback on top


def test_release_failing_in_tests_requests_no_rollback(dagster_stack, released_v1, app_variant):
    env, port = released_v1
    bad = app_variant("v2-tests", app_variants.failing_test())
    run_id = dagster_stack.submit("release", release_run_config(bad, env, version="v2", port=port),
                                  tags={"ops/environment": env})
    run = dagster_stack.wait_run(run_id)
    assert run.status.value == "FAILURE"
    time.sleep(12)  # two sensor loops after the failure
    assert rollbacks(dagster_stack, env) == []
    assert versions_served(port) == {"v1:200"}


def test_flapping_health_triggers_nothing(dagster_stack, released_v1, app_variant, tmp_path):
    env, port = released_v1
    blip = tmp_path / "blip"
    v2 = app_variant("v2-flap", app_variants.health_503_when_file_exists(blip))
    assert dagster_stack.wait_run(release(dagster_stack, v2, env, "v2", port)).status.value == "SUCCESS"
    blip.touch()
    time.sleep(1.2)  # one failed probe, maybe two: below the threshold of three
    blip.unlink()
    time.sleep(12)
    assert rollbacks(dagster_stack, env) == []
    assert versions_served(port) == {"v2:200"}
