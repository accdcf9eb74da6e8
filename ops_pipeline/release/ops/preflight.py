"""verify_env: the release spec and the environment are checked at once, before anything happens."""

import subprocess
import time
from pathlib import Path

import dagster as dg

from ops_pipeline.platform import paths
from ops_pipeline.platform.app_env import resolve_app_env
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import DatabaseError, PostgresResource
from ops_pipeline.platform.redis import RedisError, RedisResource
from ops_pipeline.platform.spec import (
    KNOWN_DEFAULT_SECRETS,
    ReleaseConfig,
    ReleaseSpec,
    SpecError,
    validate_release_config,
)
from ops_pipeline.release import liveness


def git_state(folder: Path) -> tuple[str, bool]:
    """(short SHA, dirty) of the git checkout holding `folder`; ("", False) outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return "", False
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."], capture_output=True,
                                text=True, timeout=10)
        return sha.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return "", False


def default_version(commit: str, dirty: bool) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"v{stamp}-{commit or 'nogit'}{'-dirty' if dirty else ''}"


def tag_run(context: dg.OpExecutionContext, tags: dict[str, str]) -> None:
    """Environment, version and commit as run tags: the run list can be filtered by them."""
    try:
        run = context.instance.get_run_by_id(context.run_id)
        if run is not None:
            context.instance.add_run_tags(context.run_id, {k: v for k, v in tags.items() if run.tags.get(k) != v})
    except Exception as exc:  # noqa: BLE001 - tags are a convenience, never a reason to fail a release
        context.log.warning(f"could not tag the run: {type(exc).__name__}")


def _names(conn) -> str:
    return ", ".join(v for v in conn.model_dump().values() if v)


def check_release_config(config: ReleaseConfig) -> None:
    problems = validate_release_config(config)
    if problems:
        raise failure(str(SpecError(problems)), metadata={"problems": dg.MetadataValue.json(problems)})


@dg.op(
    description=(
        "Validates the release spec and the environment in one pass: every required variable (one error names all "
        "missing ones), NODE_ENV, the signing secret in production, and that the database answers SELECT 1 and "
        "Redis answers PING within the timeout. Secret values are never shown. Outputs the validated release spec."
    ),
    tags={"stage": "preflight"},
)
def verify_env(
    context: dg.OpExecutionContext,
    config: ReleaseConfig,
    local_stack: LocalStack,
    postgres: PostgresResource,
    redis: RedisResource,
) -> ReleaseSpec:
    check_release_config(config)
    if config.target.hosts:
        raise failure("target.hosts: this version of ops-pipeline checks hosts (the check_hosts job: SSH with pinned "
                      "keys, node, pm2, disk, clock) but does not deploy to them yet; without target.hosts the "
                      "release runs on this machine. Nothing was done.")
    app = config.app
    app_dir = paths.resolve(app.path)
    env = resolve_app_env(config, local_stack)
    errors: list[str] = list(env.missing)

    node_env = env.get(app.node_env_var) if app.node_env_var else None
    if app.node_env_var and node_env is not None and node_env != "production":
        msg = f"{app.node_env_var} is {node_env!r}, not 'production'"
        if config.production:
            errors.append(msg + " (required in a production environment)")
        else:
            context.log.warning(msg)

    secret = env.get(app.jwt_secret_env) if app.jwt_secret_env else None
    if secret is not None and config.production:
        if len(secret) < app.min_secret_length:
            errors.append(f"{app.jwt_secret_env} is too short for production ({len(secret)} characters, at least {app.min_secret_length})")
        if secret.strip().lower() in KNOWN_DEFAULT_SECRETS:
            errors.append(f"{app.jwt_secret_env} is a well-known default value; set a random secret")

    # Checked as the app will receive them: its URL variable, else the parts under its own names.
    checks: dict[str, dict] = {}
    db_url = env.database_check_url(app.database.app_vars) if env.database_url else None
    if db_url:
        try:
            checks["database"] = postgres.check(db_url, timeout_s=config.dependency_timeout_s)
        except DatabaseError as exc:
            errors.append(f"database check failed (with the app's {_names(app.database.app_vars)}): {env.redactor(str(exc))}")
    redis_url = env.redis_check_url(app.redis.app_vars) if env.redis_url else None
    if redis_url:
        try:
            checks["redis"] = redis.ping(redis_url, timeout_s=config.dependency_timeout_s)
        except RedisError as exc:
            errors.append(f"redis check failed (with the app's {_names(app.redis.app_vars)}): {env.redactor(str(exc))}")

    if errors:
        raise failure(f"environment '{config.environment}' is not ready for a release:\n" + "\n".join(f"  - {e}" for e in errors),
            metadata={"problems": dg.MetadataValue.json(errors)})

    commit, dirty = git_state(app_dir)
    version = config.version or default_version(commit, dirty)
    spec = ReleaseSpec(config=config, version=version, app_dir=str(app_dir), commit=commit, dirty=dirty)
    tag_run(context, {**liveness.host_tags(), "ops/environment": config.environment, "ops/version": version,
                      "ops/commit": f"{commit or 'nogit'}{'-dirty' if dirty else ''}", "ops/target": config.target.kind.value})
    context.add_output_metadata(
        {
            "environment": config.environment,
            "production": config.production,
            "version": version,
            "commit": f"{commit or 'not a git checkout'}{' (dirty)' if dirty else ''}",
            "target": f"{config.target.kind.value} x{config.target.instances}",
            "public_url": dg.MetadataValue.url(spec.public_url),
            "variables": dg.MetadataValue.json(dict(sorted(env.sources.items()))),
            "dependency_checks": dg.MetadataValue.json(checks),
        }
    )
    context.log.info(
        f"environment '{config.environment}' ready: {len(env.values)} variables set "
        f"({', '.join(f'{k} from {v}' for k, v in env.sources.items())}); "
        f"{' and '.join(checks) or 'no dependency'} answer{'s' if len(checks) == 1 else ''}"
    )
    return spec
