"""The sensors use the warm standby: when the new version turns unhealthy, the health watch switches the traffic to
the standby of the last good version itself (one nginx reload, within its tick) and still requests the rollback run,
which finds the traffic already switched, stops the bad instances and records the rollback. Real PM2, nginx and load;
the sensor's tick function is driven directly, as tests/test_sensors.py does."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from bench.loadgen import Load
from ops_pipeline.platform import history
from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.release import standby as warm
from ops_pipeline.release.sensors import rollback_on_release_failure, watch_tick
from ops_pipeline.targets.resource import DeployTargets
from tests import app_variants
from tests.standby.conftest import listening, run_messages
from tests.test_sensors import stand_in_release

pytestmark = pytest.mark.xdist_group("standby")


def test_health_watch_switches_to_the_standby_itself_and_the_rollback_run_finishes(node_app, app_variant, standby_env,
                                                                                    state_dir, monkeypatch):
    env = standby_env
    break_file = state_dir / f"{env.name}-breaks"
    env.release(node_app, "v1", standby_s=300)
    env.release(app_variant("latent", app_variants.health_503_when_file_exists(break_file)), "v2", standby_s=300)
    target = env.target()
    standby = target.standby()
    standby_names, standby_ports = {r["name"] for r in standby.instances}, {r["port"] for r in standby.instances}
    bad = target.serving()
    targets = DeployTargets.with_defaults()

    with Load(env.port, rate=200) as load:
        time.sleep(1)
        break_file.touch()
        t0 = time.monotonic()
        cursor, requests, outcomes = {}, [], []
        while not requests and time.monotonic() - t0 < 30:
            cursor, requests, outcomes = watch_tick(env.instance, cursor, HttpProber(), probes=5, interval_s=0.2,
                                                    targets=targets)
        took = time.monotonic() - t0
        public = env.public_versions(20)
        time.sleep(1)
    note = next(n for e, _, n in outcomes if e == env.name)
    assert "traffic switched to the warm standby of v1" in note, note
    assert public == {"v1:200"}, "every request is served by v1 as soon as the tick returns"
    assert took < 8, f"{took:.1f} s from breaking v2 to the switch"
    res = load.result
    assert res.requests > 300 and res.failed == 0, res
    (req,) = requests
    assert req.job_name == "rollback" and req.run_key == f"health:{env.name}:v2"
    assert "switched to the warm standby of v1" in req.run_config["ops"]["plan_rollback"]["config"]["reason"]
    # v2 is out of traffic but not stopped yet; what serves is the former standby
    assert {i.name for i in target.serving()} == standby_names and env.upstream_ports() == standby_ports
    assert set(env.pm2()) == standby_names | {i.name for i in bad}
    assert {r["name"] for r in target.standby().retiring} == {i.name for i in bad}
    assert target.current_version() == "v1"
    # the switch is idempotent: asked again, nothing changes
    again = target.switch_to_standby("v1", print, retire=False, by="test")
    assert again.ok and again.already and env.upstream_ports() == standby_ports
    # had the rollback run never stopped v2 (it died), the health watch would ask a retire_standby run to
    monkeypatch.setattr(warm, "LEFT_BEHIND_S", 0)
    _, later, _ = watch_tick(env.instance, {}, HttpProber(), probes=1, targets=targets)
    assert [(r.job_name, r.run_key) for r in later] == [
        ("retire_standby", f"standby:{env.name}:{standby.generation}:left-behind")]
    monkeypatch.undo()

    # the rollback run the sensor requested finds the traffic switched and finishes the job
    rb = env.rollback(req.run_config, req.tags)
    assert rb.success
    messages = "\n".join(run_messages(env.instance, rb.run_id))
    assert "already on the warm standby of v1" in messages, messages[-3000:]
    assert set(env.pm2()) == standby_names, "nothing started, v2 stopped"
    assert not any(listening(i.extra["port"]) for i in bad)
    latest = history.load(env.instance, env.name).latest()
    assert latest.event == history.ROLLED_BACK and latest.version == "v1" and latest.get("from_version") == "v2"
    assert latest.get("standby_switch", {}).get("already") is True
    assert target.standby() is None or not (target.standby().instances or target.standby().retiring)
    # and the health watch is quiet afterwards: v1 healthy, nothing requested
    _, requests, outcomes = watch_tick(env.instance, {}, HttpProber(), probes=2, interval_s=0.2, targets=targets)
    assert requests == [] and next(k for e, k, _ in outcomes if e == env.name) == "healthy"


def test_release_failure_sensor_switches_to_the_standby_before_requesting_the_rollback(node_app, standby_env):
    env = standby_env
    env.release(node_app, "v1", standby_s=300)
    env.release(node_app, "v2", standby_s=300)
    target = env.target()
    standby_ports = {r["port"] for r in target.standby().instances}
    result = stand_in_release("health_gate", environment=env.name, version="v2").execute_in_process(instance=env.instance,
                                                                            raise_on_error=False)
    ctx = dg.build_run_status_sensor_context(sensor_name="rollback_on_release_failure", dagster_instance=env.instance,
                                             dagster_run=result.dagster_run,
                                             dagster_event=result.get_run_failure_event()).for_run_failure()
    out = rollback_on_release_failure(ctx)
    assert isinstance(out, dg.RunRequest) and out.run_key == f"release-failed:{result.run_id}"
    assert "traffic switched to the warm standby of v1" in out.run_config["ops"]["plan_rollback"]["config"]["reason"]
    assert env.upstream_ports() == standby_ports and env.public_versions() == {"v1:200"}
    rb = env.rollback(out.run_config, out.tags)
    assert rb.success and {p["pm2_env"]["APP_VERSION"] for p in env.pm2().values()} == {"v1"}
