"""The `plan` job (a release's dry run) against a real environment: PM2, PostgreSQL, the backup store. It must say what
the release would do, and change nothing."""

import json
import os
import subprocess
from pathlib import Path

from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform import history, paths
from ops_pipeline.platform.local_stack import free_port
from tests.conftest import make_defs, release_run_config


def pm2_processes(env: str) -> list[tuple[str, int]]:
    home = paths.environment_dir(env) / "pm2"
    out = subprocess.run([str(paths.project_root() / "tools/node_modules/.bin/pm2"), "jlist"], capture_output=True,
                         text=True, env={**os.environ, "PM2_HOME": str(home)}).stdout
    return sorted((p["name"], p["pid"]) for p in json.loads(out[out.find("["):]))


def snapshot(env: str, store: BackupStore, instance) -> dict:
    """Everything a release would change."""
    env_dir = paths.environment_dir(env)
    return {
        "artifacts": sorted(p.name for p in paths.artifacts_dir().iterdir()) if paths.artifacts_dir().exists() else [],
        "env_files": sorted(str(p.relative_to(env_dir)) for p in env_dir.rglob("*")
                            if p.is_file() and "logs" not in p.parts and not p.name.endswith((".pid", ".sock"))
                            and "pm2" not in p.parts),
        "pm2": pm2_processes(env),
        "history": [(e.event, e.version) for e in history.load(instance, env).events],
        "backups": [m["id"] for m in store.manifests(f"{env}/app")],
    }


def plan_output(result) -> dict:
    return result.output_for_node("plan_release")


def test_plan_shows_what_a_release_would_do_and_changes_nothing(node_app, app_variant, environment_name, pm2_cleanup,
                                                                 tmp_path, instance, services):
    env = environment_name
    pm2_cleanup(env)
    store = BackupStore(local_dir=str(tmp_path / "backups"))
    defs = make_defs(backup_store=store)
    port = free_port()
    assert defs.get_job_def("release").execute_in_process(
        run_config=release_run_config(node_app, env, version="v1", port=port, fast=True), instance=instance).success

    def add_migration(app: Path) -> None:
        (app / "migrations" / "1800000000000_add-items-sku.js").write_text(
            "exports.up = (pgm) => { pgm.addColumn('items', { sku: { type: 'text' } }); };\n"
            "exports.down = (pgm) => { pgm.dropColumn('items', 'sku'); };\n")

    v2_app = app_variant("plan-v2", add_migration)
    before = snapshot(env, store, instance)
    result = defs.get_job_def("plan").execute_in_process(
        run_config=release_run_config(v2_app, env, version="v2", port=port, instances=3), instance=instance)
    assert result.success
    plan = plan_output(result)

    assert plan["version"] == "v2" and not plan["already_released"]
    assert [s.split(" (")[1].split(",")[0] for s in plan["serving"]] == ["v1", "v1"]
    # two swaps (start a v2, retire a v1) and a third slot that only starts: the order the release follows
    assert len(plan["order"]) == 3
    assert all("start v2" in step for step in plan["order"])
    assert ["(v1)" in step for step in plan["order"]] == [True, True, False]
    assert plan["pending_migrations"] == ["1800000000000_add-items-sku.js"]
    assert plan["applied_migrations"] >= 2
    newest = store.manifests(f"{env}/app")[0]
    assert newest["id"] in plan["backup"] and plan["database_bytes"] > 1_000_000, (plan, newest)
    assert plan["artifact"]["kind"] == "bundle"

    assert snapshot(env, store, instance) == before  # nothing built, started, stopped, backed up or recorded
    assert not result.asset_materializations_for_node("plan_release")

    assert plan["canary"].startswith("none") and plan["standby"].startswith("none")

    # with canary steps, approval at one of them and a warm standby: the steps, their limits and the standby
    gated = defs.get_job_def("plan").execute_in_process(
        run_config=release_run_config(v2_app, env, version="v2", port=port, instances=3,
                                      canary={"steps": [{"weight": 10, "pause_s": 30}, {"weight": 50, "pause_s": 60}],
                                              "analysis": {"min_requests": 80, "max_p95_ms": 400}},
                                      approval={"required": True, "before": "canary-50"},
                                      target={"standby_s": 900}), instance=instance)
    staged = plan_output(gated)
    assert staged["order"][0].startswith("1. start 3 instance(s) of v2 beside the serving ones")
    assert staged["order"][1] == "2. 10% of the requests to v2 for 30 s, then judged"
    assert staged["order"][2] == "3. 50% of the requests to v2 for 60 s, then judged and held for approval (approve_release)"
    assert staged["order"][3].startswith("4. promote: all requests to v2") and "stay warm" in staged["order"][3]
    assert "at least 80 requests per group" in staged["canary"] and "400 ms" in staged["canary"]
    assert staged["standby"].startswith("the replaced instances of v1 (2) stay running out of traffic for 900 s")
    assert snapshot(env, store, instance) == before

    # the release's own version: the plan says it was released already
    again = defs.get_job_def("plan").execute_in_process(
        run_config=release_run_config(node_app, env, version="v1", port=port), instance=instance)
    assert plan_output(again)["already_released"]


def test_plan_of_a_bad_spec_names_every_field_and_touches_nothing(node_app, environment_name, instance):
    result = make_defs().get_job_def("plan").execute_in_process(
        run_config=release_run_config(node_app, environment_name, version="v1", port=70000, instances=0),
        instance=instance, raise_on_error=False)
    msg = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "target.instances" in msg and "target.port" in msg
    assert not paths.environment_dir(environment_name).exists()


def test_plan_does_not_start_an_embedded_stack_that_is_down(node_app, environment_name, instance, tmp_path,
                                                             monkeypatch):
    """With the embedded stack not running, the plan says the database was not read instead of starting it."""
    from ops_pipeline.platform.local_stack import LocalStack

    monkeypatch.delenv("DATABASE_URL", raising=False)
    stack = LocalStack(state_dir=str(tmp_path / "no-stack"))
    result = make_defs(local_stack=stack).get_job_def("plan").execute_in_process(
        run_config=release_run_config(node_app, environment_name, version="v1"), instance=instance)
    plan = plan_output(result)
    assert "not running" in plan["database"] and "pending_migrations" not in plan
    assert stack.is_running() == {"postgres": False, "redis": False}
    assert not (tmp_path / "no-stack").exists() and not paths.environment_dir(environment_name).exists()
