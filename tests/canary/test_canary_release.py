"""Canary releases judged by real traffic: the release job on the PM2 target, real nginx front proxy, real load.

One environment serves a first version for the whole module (released once); every test releases another version
over it with canary steps while bench/loadgen.py sends GET /items through the public port, and checks what the load
saw, what nginx and PM2 run afterwards, and what the run recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest

from bench.loadgen import Load
from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.release.approval import APPROVAL_TAG
from tests.canary import variants
from tests.conftest import ROOT, make_defs, release_run_config, stop_front_proxy
from tests.test_approval import Background, decide, waiting_run

pytestmark = pytest.mark.xdist_group("canary")

RATE = 150  # requests/s through the front proxy: a 10% step gives the canary ~15/s
ANALYSIS = {"min_requests": 30, "max_error_rate": 0.01, "max_error_rate_increase": 0.005, "max_p95_ratio": 2.0,
            "p95_floor_ms": 20.0, "max_inconclusive_s": 4.0}  # floor: a loaded 2-core machine has 10-30 ms p95 spikes
STEPS = [{"weight": 10, "pause_s": 4.0}, {"weight": 50, "pause_s": 3.0}]


class CanaryEnv:
    def __init__(self, name: str, port: int, state_dir: Path, instance, defs) -> None:
        self.name, self.port, self.state_dir, self.instance, self.defs = name, port, state_dir, instance, defs
        self.job = defs.get_job_def("release")
        self.env_dir = state_dir / "envs" / name

    def config(self, app_dir: Path, version: str, canary: dict | None = None, **overrides) -> dict:
        cfg = release_run_config(app_dir, self.name, version=version, port=self.port, fast=True, **overrides)
        if canary is not None:
            cfg["ops"]["verify_env"]["config"]["canary"] = canary
        return cfg

    def release(self, app_dir: Path, version: str, canary: dict | None = None, **overrides):
        return self.job.execute_in_process(run_config=self.config(app_dir, version, canary, **overrides),
                                           instance=self.instance, raise_on_error=False)

    def served(self, n: int = 20) -> set[str]:
        out = set()
        for _ in range(n):
            r = httpx.get(f"http://127.0.0.1:{self.port}/items?limit=1", timeout=5, headers={"Connection": "close"})
            assert r.status_code == 200, r.text
            out.add(r.headers["X-App-Version"])
        return out

    def pm2_versions(self) -> list[str]:
        out = subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "jlist"], check=False, capture_output=True, text=True,
                             env={**os.environ, "PM2_HOME": str(self.env_dir / "pm2")}, timeout=60).stdout
        return sorted(p["pm2_env"]["APP_VERSION"] for p in json.loads(out[out.find("["):])
                      if p["pm2_env"]["status"] == "online")

    def upstream(self) -> str:
        conf = (self.env_dir / "nginx" / "nginx.conf").read_text()
        return conf[conf.index("upstream app_servers"):conf.index("keepalive 32")]

    def serving_version(self) -> str:
        versions = self.served(6)
        assert len(versions) == 1, versions
        return versions.pop()


@pytest.fixture(scope="module")
def canary_env(node_app, services, state_dir):
    name = f"t-canary-{os.getpid() % 1000}-{time.time_ns() % 100000}"
    port = free_port()
    store_dir = Path(tempfile.mkdtemp(prefix="ops-canary-backups-"))
    from ops_pipeline.backup.store import BackupStore

    defs = make_defs(backup_store=BackupStore(local_dir=str(store_dir)))
    with tempfile.TemporaryDirectory(prefix="ops-test-instance-") as d:
        shutil.copy(ROOT / "config" / "dagster.yaml", Path(d) / "dagster.yaml")
        with dg.instance_for_test(temp_dir=d) as instance:
            env = CanaryEnv(name, port, state_dir, instance, defs)
            first = env.release(node_app, "v1")
            assert first.success
            try:
                yield env
            finally:
                stop_front_proxy(env.env_dir)
                subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "kill"], check=False, capture_output=True, timeout=60,
                               env={**os.environ, "PM2_HOME": str(env.env_dir / "pm2")})
                shutil.rmtree(store_dir, ignore_errors=True)


def step_failure(result) -> tuple[str, str, dict]:
    ev = result.get_step_failure_events()[0]
    data = ev.step_failure_data
    md = data.user_failure_data.metadata if data.user_failure_data else {}
    return ev.step_key, data.error.message, md


def observations(env: CanaryEnv, result) -> list[dict]:
    """Each canary step's AssetObservation on deployments/<env> as the run's event log (the UI) has it: metadata."""
    out = []
    for entry in env.instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION):
        obs = entry.dagster_event.event_specific_data.asset_observation
        assert obs.asset_key == history.asset_key(env.name)
        out.append({k: getattr(v, "value", v) for k, v in obs.metadata.items()})
    return out


def assert_aborted_to(env: CanaryEnv, result, stable: str, bad: str, last_verdict: tuple = ("fail", "inconclusive")
                      ) -> dict:
    """The release failed at rolling_deploy, only `stable` serves (nginx and PM2), the history says it failed."""
    assert not result.success
    step, message, md = step_failure(result)
    assert step == "rolling_deploy", message
    assert env.served() == {stable}
    assert env.pm2_versions() == [stable, stable]
    upstream = env.upstream()
    assert "weight=" not in upstream and upstream.count("server 127.0.0.1:") == 2
    latest = history.load(env.instance, env.name).latest()
    assert (latest.event, latest.version) == (history.RELEASE_FAILED, bad)
    assert latest.get("rollout")["canary"], "the failed release's record holds the canary figures"
    assert md["canary_verdict"].value in last_verdict
    return {"message": message, "record": latest}


def test_a_canary_answering_5_percent_500s_is_aborted_at_its_first_step(canary_env, app_variant):
    env = canary_env
    stable = env.serving_version()
    bad = app_variant("canary-500s", variants.errors_500(every=20))
    with Load(env.port, rate=RATE) as load:
        result = env.release(bad, "v-500s", canary={"steps": STEPS, "analysis": ANALYSIS})
    seen = load.result
    out = assert_aborted_to(env, result, stable, "v-500s")
    assert "canary analysis failed at step 1 (10% of the requests)" in out["message"]
    assert "max_error_rate 1.00%" in out["message"]
    steps = out["record"].get("rollout")["canary"]
    assert [s["verdict"] for s in steps] == ["fail"] and steps[0]["stable"]["errors"] == 0
    # The load saw 500s only from the canary, no connection error, and no more than the canary's share could give.
    assert seen.errors == 0, seen.samples
    assert seen.non_2xx > 0 and set(seen.failed_versions) == {"v-500s"}, seen.failed_versions
    assert seen.versions.get("v-500s", 0) < 0.2 * seen.requests
    assert seen.non_2xx <= seen.versions["v-500s"] / 20 + 2
    assert [o["verdict"] for o in observations(env, result)] == ["fail"]


def test_a_canary_3x_slower_at_p95_is_aborted(canary_env, app_variant):
    env = canary_env
    stable = env.serving_version()
    slow = app_variant("canary-slow", variants.slower(150))
    with Load(env.port, rate=RATE) as load:
        result = env.release(slow, "v-slow", canary={"steps": STEPS, "analysis": ANALYSIS})
    out = assert_aborted_to(env, result, stable, "v-slow")
    [step] = out["record"].get("rollout")["canary"]
    assert step["verdict"] == "fail" and step["canary"]["errors"] == 0
    assert step["canary"]["p95_ms"] >= 3 * step["stable"]["p95_ms"], step  # it really was 3x slower at p95
    assert "max_p95_ratio 2" in out["message"] and "canary analysis failed at step 1" in out["message"]
    assert load.result.unanswered == 0, load.result.samples  # a GET resent once after an nginx reload is answered


def test_too_little_traffic_holds_the_step_and_does_not_pass(canary_env, app_variant, node_app):
    env = canary_env
    stable = env.serving_version()
    started = time.monotonic()
    with Load(env.port, rate=4, workers=2) as load:  # ~16 requests per 4 s window: under min_requests in either group
        result = env.release(node_app, "v-quiet", canary={"steps": STEPS, "analysis": ANALYSIS})
    out = assert_aborted_to(env, result, stable, "v-quiet")
    [step] = out["record"].get("rollout")["canary"]
    assert step["verdict"] == "inconclusive" and "too few requests" in step["reasons"][0]
    # held: the window grew past the pause by max_inconclusive_s, then the release failed as inconclusive
    assert step["window_s"] >= STEPS[0]["pause_s"] + ANALYSIS["max_inconclusive_s"]
    assert "stayed inconclusive at step 1" in out["message"] and "still inconclusive" in out["message"]
    assert time.monotonic() - started > STEPS[0]["pause_s"] + ANALYSIS["max_inconclusive_s"]
    assert load.result.unanswered == 0, load.result.samples


def test_a_good_canary_is_promoted_through_every_step(canary_env, node_app):
    env = canary_env
    stable = env.serving_version()
    with Load(env.port, rate=RATE) as load:
        result = env.release(node_app, "v-good", canary={"steps": STEPS, "analysis": ANALYSIS},
                             app={"metrics_path": "/metrics"})
    assert result.success, step_failure(result)[1]
    seen = load.result
    assert seen.unanswered == 0, seen.samples
    assert set(seen.versions) == {stable, "v-good"}
    assert env.served() == {"v-good"} and env.pm2_versions() == ["v-good", "v-good"]
    assert "weight=" not in env.upstream()
    # every step passed, with the front proxy's figures and the app's own metrics as an extra line
    deploy = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == "rolling_deploy")
    md = deploy.event_specific_data.metadata
    assert md["canary_verdict"].value == "pass"
    rows = md["canary_analysis"].value.records
    assert {(r.data["step"], r.data["source"], r.data["group"]) for r in rows} == {
        (s, src, g) for s in (1, 2) for src in ("nginx", "app metrics") for g in ("canary", "stable")}
    assert all(r.data["verdict"] == "pass" and r.data["requests"] >= ANALYSIS["min_requests"] for r in rows
               if r.data["source"] == "nginx")
    assert all(r.data["requests"] > 0 for r in rows)
    obs = observations(env, result)
    assert [(o["step"], o["weight_pct"], o["verdict"]) for o in obs] == [(1, 10, "pass"), (2, 50, "pass")]
    # the traffic split followed the weights (10% then 50%, loosely: least_conn and a loaded machine)
    shares = [o["canary_requests"] / (o["canary_requests"] + o["stable_requests"]) for o in obs]
    assert 0.03 < shares[0] < 0.25 and 0.3 < shares[1] < 0.7, shares
    # the old instances were retired by the rolling deploy's own drain, only after the last step passed
    steps = result.output_for_node("rolling_deploy")["rollout"]["steps"]
    retired = [s for s in steps if s["action"] == "removed"]
    assert [s["version"] for s in retired] == [stable, stable]
    assert all("drained and stopped (canary promoted): drained in" in s["detail"] for s in retired), retired
    assert min(s["seconds"] for s in retired) > max(s["seconds"] for s in steps if s["action"] == "healthy") + sum(
        st["pause_s"] for st in STEPS)
    assert history.load(env.instance, env.name).serving_version == "v-good"


def held_release(env: CanaryEnv, app_dir: Path, version: str):
    """A canary release that holds at its 10% step for approval, under load; returns (background, waiting run, load)."""
    config = env.config(app_dir, version, canary={"steps": STEPS, "analysis": ANALYSIS},
                        approval={"required": True, "before": "canary-10", "timeout_s": 120})
    load = Load(env.port, rate=RATE).__enter__()
    bg = Background(env.job, config, env.instance)
    run = waiting_run(env.instance, timeout_s=150)
    assert run.tags["ops/approval_stage"] == "canary-10"
    upstream = env.upstream()  # held with the canary serving its share: 2 stable at 9, 2 canary at 1
    assert upstream.count(" weight=9 ") == 2 and upstream.count(" weight=1 ") == 2, upstream
    time.sleep(2)
    assert bg.thread.is_alive() and env.upstream() == upstream  # still holding
    return bg, run, load


def test_an_approval_at_a_canary_step_holds_it_there_until_promoted(canary_env, node_app):
    env = canary_env
    stable = env.serving_version()
    bg, run, load = held_release(env, node_app, "v-held")
    assert decide(env.defs, env.instance, run_id=run.run_id, decision="promote", by="alice").success
    result = bg.join()
    load.__exit__(None, None, None)
    assert result.success, step_failure(result)[1]
    assert load.result.unanswered == 0 and set(load.result.versions) == {stable, "v-held"}, load.result.samples
    assert env.served() == {"v-held"} and env.pm2_versions() == ["v-held", "v-held"]
    assert [(o["step"], o["verdict"]) for o in observations(env, result)] == [(1, "pass"), (2, "pass")]
    assert env.instance.get_run_by_id(result.run_id).tags[APPROVAL_TAG] == "promoted"
    assert history.load(env.instance, env.name).latest().get("approved_by") == "alice"


def test_an_abort_at_a_canary_step_withdraws_the_canary(canary_env, node_app):
    env = canary_env
    stable = env.serving_version()
    bg, run, load = held_release(env, node_app, "v-refused")
    assert decide(env.defs, env.instance, run_id=run.run_id, decision="abort", by="bob").success
    result = bg.join()
    load.__exit__(None, None, None)
    out = assert_aborted_to(env, result, stable, "v-refused", last_verdict=("pass",))
    assert "canary stopped at step 1 (10% of the requests): release of v-refused aborted by bob" in out["message"]
    assert env.instance.get_run_by_id(result.run_id).tags[APPROVAL_TAG] == "aborted"
    assert load.result.unanswered == 0, load.result.samples


def test_a_promoted_canary_leaves_the_stable_version_warm_and_a_rollback_is_a_traffic_switch(canary_env, node_app):
    """Canary and warm standby together: promotion retires the stable instances through the same drain as a rolling
    deploy, so with target.standby_s they stay warm out of traffic, and the rollback switches back to them."""
    from ops_pipeline.platform.spec import ReleaseSpec
    from ops_pipeline.targets.resource import DeployTargets

    env = canary_env
    stable = env.serving_version()
    with Load(env.port, rate=RATE) as load:
        result = env.release(node_app, "v-warm", canary={"steps": STEPS, "analysis": ANALYSIS},
                             target={"standby_s": 300})
    assert result.success, step_failure(result)[1]
    assert load.result.unanswered == 0, load.result.samples
    assert env.served() == {"v-warm"}
    assert env.pm2_versions() == sorted([stable, stable, "v-warm", "v-warm"])  # the stable ones wait, warm
    hist = history.load(env.instance, env.name)
    target = DeployTargets.with_defaults().for_spec(ReleaseSpec.from_json(history.spec_json(hist.latest())))
    standby = target.standby()
    assert standby is not None and standby.version == stable and len(standby.instances) == 2
    assert sorted(i.version for i in target.serving()) == ["v-warm", "v-warm"]

    with Load(env.port, rate=RATE) as load:
        rollback = env.defs.get_job_def("rollback").execute_in_process(
            run_config={"ops": {"plan_rollback": {"config": {"environment": env.name}}}}, instance=env.instance,
            raise_on_error=False)
    assert rollback.success
    assert load.result.unanswered == 0, load.result.samples
    assert env.served() == {stable} and env.pm2_versions() == [stable, stable]  # switched: nothing new started
    md = next(e for e in rollback.all_events if e.event_type_value == "STEP_OUTPUT"
              and e.step_key == "rollback_deploy").event_specific_data.metadata
    assert md["new_processes"].value == 0
