"""The account `make demo` / `make release` ... print (ops_pipeline/platform/run_report.py), read from the Dagster instance."""

import os
import subprocess
import sys

import dagster as dg
import yaml

from ops_pipeline.platform import run_report
from tests.conftest import ROOT


@dg.op
def first(context: dg.OpExecutionContext) -> int:
    context.log.info("first step done: 3 things checked")
    context.log_event(dg.AssetMaterialization(asset_key=["things", "checked"], description="3 things"))
    return 3


@dg.op
def second(context: dg.OpExecutionContext, n: int) -> int:
    context.log.info("about to fail")
    raise dg.Failure(description=f"second step refused {n} things\nmore detail on the next line")


@dg.op
def third(n: int) -> int:
    return n


@dg.job
def three_steps():
    third(second(first()))


def test_account_lists_steps_in_plan_order_with_outcome_duration_and_message():
    with dg.instance_for_test() as instance:
        result = three_steps.execute_in_process(instance=instance, raise_on_error=False,
                                                tags={"ops/environment": "unit"})
        code, text = run_report.account(instance, result.run_id)
    lines = text.splitlines()
    assert code == 1
    assert lines[0].startswith(f"three_steps run {result.run_id[:8]}: FAILURE in ") and "ops/environment=unit" in lines[0]
    assert [line.split()[:2] for line in lines[1:3]] == [["ok", "first"], ["FAILED", "second"]]
    assert lines[1].endswith("first step done: 3 things checked") and " s  " in lines[1]
    assert lines[2].endswith("second step refused 3 things")  # the failure, not the step's last log message
    assert lines[3] == "      more detail on the next line"
    assert lines[4].split() == ["not", "run", "third"]
    assert "  materialized things/checked (3 things)" in lines


def test_account_of_a_successful_run_and_of_an_unknown_one():
    with dg.instance_for_test() as instance:
        result = dg.materialize([dg.asset(lambda: 1, name="one")], instance=instance)
        code, text = run_report.account(instance, result.run_id)
        assert code == 0 and ": SUCCESS in " in text.splitlines()[0] and "materialized one" in text
        code, text = run_report.account(instance, "0" * 36)
        assert code == 1 and "not in the instance" in text


def test_launch_runs_dg_with_the_log_in_a_file_and_prints_the_account(tmp_path):
    """`make release` with a spec that fails at verify_env (production, no variables): `dg launch` from the project,
    nothing of the Dagster log on the terminal, the account names the failure and the steps not run, exit 1."""
    cfg = yaml.safe_load((ROOT / "presets" / "local.yaml").read_text())
    verify = cfg["ops"]["verify_env"]["config"]
    verify.update(environment="report-unit", production=True, embedded_services=False)
    config = tmp_path / "release.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "release.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "NODE_ENV")}
    out = subprocess.run([sys.executable, "-m", "ops_pipeline.platform.run_report", "launch", "release", str(config), "--log",
                          str(log)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"release: dg launch --job release --config {config}"
    assert lines[1] == f"  full log: {log}  (tail -f it to follow the run)"
    assert lines[2].startswith("release run ") and ": FAILURE in " in lines[2]
    assert lines[3].split()[:2] == ["FAILED", "verify_env"] and "not ready for a release" in lines[3]
    assert "app.database.url_from: environment variable DATABASE_URL is not set" in out.stdout
    steps = [line.split() for line in lines[4:] if not line.startswith("      ")]
    assert steps == [["not", "run", step] for step in ("run_tests", "build_image", "backup_database", "migrate_database",
                                                       "rolling_deploy", "health_gate")], out.stdout
    assert not out.stderr
    assert " - DEBUG - " not in out.stdout and "Warning" not in out.stdout
    assert " - DEBUG - " in log.read_text() and "STEP_FAILURE" in log.read_text()
    assert "Supersession" not in log.read_text()  # dg launch is the current CLI


def test_launch_without_a_run_shows_the_end_of_the_log(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops: {verify_env: {config: {no_such_field: 1}}}\n")
    log = tmp_path / "bad.log"
    out = subprocess.run([sys.executable, "-m", "ops_pipeline.platform.run_report", "launch", "release", str(bad), "--log",
                          str(log)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "release: no run was started (dg exited with" in out.stdout and "no_such_field" in out.stdout
