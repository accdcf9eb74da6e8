"""Approval: a release that holds before a step until someone promotes or aborts it with the approve_release job
(real PM2, PostgreSQL, the release job and the approval job on one Dagster instance)."""

import threading
import time

import dagster as dg
import httpx
import pytest

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.release.approval import APPROVAL_TAG
from tests.conftest import make_defs, release_run_config


def served(port: int) -> set[str]:
    return {httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, headers={"Connection": "close"}).json()["version"]
            for _ in range(6)}


class Background:
    """A release executing in a thread (it blocks while it waits for approval)."""

    def __init__(self, job, run_config, instance):
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(job, run_config, instance), daemon=True)
        self.thread.start()

    def _run(self, job, run_config, instance):
        self.result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)

    def join(self, timeout_s: float = 180):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the release did not finish"
        return self.result


def waiting_run(instance, timeout_s: float = 120) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="release", tags={APPROVAL_TAG: "waiting"}), limit=1)
        if runs:
            return runs[0]
        time.sleep(0.2)
    raise AssertionError("no release waiting for approval")


def decide(defs, instance, **config):
    return defs.get_job_def("approve_release").execute_in_process(
        run_config={"ops": {"record_approval": {"config": config}}}, instance=instance, raise_on_error=False)


@pytest.fixture
def released_v1(node_app, environment_name, pm2_cleanup, instance):
    pm2_cleanup(environment_name)
    defs, port = make_defs(), free_port()
    assert defs.get_job_def("release").execute_in_process(
        run_config=release_run_config(node_app, environment_name, version="v1", port=port, fast=True),
        instance=instance).success
    return defs, environment_name, port


def test_a_release_waits_before_migrating_until_promoted_and_records_who(released_v1, node_app, instance, services):
    defs, env, port = released_v1
    config = release_run_config(node_app, env, version="v2", port=port, fast=True,
                                approval={"required": True, "before": "migrate", "timeout_s": 120})
    bg = Background(defs.get_job_def("release"), config, instance)
    run = waiting_run(instance)
    assert served(port) == {"v1"}
    time.sleep(1.5)
    assert served(port) == {"v1"} and bg.thread.is_alive()  # still holding

    refused = decide(defs, instance, run_id=run.run_id, decision="ship it", by=" ")
    message = refused.get_step_failure_events()[0].step_failure_data.error.message
    assert "decision: must be promote or abort" in message and "by: say who decides" in message
    assert bg.thread.is_alive()

    assert decide(defs, instance, run_id=run.run_id, decision="promote", by="alice", note="reviewed the plan").success
    result = bg.join()
    assert result.success
    assert served(port) == {"v2"}
    released = history.load(instance, env).release_of("v2")
    assert released.get("approved_by") == "alice" and released.get("approved_at")
    tags = instance.get_run_by_id(run.run_id).tags
    assert tags[APPROVAL_TAG] == "promoted" and tags["ops/approval_by"] == "alice"
    event = instance.get_latest_materialization_event(dg.AssetKey(["approvals", env]))
    assert event.asset_materialization.metadata["decision"].value == "promote"
    # a decided release cannot be decided again
    again = decide(defs, instance, run_id=run.run_id, decision="abort", by="mallory")
    assert "not waiting for approval" in again.get_step_failure_events()[0].step_failure_data.error.message


def test_an_aborted_release_deploys_nothing(released_v1, node_app, instance):
    defs, env, port = released_v1
    config = release_run_config(node_app, env, version="v2", port=port, fast=True,
                                approval={"required": True, "before": "deploy", "timeout_s": 120})
    bg = Background(defs.get_job_def("release"), config, instance)
    run = waiting_run(instance)
    assert decide(defs, instance, run_id=run.run_id, decision="abort", by="bob").success
    result = bg.join()
    failed = result.get_step_failure_events()
    assert [e.step_key for e in failed] == ["rolling_deploy"]
    assert "aborted by bob" in failed[0].step_failure_data.error.message
    assert served(port) == {"v1"}
    assert history.load(instance, env).serving_version == "v1"


def test_no_decision_in_time_aborts_before_the_migration(released_v1, node_app, app_variant, instance, services):
    import psycopg

    defs, env, port = released_v1

    def add_migration(app):
        (app / "migrations" / "1700000000002_never-applied.js").write_text(
            "exports.up = (pgm) => { pgm.createTable('never_applied', { id: 'id' }); };\n")

    v2 = app_variant("approval-timeout", add_migration)
    config = release_run_config(v2, env, version="v2", port=port, fast=True,
                                approval={"required": True, "before": "migrate", "timeout_s": 2})
    result = defs.get_job_def("release").execute_in_process(run_config=config, instance=instance, raise_on_error=False)
    failed = result.get_step_failure_events()
    assert [e.step_key for e in failed] == ["migrate_database"]
    assert "no approval within 2 s" in failed[0].step_failure_data.error.message
    with psycopg.connect(services.database_url) as conn:
        assert conn.execute("SELECT to_regclass('never_applied')").fetchone()[0] is None
    assert served(port) == {"v1"}
