"""The released app's runtime environment (DATABASE_URL, REDIS_URL, JWT_SECRET, NODE_ENV, ...).

Values come from the environment of the Dagster process (how CI and production provide secrets), and
for a non-production environment with `embedded_services`, missing connection settings come from the
embedded local stack. Values are resolved where they are used and never passed between ops, so they
never reach op outputs, run config or the UI. Every resolution carries a `Redactor` for its secrets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ops_pipeline.local_stack import LocalStack
from ops_pipeline.redaction import Redactor, looks_secret
from ops_pipeline.spec import AppConfig


@dataclass
class AppEnv:
    values: dict[str, str]
    sources: dict[str, str]  # name -> "environment" | "embedded stack"
    missing: list[str]
    redactor: Redactor = field(default_factory=Redactor)

    def get(self, name: str) -> str | None:
        return self.values.get(name) if name else None

    def for_process(self) -> dict[str, str]:
        """Variables to hand to the app's processes and commands."""
        return dict(self.values)


def secret_names(app: AppConfig) -> set[str]:
    names = set(app.secret_env)
    names.update(n for n in app.required_env if looks_secret(n))
    names.update(n for n in (app.database_url_env, app.redis_url_env, app.jwt_secret_env) if n)
    return names


def resolve_app_env(app: AppConfig, *, embedded: bool, local_stack: LocalStack | None, environ: dict | None = None) -> AppEnv:
    environ = dict(os.environ if environ is None else environ)
    wanted = list(dict.fromkeys([*app.required_env, *(n for n in (app.database_url_env, app.redis_url_env, app.jwt_secret_env) if n)]))
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name in wanted:
        if environ.get(name):
            values[name] = environ[name]
            sources[name] = "environment"
    embedded_names = {app.database_url_env: "DATABASE_URL", app.redis_url_env: "REDIS_URL", app.jwt_secret_env: "JWT_SECRET",
                      app.node_env_var: "NODE_ENV"}
    needs_stack = [n for n in embedded_names if n and n in wanted and n not in values]
    if embedded and local_stack is not None and needs_stack:
        provided = local_stack.ensure_running().app_env()
        for name in needs_stack:
            values[name] = provided[embedded_names[name]]
            sources[name] = "embedded stack"
    missing = [n for n in app.required_env if not values.get(n)]
    redactor = Redactor()
    redactor.add(*(values.get(n) for n in secret_names(app)))
    return AppEnv(values=values, sources=sources, missing=missing, redactor=redactor)
