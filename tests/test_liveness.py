"""Liveness of runs executed by a real `dagster job execute` process: a killed one is declared dead and marked
failed with its explanation; a slow one that lives is never declared dead."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from ops_pipeline.release import liveness

BIN = Path(sys.executable).parent

JOB = textwrap.dedent("""
    import time
    import dagster as dg

    @dg.op
    def verify_env(context):
        context.instance.add_run_tags(context.run_id, {"ops/environment": "live"})

    @dg.op(ins={"after": dg.In(dg.Nothing)})
    def rolling_deploy(context):
        context.log.info("deploying")
        time.sleep(600)

    @dg.job(name="release")
    def release():
        rolling_deploy(after=verify_env())
""")


@pytest.fixture
def cli_run(instance, tmp_path):
    """A `dagster job execute` release on the test instance, left in its (slow) rolling_deploy step."""
    (tmp_path / "slow_job.py").write_text(JOB)
    env = {**os.environ, "DAGSTER_HOME": instance.root_directory}
    proc = subprocess.Popen([str(BIN / "dagster"), "job", "execute", "-f", str(tmp_path / "slow_job.py"), "-j", "release"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    run = None
    while time.monotonic() < deadline:
        runs = instance.get_runs(limit=1)
        if runs and "rolling_deploy" in liveness.unfinished_steps(instance, runs[0].run_id):
            run = runs[0]
            break
        assert proc.poll() is None, "dagster job execute exited early"
        time.sleep(0.3)
    assert run is not None, "the run never reached rolling_deploy"
    yield proc, instance.get_run_by_id(run.run_id)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_dagster_records_the_cli_process_of_a_run(instance, cli_run):
    proc, run = cli_run
    pid, first_ts, how = liveness.run_process(instance, run.run_id)
    assert pid == proc.pid and "RUN_START" in how and first_ts is not None


def test_a_slow_but_alive_cli_run_is_never_declared_dead(instance, cli_run):
    proc, run = cli_run
    for _ in range(3):
        verdict = liveness.check_run(instance, run)
        assert verdict.state == liveness.ALIVE and verdict.pid == proc.pid, verdict
        time.sleep(0.5)
    assert liveness.sweep(instance)[0][1].state == liveness.ALIVE
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED


def test_a_killed_cli_run_is_declared_dead_and_marked_failed_with_its_explanation(instance, cli_run):
    proc, run = cli_run
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # what Dagster leaves behind
    t0 = time.monotonic()
    [(swept, verdict, declared)] = liveness.sweep(instance, detected_by="run_liveness")
    assert swept.run_id == run.run_id and verdict.dead and declared, verdict
    assert time.monotonic() - t0 < 5
    failed = instance.get_run_by_id(run.run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    failure = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    message = failure[-1].event_log_entry.dagster_event.message
    assert f"no process {proc.pid}" in message and "run_liveness" in message and "rolling_deploy" in message
    record = liveness.death_record(instance, run.run_id)
    assert record["steps_in_flight"] == "rolling_deploy" and record["pid"] == str(proc.pid)
    # declared once: a second sweep finds nothing in progress
    assert liveness.sweep(instance) == []


def test_a_reused_pid_is_not_the_run_process(instance, cli_run, monkeypatch):
    proc, run = cli_run
    real = liveness.process_state

    def reused(pid):
        state, started, desc = real(pid)
        return state, time.time(), desc  # same pid, but a process that started just now

    monkeypatch.setattr(liveness, "process_state", reused)
    verdict = liveness.check_run(instance, run)
    assert verdict.dead and "pid was reused" in verdict.reason


def test_no_verdict_from_a_pid_of_another_host(instance, cli_run):
    proc, run = cli_run
    instance.add_run_tags(run.run_id, {liveness.HOST_TAG: "some-other-host"})
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    verdict = liveness.check_run(instance, instance.get_run_by_id(run.run_id))
    assert verdict.state == liveness.UNKNOWN and "some-other-host" in verdict.reason
