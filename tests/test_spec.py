"""Bad input gets one clear error naming the field, before any side effect."""

import dagster as dg
import pytest

from ops_pipeline.platform import history
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec, SpecError, validate_release_config


def problems(**kwargs) -> list[str]:
    return validate_release_config(ReleaseConfig(**kwargs))


def test_defaults_release_the_example_app():
    assert problems() == []
    cfg = ReleaseConfig()
    assert cfg.app.path == "examples/node-api" and cfg.target.kind.value == "pm2" and cfg.gate.required_successes == 3
    assert (cfg.gate.interval_s, cfg.gate.request_timeout_s, cfg.gate.deadline_s) == (1.0, 5.0, 120.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target": {"instances": 0}}, "target.instances"),
        ({"target": {"instances": -2}}, "target.instances"),
        ({"target": {"port": 70000}}, "target.port"),
        ({"target": {"public_url": "http//no-scheme"}}, "target.public_url"),
        ({"target": {"public_url": "http://host:notaport/"}}, "target.public_url"),
        ({"target": {"kind": "kubernetes", "kubernetes": {"api_server": "ftp://x", "image_repository": "r/a"}}},
         "target.kubernetes.api_server"),
        ({"target": {"kind": "kubernetes"}}, "target.kubernetes.image_repository"),
        ({"app": {"health_path": "health"}}, "app.health_path"),
        ({"app": {"path": "/nonexistent/app"}}, "app.path"),
        ({"app": {"required_env": ["JWT_SECRET", "BAD-NAME"]}}, "app.required_env"),
        ({"environment": "Prod!"}, "environment"),
        ({"environment": ""}, "environment"),
        ({"gate": {"required_successes": 30, "interval_s": 5, "deadline_s": 60}}, "gate.required_successes"),
        ({"gate": {"deadline_s": 0}}, "gate.deadline_s"),
        ({"gate": {"interval_s": -1}}, "gate.interval_s"),
        ({"production": True, "embedded_services": True}, "embedded_services"),
        ({"version": "v1 with spaces"}, "version"),
        ({"target": {"pm2": {"kill_timeout_s": 5}}}, "target.pm2.kill_timeout_s"),
        ({"target": {"pm2": {"keep_releases": 1}}}, "target.pm2.keep_releases"),
        ({"target": {"kind": "docker", "docker": {"start_timeout_s": -1}}}, "target.docker.start_timeout_s"),
        ({"target": {"pm2": {"max_memory_restart": "lots"}}}, "target.pm2.max_memory_restart"),
        ({"target": {"kind": "docker", "docker": {"env_file_vars": ["OK_NAME", "NOT OK"]}}}, "target.docker.env_file_vars"),
        ({"app": {"entrypoint": "../../etc/server.js"}}, "app.entrypoint"),
        ({"app": {"entrypoint": "/srv/server.js"}}, "app.entrypoint"),
    ],
)
def test_each_bad_value_names_its_field(kwargs, field):
    found = problems(**kwargs)
    assert len(found) == 1, found
    assert found[0].startswith(field + ":"), found


def test_unknown_target_is_rejected_by_the_config_schema_naming_the_field():
    @dg.op
    def take(config: ReleaseConfig):
        return config

    @dg.job
    def j():
        take()

    with pytest.raises(dg.DagsterInvalidConfigError) as err:
        j.execute_in_process(run_config={"ops": {"take": {"config": {"target": {"kind": "heroku"}}}}})
    assert "target:kind" in str(err.value) and "heroku" in str(err.value)


def test_every_problem_is_reported_at_once():
    found = problems(target={"instances": 0, "port": 0}, app={"health_path": "x"}, environment="UPPER")
    assert len(found) == 4
    assert {p.split(":")[0] for p in found} == {"target.instances", "target.port", "app.health_path", "environment"}


def test_spec_round_trips_through_json():
    spec = ReleaseSpec(config=ReleaseConfig(environment="staging", target={"instances": 3}), version="v7", app_dir="/x",
                       commit="abc", dirty=True)
    again = ReleaseSpec.from_json(spec.to_json())
    assert again.config == spec.config and again.version == "v7" and again.dirty
    assert again.health_url == "http://127.0.0.1:3100/health"


@pytest.mark.parametrize("preset", ["local", "staging", "production"])
def test_presets_are_valid_release_configs(preset):
    from pathlib import Path

    import yaml

    from ops_pipeline.release.jobs import release

    path = Path(__file__).resolve().parents[1] / "presets" / f"{preset}.yaml"
    run_config = yaml.safe_load(path.read_text())
    assert dg.validate_run_config(release, run_config)
    cfg = ReleaseConfig(**run_config["ops"]["verify_env"]["config"])
    assert validate_release_config(cfg) == []


def test_settings_are_parsed_once_and_every_bad_variable_is_named(monkeypatch):
    from ops_pipeline.backup.schedules import build_schedules
    from ops_pipeline.platform.settings import SettingsError, load_settings

    monkeypatch.setenv("OPS_TIMEZONE", "Mars/Olympus_Mons")
    monkeypatch.setenv("OPS_BACKUP_CRON", "0 25 * * *")
    monkeypatch.setenv("OPS_HEALTH_PROBES_PER_TICK", "0")
    monkeypatch.setenv("OPS_BACKUP_STORE", "ftp")
    with pytest.raises(SettingsError) as err:
        load_settings()
    named = {p.split(":")[0] for p in err.value.problems}
    assert named == {"OPS_TIMEZONE", "OPS_BACKUP_CRON", "OPS_HEALTH_PROBES_PER_TICK", "OPS_BACKUP_STORE"}
    assert "Mars/Olympus_Mons" in str(err.value)
    monkeypatch.setenv("OPS_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("OPS_BACKUP_CRON", "0 2 * * *")
    monkeypatch.delenv("OPS_HEALTH_PROBES_PER_TICK")
    monkeypatch.delenv("OPS_BACKUP_STORE")
    nightly, drill = build_schedules(load_settings())
    assert nightly.execution_timezone == "Europe/Berlin" and nightly.cron_schedule == "0 2 * * *"
    assert nightly.default_status == dg.DefaultScheduleStatus.RUNNING


def test_a_bad_setting_stops_the_code_location_from_loading_with_its_name():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import ops_pipeline.definitions"], capture_output=True, text=True,
                         env={**__import__("os").environ, "OPS_HEALTH_PROBE_INTERVAL_S": "soon"}, timeout=120)
    assert out.returncode != 0 and "OPS_HEALTH_PROBE_INTERVAL_S" in out.stderr and "soon" in out.stderr


def test_rollback_of_an_unknown_environment_fails_clearly(instance):
    from tests.conftest import make_defs

    r = make_defs().get_job_def("rollback").execute_in_process(
        run_config={"ops": {"plan_rollback": {"config": {"environment": "nowhere"}}}}, instance=instance, raise_on_error=False)
    msg = r.get_step_failure_events()[0].step_failure_data.error.message
    assert "environment:" in msg and "nowhere" in msg


def test_a_recorded_spec_is_validated_when_read_back():
    good = ReleaseSpec(config=ReleaseConfig(environment="staging"), version="v7", app_dir="/gone").to_json()
    assert ReleaseSpec.from_json(good).version == "v7"  # the app folder of an old release may be gone: not checked
    bad = {**good, "config": {**good["config"], "target": {**good["config"]["target"], "instances": 0, "port": 70000}}}
    with pytest.raises(SpecError) as err:
        ReleaseSpec.from_json(bad)
    assert {p.split(":")[1].strip() for p in err.value.problems} == {"target.instances", "target.port"}
    assert all(p.startswith("recorded spec: ") for p in err.value.problems)
    assert ReleaseSpec.from_json(bad, validate=False).config.target.instances == 0


def test_rollback_to_an_invalid_release_record_fails_before_any_side_effect(instance, tmp_path):
    """The rollback validates the spec it found in the history once, in its plan: nothing is deployed."""
    from tests.conftest import make_defs

    spec = ReleaseSpec(config=ReleaseConfig(environment="recorded", target={"kind": "pm2", "instances": 0}),
                       version="v1", app_dir=str(tmp_path)).to_json()
    instance.report_runless_asset_event(history.materialization("recorded", history.RELEASED, "v1", spec=spec,
                                                                artifact={"kind": "bundle", "id": "v1"}))
    r = make_defs().get_job_def("rollback").execute_in_process(
        run_config={"ops": {"plan_rollback": {"config": {"environment": "recorded", "bad_version": "v2"}}}},
        instance=instance, raise_on_error=False)
    failed = r.get_step_failure_events()
    assert [e.step_key for e in failed] == ["plan_rollback"]
    msg = failed[0].step_failure_data.error.message
    assert "release record of v1" in msg and "target.instances" in msg
    started = {e.step_key for e in r.all_events if e.event_type_value == "STEP_START"}
    assert started == {"plan_rollback"}


def test_a_pm2_home_too_deep_for_its_unix_sockets_is_refused_before_anything_starts(monkeypatch, tmp_path):
    """PM2's daemon binds <PM2_HOME>/interactor.sock: past 107 bytes it cannot, and every pm2 command hung while the
    daemon spun at 25% CPU. The spec check names the folder and the limit instead."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("OPS_STATE_DIR", str(deep))
    problems = validate_release_config(ReleaseConfig(environment="staging", app={"path": str(tmp_path)}))
    assert any(p.startswith("the state folder (OPS_STATE_DIR): PM2's socket") and "107-byte limit" in p
               for p in problems), problems
    explicit = ReleaseConfig(environment="staging", app={"path": str(tmp_path)},
                             target={"pm2": {"home": str(deep / "pm2")}})
    assert any(p.startswith("target.pm2.home:") for p in validate_release_config(explicit))
    # a recorded spec (rollback, status) is about another machine's folders: not judged by this one's
    assert not [p for p in validate_release_config(explicit, check_paths=False) if "socket" in p]
    monkeypatch.setenv("OPS_STATE_DIR", "/tmp/ops")
    assert not [p for p in validate_release_config(ReleaseConfig(environment="staging", app={"path": str(tmp_path)}))
                if "socket" in p]
    docker = ReleaseConfig(environment="staging", app={"path": str(tmp_path)}, target={"kind": "docker"})
    monkeypatch.setenv("OPS_STATE_DIR", str(deep))
    assert not [p for p in validate_release_config(docker) if "socket" in p]


def test_a_warm_standby_on_a_target_that_has_none_is_refused_not_ignored():
    docker = problems(target={"kind": "docker", "standby_s": 300})
    assert any(p.startswith("target.standby_s: a warm standby is built for the pm2 target only") for p in docker), docker
    assert not [p for p in problems(target={"kind": "docker", "standby_s": 0}) if "standby" in p]
    assert not [p for p in problems(target={"standby_s": 300}) if "standby" in p]
