"""Warm standby on the PM2 target, against real PM2 processes, the real nginx front proxy and real load
(bench/loadgen.py): what serves and what waits after a release, the rollback as a traffic switch, expiry, no window."""

from __future__ import annotations

import time

import pytest

from bench.loadgen import Load
from ops_pipeline.platform import history
from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.release import status
from ops_pipeline.release.sensors import watch_tick
from ops_pipeline.targets.resource import DeployTargets
from tests.standby.conftest import listening, own_health, run_messages, step_metadata

# the tests under load run one after the other in one worker (pytest-xdist --dist loadgroup)
pytestmark = pytest.mark.xdist_group("standby")


def test_release_keeps_the_old_version_warm_out_of_traffic_and_a_rollback_is_a_traffic_switch(node_app, standby_env):
    env = standby_env
    env.release(node_app, "v1", standby_s=300)
    r2 = env.release(node_app, "v2", standby_s=300)
    target = env.target()

    # what serves: only v2, and only v2 is in nginx's upstream
    serving = target.serving()
    assert sorted(i.version for i in serving) == ["v2", "v2"]
    assert env.upstream_ports() == {i.extra["port"] for i in serving}
    assert env.public_versions() == {"v2:200"}
    # the standby: v1's two instances, running in PM2, out of the upstream, healthy on their own ports
    standby = target.standby()
    assert standby is not None and standby.version == "v1" and len(standby.instances) == 2
    standby_names = {r["name"] for r in standby.instances}
    procs = env.pm2()
    assert all(procs[n]["pm2_env"]["status"] == "online" for n in standby_names)
    assert not {r["port"] for r in standby.instances} & env.upstream_ports()
    assert all(own_health(r["port"]) == (200, "v1") for r in standby.instances)
    assert standby.expires_at - time.time() > 200
    # its memory is measured and shown in the deploy's metadata
    md = step_metadata(r2, "rolling_deploy")
    assert standby.rss_bytes > 10 * 2**20 and md["standby_rss_mb"] > 10
    assert md["standby"]["version"] == "v1" and any(s.startswith("standby ") for s in md["order"])
    code, text = status.report(env.name, env.instance)
    print(text)
    assert code == 0 and "standby:     v1 x2 out of traffic" in text and "MB RSS, expires in" in text, text

    # a switch asked while a rollout holds the environment is refused and changes nothing
    with target.standby_store.rollout():
        refused = target.switch_to_standby("v1", print, retire=False, by="test")
    assert not refused.ok and "in progress" in refused.detail
    assert env.upstream_ports() == {i.extra["port"] for i in serving}

    # the rollback inside the window, under load: a switch, no new process, no failed request
    with Load(env.port, rate=200) as load:
        time.sleep(1)
        rb = env.rollback()
        time.sleep(1)
    assert rb.success
    res = load.result
    assert res.requests > 300 and res.failed == 0, res
    assert set(res.versions) == {"v1", "v2"}, res.versions
    after = env.pm2()
    assert set(after) == standby_names, "the rollback must not start or keep anything else"
    assert {i.version for i in target.serving()} == {"v1"}
    assert env.upstream_ports() == {r["port"] for r in standby.instances}
    assert env.public_versions() == {"v1:200"}
    assert not any(listening(i.extra["port"]) for i in serving), "v2's ports are free"
    assert target.current_version() == "v1"
    md = step_metadata(rb, "rollback_deploy")
    assert md["new_processes"] == 0 and md["switch"]["ok"] and sorted(md["switch"]["stopped"]) == sorted(
        i.name for i in serving)
    latest = history.load(env.instance, env.name).latest()
    assert latest.event == history.ROLLED_BACK and latest.version == "v1" and latest.get("from_version") == "v2"
    assert (target.standby() is None) or not target.standby().instances


def test_an_expired_standby_is_stopped_by_the_sweep_and_a_rollback_then_redeploys(node_app, standby_env):
    env = standby_env
    env.release(node_app, "v1", standby_s=2)
    env.release(node_app, "v2", standby_s=2)
    target = env.target()
    standby = target.standby()
    assert standby is not None and standby.version == "v1" and len(standby.instances) == 2
    names, ports = {r["name"] for r in standby.instances}, {r["port"] for r in standby.instances}
    v2_names = {i.name for i in target.serving()}
    while time.time() < standby.expires_at + 0.2:
        time.sleep(0.2)
    # out of its window, the standby is not switched to
    late = target.switch_to_standby("v1", print, retire=False, by="test")
    assert not late.ok and "expired" in late.detail
    assert {i.version for i in target.serving()} == {"v2"} and env.public_versions() == {"v2:200"}

    # the health watch asks for one retire_standby run for it (nothing is unhealthy)
    targets = DeployTargets.with_defaults()
    _, requests, outcomes = watch_tick(env.instance, {}, HttpProber(), probes=1, targets=targets)
    assert [r.job_name for r in requests] == ["retire_standby"], outcomes
    req = requests[0]
    assert req.run_key == f"standby:{env.name}:{standby.generation}"
    retired = env.defs.get_job_def("retire_standby").execute_in_process(run_config=req.run_config,
                                                                        instance=env.instance, tags=req.tags)
    assert retired.success
    assert not names & set(env.pm2()), "the standby's PM2 entries are gone"
    assert not any(listening(p) for p in ports), "the standby's ports are free"
    assert set(env.pm2()) == v2_names
    _, requests, _ = watch_tick(env.instance, {}, HttpProber(), probes=1, targets=targets)
    assert requests == []

    # a rollback now redeploys v1 as before, and says why
    rb = env.rollback()
    assert rb.success
    messages = "\n".join(run_messages(env.instance, rb.run_id))
    assert "no traffic switch to a standby of v1" in messages, messages[-3000:]
    after = env.pm2()
    assert sorted(p["pm2_env"]["APP_VERSION"] for p in after.values()) == ["v1", "v1"]
    assert not set(after) & (names | v2_names), "new v1 instances, and v2 not kept as a standby"
    assert env.public_versions() == {"v1:200"}
    assert target.standby() is None or not target.standby().instances


def test_without_a_window_nothing_waits_and_a_rollback_redeploys(node_app, standby_env):
    env = standby_env
    env.release(node_app, "v1", standby_s=0)
    env.release(node_app, "v2", standby_s=0)
    target = env.target()
    assert target.standby() is None
    procs = env.pm2()
    assert sorted(p["pm2_env"]["APP_VERSION"] for p in procs.values()) == ["v2", "v2"]
    assert env.upstream_ports() == {i.extra["port"] for i in target.serving()}
    assert not (env.state_dir / "envs" / env.name / "standby.json").exists()
    rb = env.rollback()
    assert rb.success
    messages = "\n".join(run_messages(env.instance, rb.run_id))
    assert "no warm standby (target.standby_s is 0)" in messages
    after = env.pm2()
    assert sorted(p["pm2_env"]["APP_VERSION"] for p in after.values()) == ["v1", "v1"] and not set(after) & set(procs)
    assert target.standby() is None


def test_the_retire_standby_job_and_its_op_have_names_of_their_own():
    """A job and an op of one name stop the code location from loading in the webserver and the daemon
    (execute_in_process does not check it); the health watch requests both of its jobs."""
    from ops_pipeline.definitions import defs
    from ops_pipeline.release.jobs import retire_standby_job
    from ops_pipeline.release.sensors import health_watch

    job_names = {j.name for j in defs.jobs}
    assert "retire_standby" in job_names
    assert not {n.name for n in retire_standby_job.graph.node_defs} & job_names
    assert {j.name for j in health_watch.jobs} == {"rollback", "retire_standby"}
