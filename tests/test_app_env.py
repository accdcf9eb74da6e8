"""The app's environment in its own variable names: connection parts, TLS flags, references, generated secrets."""

import os

import pytest

from ops_pipeline.platform.app_env import postgres_parts, redis_parts, resolve_app_env
from ops_pipeline.platform.spec import ReleaseConfig


def config(**app) -> ReleaseConfig:
    base = {"required_env": [], "secret_env": [], "jwt_secret_env": "", "node_env_var": ""}
    return ReleaseConfig(environment="envtest", embedded_services=False, app={**base, **app})


def test_postgres_and_redis_urls_split_into_the_parts_apps_read():
    assert postgres_parts("postgresql://u%40x:p%2Fw@db.internal:6543/orders?sslmode=verify-full") == {
        "url": "postgresql://u%40x:p%2Fw@db.internal:6543/orders?sslmode=verify-full", "host": "db.internal",
        "port": "6543", "database": "orders", "user": "u@x", "password": "p/w", "tls": "true"}
    assert postgres_parts("postgres://app@localhost/app")["tls"] == "false"
    assert redis_parts("rediss://default:s3cret@cache:6380/4") == {
        "url": "rediss://default:s3cret@cache:6380/4", "host": "cache", "port": "6380", "database": "4",
        "user": "default", "password": "s3cret", "tls": "true"}


def test_split_variables_references_and_redaction(tmp_path):
    pw_file = tmp_path / "db-url"
    pw_file.write_text("postgresql://orders:hunter2-long-password@10.1.2.3:5433/orders?sslmode=require\n")
    cfg = config(
        database={"url_from": f"file:{pw_file}", "app_vars": {"url": "", "host": "DB_SERVER", "port": "DB_PORT",
                                                              "database": "DB_NAME", "user": "DB_USER",
                                                              "password": "DB_PASS", "tls": "DB_SSL"}},
        redis={"url_from": "env:CACHE_URL", "app_vars": {"url": "", "host": "REDIS_HOST", "port": "REDIS_PORT"}},
        env={"LOG_LEVEL": "info"}, secrets={"SIGNING_KEY": "env:OPS_TEST_SIGNING_KEY"})
    env = resolve_app_env(cfg, None, environ={"CACHE_URL": "redis://:r-pass@127.0.0.1:7000/0",
                                              "OPS_TEST_SIGNING_KEY": "k" * 40})
    assert env.missing == []
    assert {k: env.values[k] for k in ("DB_SERVER", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASS", "DB_SSL")} == {
        "DB_SERVER": "10.1.2.3", "DB_PORT": "5433", "DB_NAME": "orders", "DB_USER": "orders",
        "DB_PASS": "hunter2-long-password", "DB_SSL": "true"}
    assert env.values["REDIS_HOST"] == "127.0.0.1" and env.values["REDIS_PORT"] == "7000"
    assert "DATABASE_URL" not in env.values and "REDIS_URL" not in env.values
    assert env.values["LOG_LEVEL"] == "info" and env.values["SIGNING_KEY"] == "k" * 40
    # the check uses exactly what the app receives, and nothing secret survives redaction
    assert env.database_check_url(cfg.app.database.app_vars) == \
        "postgresql://orders:hunter2-long-password@10.1.2.3:5433/orders?sslmode=require"
    assert env.redis_check_url(cfg.app.redis.app_vars) == "redis://127.0.0.1:7000/0"
    text = env.redactor(f"{env.database_url} {env.values['DB_PASS']} {env.values['SIGNING_KEY']} r-pass")
    assert "hunter2" not in text and "k" * 40 not in text and "r-pass" not in text
    assert "hunter2" not in " ".join(env.sources.values())  # sources name where a value came from, never the value


def test_missing_references_are_each_named_and_a_named_file_is_never_replaced_by_the_embedded_stack(tmp_path):
    cfg = ReleaseConfig(environment="envtest", app={
        "required_env": ["API_TOKEN"], "secret_env": [], "jwt_secret_env": "", "node_env_var": "",
        "database": {"url_from": f"file:{tmp_path / 'absent'}"}, "redis": {"url_from": "env:OPS_TEST_NO_REDIS"},
        "secrets": {"KEY": f"file:{tmp_path / 'absent-key'}"}})
    env = resolve_app_env(cfg, None, environ={})
    assert env.missing == [
        f"app.database.url_from: file {tmp_path / 'absent'} (No such file or directory) cannot be read or is empty",
        "app.redis.url_from: environment variable OPS_TEST_NO_REDIS is not set",
        "app.required_env: API_TOKEN is not set in the environment",
        f"app.secrets.KEY: file {tmp_path / 'absent-key'} (No such file or directory) cannot be read or is empty",
    ]


def test_generated_secrets_are_kept_per_environment_and_private(tmp_path, monkeypatch):
    monkeypatch.setenv("OPS_STATE_DIR", str(tmp_path))
    cfg = config(secrets={"SESSION_SECRET": "generate", "OTHER": "generate"}, redis={"enabled": False},
                 database={"url_from": "env:DB"})
    first = resolve_app_env(cfg, None, environ={"DB": "postgresql://a:b@h/d"})
    again = resolve_app_env(cfg, None, environ={"DB": "postgresql://a:b@h/d"})
    assert first.values["SESSION_SECRET"] == again.values["SESSION_SECRET"] != first.values["OTHER"]
    assert len(first.values["SESSION_SECRET"]) >= 40
    kept = tmp_path / "envs" / "envtest" / "generated-secrets.json"
    assert kept.exists() and oct(os.stat(kept).st_mode & 0o777) == "0o600"
    other_env = resolve_app_env(cfg.model_copy(update={"environment": "envtest2"}), None,
                                environ={"DB": "postgresql://a:b@h/d"})
    assert other_env.values["SESSION_SECRET"] != first.values["SESSION_SECRET"]


@pytest.mark.parametrize("ref", ["plain-value", "env:", "file:relative/path", "vault:x"])
def test_secret_values_are_refused_in_the_spec(ref):
    from ops_pipeline.platform.spec import validate_release_config

    problems = validate_release_config(config(secrets={"KEY": ref}), check_paths=False)
    assert problems == [f"app.secrets.KEY: {ref!r} is not a reference (env:NAME, file:/absolute/path or generate); "
                        "secret values are never written in the spec"]


def test_redis_parts_with_tls_and_a_password_make_the_url_the_app_would_use():
    cfg = config(database={"url_from": "env:DB"},
                 redis={"url_from": "env:R", "app_vars": {"url": "", "host": "RH", "port": "RP", "password": "RPW",
                                                          "database": "RDB", "tls": "RTLS"}})
    env = resolve_app_env(cfg, None, environ={"DB": "postgresql://a:b@h/d", "R": "rediss://:p%40ss@cache:6380/2"})
    assert env.redis_check_url(cfg.app.redis.app_vars) == "rediss://:p%40ss@cache:6380/2"
