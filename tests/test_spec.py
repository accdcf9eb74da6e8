"""Bad input gets one clear error naming the field, before any side effect."""

import dagster as dg
import pytest

from ops_pipeline.spec import ReleaseConfig, ReleaseSpec, validate_release_config


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
        ({"app": {"required_env": ["DATABASE_URL", "BAD-NAME"]}}, "app.required_env"),
        ({"environment": "Prod!"}, "environment"),
        ({"environment": ""}, "environment"),
        ({"gate": {"required_successes": 30, "interval_s": 5, "deadline_s": 60}}, "gate.required_successes"),
        ({"gate": {"deadline_s": 0}}, "gate.deadline_s"),
        ({"gate": {"interval_s": -1}}, "gate.interval_s"),
        ({"production": True, "embedded_services": True}, "embedded_services"),
        ({"version": "v1 with spaces"}, "version"),
        ({"target": {"pm2": {"kill_timeout_s": 5}}}, "target.pm2.kill_timeout_s"),
        ({"target": {"pm2": {"keep_releases": 1}}}, "target.pm2.keep_releases"),
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
