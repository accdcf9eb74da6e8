"""Resume: Dagster's "re-execute from failure" of a failed release, launched through the GraphQL mutation the UI sends,
continues safely with the real daemon, PM2 and PostgreSQL: finished steps are not repeated (no second backup, no second
migration), the deploy starts from what serves, the lock is taken again, and the rollback the failure requested stands
down when it runs after the resume."""


import httpx
import pytest
from dagster._core.events import DagsterEventType

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.release.sensors import rollback_request
from tests import app_variants
from tests.conftest import release_run_config
from tests.e2e.test_rollback_daemon import versions_served, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemon")]

REEXECUTE = """
mutation($parentRunId: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: FROM_FAILURE}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""


def started_steps(stack, run_id: str) -> set[str]:
    with stack.instance() as inst:
        return {e.step_key for e in inst.all_logs(run_id, of_type=DagsterEventType.STEP_START)}


def test_a_failed_release_resumed_from_the_ui_skips_finished_steps(dagster_stack, node_app, app_variant,
                                                                     environment_name, pm2_cleanup, tmp_path):
    env = environment_name
    pm2_cleanup(env)
    port = free_port()
    v1 = dagster_stack.wait_run(dagster_stack.submit(
        "release", release_run_config(node_app, env, version="v1", port=port, fast=True), tags={"ops/environment": env}))
    assert v1.status.value == "SUCCESS", dagster_stack.log_tail("daemon")

    # v2 cannot get healthy while the flag exists: its deploy fails with v1 serving, after its backup and migration.
    unready = tmp_path / "v2-unready"
    unready.touch()
    v2_app = app_variant("resume-v2", app_variants.health_503_when_file_exists(unready))
    config = release_run_config(v2_app, env, version="v2", port=port, fast=True, target={"pm2": {"listen_timeout_s": 4}})
    failed = dagster_stack.wait_run(dagster_stack.submit("release", config, tags={"ops/environment": env}))
    assert failed.status.value == "FAILURE"
    assert {"backup_database", "migrate_database", "rolling_deploy"} <= started_steps(dagster_stack, failed.run_id)
    assert versions_served(port) == {"v1:200"}

    # The failure requested a rollback; it finds v1 serving and changes nothing.
    def finished_rollbacks():
        return [r for r in dagster_stack.runs("rollback", tags={"ops/environment": env}) if r.is_finished]
    assert wait_for(finished_rollbacks, 90, "the release-failure rollback")[0].status.value == "SUCCESS"

    # The cause is fixed; the operator presses "Re-execute from failure" (the UI's GraphQL mutation).
    unready.unlink()
    answer = httpx.post(f"{dagster_stack.url}/graphql", json={"query": REEXECUTE,
                                                              "variables": {"parentRunId": failed.run_id}}, timeout=60)
    launched = answer.json()["data"]["launchPipelineReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    resumed = dagster_stack.wait_run(launched["run"]["runId"])
    assert resumed.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    assert resumed.tags["dagster/parent_run_id"] == failed.run_id
    # no second backup, no second migration: only the deploy and the gate ran again
    assert started_steps(dagster_stack, resumed.run_id) == {"rolling_deploy", "health_gate"}
    assert versions_served(port) == {"v2:200"}
    with dagster_stack.instance() as inst:
        hist = history.load(inst, env)
        logs = [e.user_message for e in inst.all_logs(resumed.run_id) if e.step_key == "rolling_deploy"]
    assert hist.serving_version == "v2" and "v2" not in hist.bad_versions  # the resumed release clears its failure
    assert any("holding the release lock" in m for m in logs)

    # A rollback for that failure that runs only now (queued behind the resume) stands down.
    late = rollback_request(env, "v2", f"release run {failed.run_id[:8]} failed", "", "release_failure",
                            failed_run=failed.run_id)
    rb = dagster_stack.wait_run(dagster_stack.submit("rollback", late.run_config, tags=late.tags))
    assert rb.status.value == "SUCCESS", dagster_stack.log_tail("daemon")
    with dagster_stack.instance() as inst:
        said = [e.user_message for e in inst.all_logs(rb.run_id) if e.step_key == "plan_rollback"]
    assert any("standing down" in m for m in said)
    assert versions_served(port) == {"v2:200"}
