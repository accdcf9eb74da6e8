"""The released app's runtime environment, in the app's own variable names.

Where values come from, per the spec (`app`):
  * `database` / `redis`: the environment's PostgreSQL and Redis, from a reference (`url_from`: env:NAME in the
    Dagster process environment, or file:/path) or, on a non-production environment with `embedded_services`,
    the embedded stack's database/role/db number named in the spec. The app receives them in the shape it reads:
    a whole URL and/or parts (host, port, database, user, password, TLS flag), each under its own name.
  * `required_env`: passed through from the Dagster process environment (JWT_SECRET and NODE_ENV fall back to the
    embedded stack's when it is used).
  * `env`: plain values; `secrets`: references (env:NAME, file:/path, or generate: a random value kept per
    environment in the state folder).
Values are resolved where they are used and never passed between ops, so they never reach op outputs, run config or
the UI; the spec (which holds only names and references) is recorded with each release, so a rollback launched by a
sensor resolves the same environment. Every resolution carries a `Redactor` for its secrets.
"""

from __future__ import annotations

import json
import os
import secrets as random_secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict
from redis.connection import parse_url as parse_redis_url

from ops_pipeline.platform import paths
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.redaction import Redactor, looks_secret
from ops_pipeline.platform.spec import ConnectionVarsConfig, ReleaseConfig

TLS_SSLMODES = ("require", "verify-ca", "verify-full")


@dataclass
class AppEnv:
    values: dict[str, str]
    sources: dict[str, str]  # app variable -> where its value came from (never the value)
    missing: list[str]  # problems, each naming the variable and its reference
    redactor: Redactor = field(default_factory=Redactor)
    database_url: str | None = None  # the environment's PostgreSQL (backups, migrations, the release lock)
    redis_url: str | None = None
    secret_names: set[str] = field(default_factory=set)

    def get(self, name: str) -> str | None:
        return self.values.get(name) if name else None

    def for_process(self) -> dict[str, str]:
        """Variables to hand to the app's processes and commands."""
        return dict(self.values)

    def _given(self, var: str, default: str = "") -> str:
        return self.values.get(var, default) if var else default

    def _check_url(self, conn: ConnectionVarsConfig, *, scheme: str, tls_scheme: str, tls_query: str,
                   default_port: str, default_database: str) -> str | None:
        """The connection exactly as the app receives it: its URL variable, else a URL made of its parts."""
        if self._given(conn.url):
            return self.values[conn.url]
        host = self._given(conn.host)
        if not host:
            return None
        tls = self._given(conn.tls) == "true"
        user, password = quote(self._given(conn.user), safe=""), quote(self._given(conn.password), safe="")
        auth = f"{user}{':' + password if password else ''}@" if user or password else ""
        database = quote(self._given(conn.database, default_database), safe="")
        return (f"{tls_scheme if tls else scheme}://{auth}{host}:{self._given(conn.port, default_port)}/{database}"
                f"{tls_query if tls else ''}")

    def database_check_url(self, conn: ConnectionVarsConfig) -> str | None:
        """The PostgreSQL connection as the app receives it, for verify_env."""
        return self._check_url(conn, scheme="postgresql", tls_scheme="postgresql", tls_query="?sslmode=require",
                               default_port="5432", default_database="")

    def redis_check_url(self, conn: ConnectionVarsConfig) -> str | None:
        """The Redis connection as the app receives it, for verify_env."""
        return self._check_url(conn, scheme="redis", tls_scheme="rediss", tls_query="", default_port="6379",
                               default_database="0")


def postgres_parts(url: str) -> dict[str, str]:
    """host, port, database, user, password, tls of a PostgreSQL URL (libpq's own parser, via psycopg)."""
    info = conninfo_to_dict(url)
    return {
        "url": url,
        "host": str(info.get("host") or "localhost"),
        "port": str(info.get("port") or "5432"),
        "database": str(info.get("dbname") or info.get("user") or ""),
        "user": str(info.get("user") or ""),
        "password": str(info.get("password") or ""),
        "tls": "true" if info.get("sslmode") in TLS_SSLMODES else "false",
    }


def redis_parts(url: str) -> dict[str, str]:
    """host, port, database, user, password, tls of a Redis URL (redis-py's own parser)."""
    info = parse_redis_url(url)
    return {
        "url": url,
        "host": str(info.get("host") or "localhost"),
        "port": str(info.get("port") or 6379),
        "database": str(info.get("db") or 0),
        "user": str(info.get("username") or ""),
        "password": str(info.get("password") or ""),
        "tls": "true" if url.startswith("rediss://") else "false",
    }


def generated_secret(environment: str, name: str) -> str:
    """A random value for `name`, made once per environment and kept (0600) in the environment's state folder."""
    path = paths.environment_dir(environment) / "generated-secrets.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if name not in data:
        data[name] = random_secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    return data[name]


def resolve_reference(ref: str, environ: dict) -> tuple[str | None, str]:
    """(value or None, a description of where it comes from that never contains the value)."""
    if ref.startswith("env:"):
        name = ref[4:]
        return (environ.get(name) or None), f"environment variable {name}"
    if ref.startswith("file:"):
        path = Path(ref[5:])
        try:
            return path.read_text().rstrip("\r\n") or None, f"file {path}"
        except OSError as exc:
            return None, f"file {path} ({exc.strerror or type(exc).__name__})"
    return None, f"unknown reference {ref!r}"


def secret_names(app) -> set[str]:
    names = set(app.secret_env) | set(app.secrets)
    names.update(n for n in app.required_env if looks_secret(n))
    names.update(n for n in (app.database.app_vars.url, app.database.app_vars.password, app.redis.app_vars.url,
                             app.redis.app_vars.password, app.jwt_secret_env) if n)
    return names


def resolve_app_env(config: ReleaseConfig, local_stack: LocalStack | None, environ: dict | None = None) -> AppEnv:
    """Everything the app will receive, plus the environment's database and Redis URLs, for one environment."""
    environ = dict(os.environ if environ is None else environ)
    app = config.app
    embedded = config.embedded_services and not config.production and local_stack is not None
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    missing: list[str] = []
    stack = None

    def embedded_stack():
        nonlocal stack
        if stack is None:
            stack = local_stack.ensure_running(database=app.database.embedded_database, role=app.database.embedded_role,
                                               redis_db=app.redis.embedded_db)
        return stack

    def connection(block: str, url_from: str, vars_: ConnectionVarsConfig, split) -> str | None:
        url, where = resolve_reference(url_from, environ)
        # A file the spec names is the environment's own database: missing, it is an error, never the embedded one.
        if not url and embedded and not url_from.startswith("file:"):
            url = embedded_stack().database_url if block == "database" else embedded_stack().redis_url
            where = "embedded stack"
        if not url:
            missing.append(f"app.{block}.url_from: {where} " + ("is not set" if url_from.startswith("env:")
                                                                 else "cannot be read or is empty"))
            return None
        try:
            parts = split(url)
        except Exception as exc:  # noqa: BLE001 - a malformed URL is reported by name, never shown
            missing.append(f"app.{block}.url_from: the URL in {where} cannot be parsed ({type(exc).__name__})")
            return None
        for part, name in vars_.model_dump().items():
            if name:
                values[name] = parts[part]
                sources[name] = f"{block} {part} ({where})"
        return url

    database_url = connection("database", app.database.url_from, app.database.app_vars, postgres_parts)
    redis_url = connection("redis", app.redis.url_from, app.redis.app_vars, redis_parts) if app.redis.enabled else None

    fallbacks = {app.jwt_secret_env: "jwt_secret", app.node_env_var: "node_env"}
    for name in app.required_env:
        if environ.get(name):
            values[name], sources[name] = environ[name], "environment"
        elif embedded and fallbacks.get(name) == "jwt_secret":
            values[name], sources[name] = embedded_stack().jwt_secret, "embedded stack"
        elif embedded and fallbacks.get(name) == "node_env":
            values[name], sources[name] = "production", "embedded stack"
        else:
            missing.append(f"app.required_env: {name} is not set in the environment")
    for name, value in app.env.items():
        values[name], sources[name] = value, "spec (app.env)"
    for name, ref in app.secrets.items():
        if ref == "generate":
            value, where = generated_secret(config.environment, name), "generated for this environment"
        else:
            value, where = resolve_reference(ref, environ)
        if value is None:
            missing.append(f"app.secrets.{name}: {where} " + ("is not set" if ref.startswith("env:")
                                                             else "cannot be read or is empty"))
        else:
            values[name], sources[name] = value, where

    names = secret_names(app)
    redactor = Redactor()
    redactor.add(*(values.get(n) for n in names), database_url, redis_url)
    redactor.add(postgres_parts(database_url)["password"] if database_url else None,
                 redis_parts(redis_url)["password"] if redis_url else None)
    return AppEnv(values=values, sources=sources, missing=missing, redactor=redactor, database_url=database_url,
                  redis_url=redis_url, secret_names=names)
