"""The release spec: what is released, where, and how it is judged.

(Over 400 lines on purpose: every field of the spec, its default and the rule that checks it read in one file,
which is what a user writing a spec and a reviewer changing a rule both need.)

`ReleaseConfig` is the typed run config the Launchpad shows (defaults release `examples/node-api` to
the `local` environment on the embedded stack). Another Node service is released by writing another
spec (a run config file, see `presets/`), not code. `verify_env` validates the whole config at once
(`validate_release_config`) and turns it into a `ReleaseSpec`, which every later op receives as input.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Optional
from urllib.parse import urlsplit

import dagster as dg
from pydantic import Field

from ops_pipeline.platform import paths

ENV_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}\Z")
ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
KNOWN_DEFAULT_SECRETS = [
    "dev-secret",
    "secret",
    "changeme",
    "change-me",
    "your-secret-key",
    "your_jwt_secret",
    "jwt-secret",
    "supersecret",
    "password",
]


class DeployTargetKind(str, Enum):
    pm2 = "pm2"
    docker = "docker"
    kubernetes = "kubernetes"


class CommandsConfig(dg.Config):
    """The app's own commands: an ordered list of named steps run in the app folder (install, build, lint, test,
    audit, any custom one), the production install inside the release bundle, and the migration command.

    With no `steps`, they come from the app: install with its package manager, then build, lint and test for each
    of those scripts its package.json has (an app without a lint script gets no lint step). `install`, `build`,
    `lint` and `test` replace the command of the step of that name ('' removes the step) without listing them all.
    """

    steps: list["StepConfig"] = Field(
        [],
        description="Ordered steps, e.g. [{name: install}, {name: build}, {name: lint}, {name: test, run: 'npm test'}]. "
        "A step without `run` gets its default: the package manager's install, `audit`, or `<pm> run <name>` for a "
        "package.json script of that name. Empty: install, then build, lint, test for the scripts that exist.",
    )
    package_manager: str = Field(
        "",
        description="npm | yarn | pnpm (empty: chosen from the lock file: package-lock.json / npm-shrinkwrap.json, "
        "yarn.lock (Berry when .yarnrc.yml is there), pnpm-lock.yaml). yarn and pnpm come from the npm registry at the "
        "version in package.json's packageManager field, or Berry's release committed under .yarn/releases.",
    )
    allow_scripts: list[str] = Field(
        [],
        description="Dependencies whose install scripts may run (npm's allowScripts, pnpm's onlyBuiltDependencies). "
        "The app's own package.json allowScripts / .npmrc are honoured as well.",
    )
    install: Optional[str] = Field(None, description="Command of the install step ('' removes it; unset: the package "
                                   "manager's frozen-lockfile install). Skipped when the lock file has not changed since the last install.")
    lint: Optional[str] = Field(None, description="Command of the lint step ('' removes it; unset: the lint script, if any).")
    test: Optional[str] = Field(None, description="Command of the test step ('' removes it; unset: the test script, if any). "
                                "Its output (node's TAP, jest, mocha) is read for test counts and failing test names.")
    build: Optional[str] = Field(None, description="Command of the build step ('' removes it; unset: the build script, if any).")
    install_production: Optional[str] = Field(
        None,
        description="Installs runtime dependencies only, inside the release bundle ('' none; unset: the package "
        "manager's: npm ci --omit=dev, yarn install --production --frozen-lockfile, yarn workspaces focus --all "
        "--production, pnpm install --prod --frozen-lockfile).",
    )
    migrate: str = Field(
        "npm run migrate",
        description="Applies pending database migrations; runs inside the built artifact with the environment's DATABASE_URL.",
    )
    timeout_s: float = Field(900.0, description="Deadline for any one of these commands, in seconds.")


class StepConfig(dg.Config):
    """One named command of `app.commands.steps`, run in the app folder with the release version in its environment."""

    name: str = Field(description="Step name (install, build, lint, test, audit or your own), shown in the run log.")
    run: str = Field("", description="Shell command (empty: the default for this name, see app.commands.steps).")
    tests: Optional[bool] = Field(None, description="Read this step's output for test counts and failing test "
                                  "names (unset: true for the step named test and for a step with a junit report).")
    junit: str = Field("", description="A JUnit XML report this step writes (relative to the app folder); read for "
                       "test counts and failing test names instead of the output.")


CommandsConfig.model_rebuild()


def commands_problems(app: "AppConfig", app_dir: Optional[Path]) -> list[str]:
    """Problems in app.commands (steps, package manager, allowed install scripts) and app.bundle_paths."""
    from ops_pipeline.platform.packagers import commands_problems as _problems

    problems = _problems(app.commands, app_dir)
    for p in app.bundle_paths:
        if not p or p.startswith("/") or ".." in Path(p).parts:
            problems.append(f"app.bundle_paths: {p!r} must be a relative path inside the app folder")
    return problems


SECRET_REF = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+|generate)\Z")
VERSION_CHECK = re.compile(r"^(off|json:[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*|header:[A-Za-z0-9-]+)\Z")


class ConnectionVarsConfig(dg.Config):
    """The app's own variable names for one connection: a whole URL and/or its parts. Empty: not given."""

    url: str = Field("", description="Variable that receives the whole URL (postgresql://... / redis://...).")
    host: str = Field("", description="Variable that receives the host.")
    port: str = Field("", description="Variable that receives the port.")
    database: str = Field("", description="Variable that receives the database name (PostgreSQL) or number (Redis).")
    user: str = Field("", description="Variable that receives the user name.")
    password: str = Field("", description="Variable that receives the password (always treated as a secret).")
    tls: str = Field("", description="Variable set to 'true' when the connection uses TLS (sslmode=require..., rediss://), else 'false'.")


class DatabaseVarsConfig(ConnectionVarsConfig):
    url: str = Field("DATABASE_URL", description="Variable that receives the whole URL (empty: parts only).")


class RedisVarsConfig(ConnectionVarsConfig):
    url: str = Field("REDIS_URL", description="Variable that receives the whole URL (empty: parts only).")


class ArchiveConfig(dg.Config):
    """Continuous WAL archiving with pgBackRest (`backups: archive`): the server must run on the Dagster host."""

    admin_url_from: str = Field("", description="A superuser's URL of the same server (env:NAME or file:/path; empty: "
                                "the app's database URL, whose role must then be a superuser): restore points, archive "
                                "status and base backups need one.")
    cipher_key_from: str = Field("", description="Key encrypting the archive repository (aes-256-cbc): env:NAME or "
                                 "file:/path, never stored with the backups; empty: unencrypted.")
    repo_dir: str = Field("", description="pgBackRest repository folder (empty: <backup folder>/pgbackrest).")
    retention_full: int = Field(2, description="Full base backups kept; WAL is kept from the oldest kept one on.")
    archive_timeout_s: int = Field(60, description="archive_timeout: the longest a written change waits before its WAL "
                                   "segment is archived (the recovery point objective under light writes).")


class DatabaseConfig(dg.Config):
    """The environment's PostgreSQL and how the app receives it."""

    backups: str = Field("dump", description="dump: a verified pg_dump before each release and nightly (any PostgreSQL, "
                         "managed ones too). archive: continuous WAL archiving with pgBackRest (the server must run on "
                         "this host); a release records a named restore point instead of a dump, and restore_point_in_time "
                         "restores to any moment.")
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig, description="Settings of backups: archive.")

    url_from: str = Field("env:DATABASE_URL", description="Where the environment's PostgreSQL URL comes from: "
                          "env:NAME (the Dagster process environment) or file:/path. An unset env:NAME on a non-production "
                          "environment with embedded_services means the embedded database below; a missing file is an error.")
    embedded_database: str = Field("app", description="Database name in the embedded PostgreSQL.")
    embedded_role: str = Field("app", description="Role owning it in the embedded PostgreSQL.")
    app_vars: DatabaseVarsConfig = Field(default_factory=DatabaseVarsConfig,
                                         description="The app's variables for the database (URL and/or parts).")


class RedisConfig(dg.Config):
    """The environment's Redis and how the app receives it."""

    enabled: bool = Field(True, description="The app uses Redis (false: no Redis is provided or checked).")
    url_from: str = Field("env:REDIS_URL", description="Where the environment's Redis URL comes from: env:NAME or "
                          "file:/path. An unset env:NAME with embedded_services means the embedded Redis; a missing file is an error.")
    embedded_db: int = Field(0, description="Database number in the embedded Redis.")
    app_vars: RedisVarsConfig = Field(default_factory=RedisVarsConfig,
                                      description="The app's variables for Redis (URL and/or parts).")


class AppConfig(dg.Config):
    """The service being released: where its code is and how it is configured at run time."""

    name: str = Field("node-api", description="Service name; prefixes process names, artifacts and backups.")
    path: str = Field("examples/node-api", description="App folder (relative to the project root, or absolute).")
    required_env: list[str] = Field(
        ["JWT_SECRET", "NODE_ENV"],
        description="Variables passed through from the Dagster process environment; all are checked at once before "
                    "anything else runs. (Database and Redis variables come from `database` and `redis`.)",
    )
    secret_env: list[str] = Field(
        ["JWT_SECRET"],
        description="Which of required_env are secret: never logged, shown or stored in run config.",
    )
    env: dict[str, str] = Field({}, description="Plain (non-secret) variables for the app, recorded with each release.")
    secrets: dict[str, str] = Field({}, description="Secret variables for the app, by reference only: env:NAME (the "
                                    "Dagster process environment), file:/path, or generate (a random value kept in "
                                    "the state folder; not in production). Recorded by reference with each release, "
                                    "so a rollback launched by a sensor recreates the same environment.")
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    jwt_secret_env: str = Field("JWT_SECRET", description="Variable holding the token-signing secret (empty: none).")
    node_env_var: str = Field("NODE_ENV", description="Variable naming the runtime mode (must be 'production' in production).")
    min_secret_length: int = Field(32, description="Minimum length of the signing secret in production.")
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    bundle_paths: list[str] = Field(
        [],
        description="Files and folders copied from the app folder into the immutable release bundle, besides "
        "package.json, the lock file and the package manager's files (.npmrc, .yarnrc.yml, .yarn/releases, "
        ".pnpmfile.cjs, ...), which always go in. Empty: the whole app folder as the build left it, without "
        "node_modules, VCS folders, .env files, test output and caches.",
    )
    entrypoint: str = Field("dist/server.js", description="Script the process manager starts with node, relative to "
                            "the bundle (used when `start` is empty).")
    start: str = Field("", description="Start command, run by a shell in start_dir, e.g. 'npm start', "
                       "'node node_modules/some-server/dist/server.js', 'npx next start' (empty: node <entrypoint>).")
    start_dir: str = Field("", description="Folder inside the bundle the app starts in (empty: the bundle's root).")
    instance_env: dict[str, str] = Field({}, description="Per-instance variables; {slot}, {port} and {instance_dir} "
                                         "(a folder kept for that slot across releases) are replaced.")
    health_path: str = Field("/health", description="Health endpoint: a 2xx answer (JSON or text) when healthy.")
    metrics_path: str = Field("", description="Optional: the app's Prometheus metrics (e.g. /metrics). A canary's "
                              "analysis then also reads its request-duration histogram (canary.analysis.metrics_*).")
    health_version: str = Field("json:version", description="Where the health answer reports the running version, "
                                "checked against the release's: json:<field.path>, header:<Name>, or off.")
    version_env: str = Field("APP_VERSION", description="Variable through which the app learns the release version it runs.")
    port_env: str = Field("PORT", description="Variable giving the app its shared listening port.")
    instance_port_env: str = Field(
        "", description="Optional: a variable that also receives each instance's own port (apps that listen twice). "
                        "Instances always get their own port in port_env behind the front proxy."
    )
    migrations_table: str = Field("pgmigrations", description="Table where the migration tool records applied migrations.")
    migration_lock_timeout_s: float = Field(
        5.0, description="lock_timeout for migrations: a DDL statement waiting longer for a lock fails instead of stalling traffic."
    )
    migration_statement_timeout_s: float = Field(900.0, description="statement_timeout for migrations.")
    shutdown_timeout_s: float = Field(10.0, description="How long the app drains in-flight requests on SIGTERM/SIGINT.")


class Pm2Config(dg.Config):
    """PM2 process manager target: one PM2 process per instance on this host, each on its own port, behind nginx."""

    home: str = Field("", description="PM2_HOME for this environment (default: <state>/envs/<env>/pm2).")
    deploy_root: str = Field("", description="Holds releases/<version> and the `current` link (default: <state>/envs/<env>/app).")
    keep_releases: int = Field(5, description="Release folders kept for rollback; the serving and last good ones are never pruned.")
    listen_timeout_s: float = Field(20.0, description="How long a new instance may take to answer healthy on its own port.")
    drain_s: float = Field(30.0, description="Longest time an instance taken out of the front proxy is given to finish "
                           "its requests before it is stopped.")
    kill_timeout_s: float = Field(15.0, description="Grace period PM2 gives a stopping instance before SIGKILL.")
    max_memory_restart: str = Field("500M", description="PM2 restarts an instance above this memory use.")


class DockerTargetConfig(dg.Config):
    """Docker Engine target: replica containers on a user-defined network behind nginx."""

    network: str = Field("", description="User-defined network (default: ops-<app>-<env>).")
    image_repository: str = Field("", description="Image repository, e.g. 127.0.0.1:5000/node-api (default: localhost/<app>).")
    base_image: str = Field("", description="BASE_IMAGE build argument for the app's Dockerfile (empty: the Dockerfile's default).")
    push: bool = Field(True, description="Push the built image to the registry in image_repository.")
    container_port: int = Field(3000, description="Port the app listens on inside the container.")
    drain_s: float = Field(30.0, description="Longest time an old container is given to finish its requests.")
    start_timeout_s: float = Field(0.0, description="Longest wait for a new container to become healthy (its "
                                   "HEALTHCHECK and our own probe) before the rollout stops with the old replicas "
                                   "serving; 0: the health gate's deadline, at least 30 s.")
    nginx_conf_dir: str = Field("", description="Where the generated nginx config lives (default: <state>/envs/<env>/nginx).")
    env_file_vars: list[str] = Field([], description="Extra variables passed to the containers.")
    secret_files: bool = Field(True, description="Give the containers app.secret_env as read-only files "
                               "(NAME_FILE=/run/secrets/ops/NAME, the Docker secrets convention), not as environment "
                               "variables that `docker inspect` shows; false for an app that does not read NAME_FILE.")


class KubernetesTargetConfig(dg.Config):
    """Kubernetes target: a RollingUpdate Deployment."""

    namespace: str = Field("default", description="Namespace of the Deployment.")
    deployment: str = Field("api", description="Deployment name.")
    container: str = Field("api", description="Container in the pod template whose image is set.")
    image_repository: str = Field("", description="Image repository the cluster pulls from.")
    api_server: str = Field("", description="API server URL (empty: kubeconfig or in-cluster config).")
    kubeconfig: str = Field("", description="Path to a kubeconfig (empty: default loading rules).")
    progress_deadline_s: float = Field(600.0, description="Give up on a rollout after this long.")


class HostConfig(dg.Config):
    """One machine the service runs on, reached over SSH (its host key pinned in target.known_hosts)."""

    address: str = Field(description="IP address or DNS name the pipeline reaches the host on.")
    name: str = Field("", description="Short name shown in logs, history and status (default: the address).")
    user: str = Field("deploy", description="SSH user.")
    port: int = Field(22, description="SSH port.")
    key_file: str = Field("", description="Private key file (absolute path); empty: the SSH agent (SSH_AUTH_SOCK).")
    roles: list[str] = Field(["web"], description="web (serves traffic) and/or migrate (the one host that runs the "
                             "migration).")

    @property
    def label(self) -> str:
        return self.name or self.address


HOST_ROLES = ("web", "migrate")


class TargetConfig(dg.Config):
    """Where the service runs and how many instances serve it."""

    kind: DeployTargetKind = Field(DeployTargetKind.pm2, description="pm2 | docker | kubernetes")
    instances: int = Field(2, description="Number of instances (PM2 cluster workers, containers or pods).")
    host: str = Field("127.0.0.1", description="Address the service is reached on.")
    port: int = Field(3100, description="Public port of the service (shared by all instances).")
    public_url: str = Field("", description="URL users reach (default: http://<host>:<port>).")
    standby_s: float = Field(0.0, description="Warm standby window (PM2 target): after a release, the previous "
                             "version's instances leave the front proxy but keep running this long, so a rollback "
                             "inside it is a traffic switch (one nginx reload, about 3-5 s from the first failing "
                             "probe instead of 7-16 s) rather than a redeploy. It costs their memory for the window "
                             "(the example app: about 110 MB RSS per instance; shown in the deploy's metadata and "
                             "`status`), so it is opt-in: 0 (default) stops them at once, as before. 600-1800 covers "
                             "the minutes after a release in which the health watch catches most regressions.")
    pm2: Pm2Config = Field(default_factory=Pm2Config)
    docker: DockerTargetConfig = Field(default_factory=DockerTargetConfig)
    kubernetes: KubernetesTargetConfig = Field(default_factory=KubernetesTargetConfig)
    hosts: list[HostConfig] = Field([], description="The machines the service runs on, over SSH (empty: this machine).")
    known_hosts: str = Field("", description="known_hosts file pinning every host's SSH key (required with hosts; a "
                             "host whose key is not in it is refused, never trusted on first contact).")
    ssh_timeout_s: float = Field(10.0, description="Timeout of an SSH connection (TCP, banner, authentication).")


class GateConfig(dg.Config):
    """Health gate: K consecutive healthy answers reporting the new version, within a deadline."""

    interval_s: float = Field(1.0, description="Pause between probes.")
    request_timeout_s: float = Field(5.0, description="Timeout of one probe.")
    required_successes: int = Field(3, description="K: consecutive healthy answers that report the new version.")
    deadline_s: float = Field(120.0, description="The gate fails if K consecutive successes are not reached by then.")


class ApprovalConfig(dg.Config):
    """A release that waits for a person: it holds before a step until someone promotes or aborts it."""

    required: bool = Field(False, description="Hold the release until the approve_release job promotes or aborts it.")
    before: str = Field("migrate", description="The step it holds before: migrate (nothing irreversible has happened "
                                              "yet; the backup is taken), deploy (the schema is already migrated), or "
                                              "canary-<weight> (e.g. canary-50: at that canary step, once its analysis "
                                              "passed, the canary serving its share; abort = a failed analysis).")
    timeout_s: float = Field(3600.0, description="No decision within this time aborts the release.")


class CanaryStepConfig(dg.Config):
    """One canary step: the new version gets `weight` percent of the requests for at least `pause_s`, then the
    analysis judges it."""

    weight: int = Field(description="Share of the requests the new version gets in this step, in percent (1..99).")
    pause_s: float = Field(30.0, description="How long the step lasts before its analysis (the analysis window).")


class CanaryAnalysisConfig(dg.Config):
    """How a canary step is judged: the canary's requests against the stable version's over the same window."""

    min_requests: int = Field(50, description="Fewer requests than this in either group: inconclusive (the step holds).")
    max_error_rate: float = Field(0.01, description="Highest share of 5xx answers the canary may give (0..1).")
    max_error_rate_increase: float = Field(0.005, description="Highest canary 5xx share minus the stable's (0..1).")
    max_p95_ratio: float = Field(1.5, description="Highest canary p95 latency / stable p95 latency.")
    p95_floor_ms: float = Field(5.0, description="A stable p95 below this counts as this in the ratio (nginx logs "
                                "latency to the millisecond: at 1-2 ms a ratio is noise).")
    max_p95_ms: float = Field(0.0, description="Highest canary p95 latency in ms (0: no absolute limit).")
    max_inconclusive_s: float = Field(120.0, description="How long a step may stay inconclusive past its pause "
                                      "before the release fails as inconclusive.")
    metrics_histogram: str = Field("http_request_duration_seconds", description="The app's request-duration "
                                   "histogram (seconds), read when app.metrics_path is set.")
    metrics_status_label: str = Field("status_code", description="Label of that histogram holding the HTTP status.")


class CanaryConfig(dg.Config):
    """Canary steps judged by real traffic (PM2 target): every new instance starts and must be healthy on its own,
    then the front proxy gives the new version each step's share of the requests; after each step's pause its
    requests are compared with the stable version's. A failed analysis sends all traffic back to the stable version
    at once and fails the release; after the last step the new version gets everything. No steps: no canary."""

    steps: list[CanaryStepConfig] = Field([], description="e.g. [{weight: 10, pause_s: 30}, {weight: 50, pause_s: 30}]: "
                                          "weights strictly increasing, 1..99 (100% is the promotion after the last).")
    analysis: CanaryAnalysisConfig = Field(default_factory=CanaryAnalysisConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.steps)


class ReleaseConfig(dg.Config):
    """One release of one service to one environment."""

    environment: str = Field("local", description="Environment name (lower-case, e.g. local, staging, production).")
    production: bool = Field(False, description="Marks a production environment: stricter checks, no embedded services.")
    version: str = Field("", description="Release version (empty: v<UTC timestamp>-<git short SHA>[-dirty]).")
    embedded_services: bool = Field(
        True,
        description="When DATABASE_URL / REDIS_URL are not set, start the project-local PostgreSQL and Redis.",
    )
    lock_wait_s: float = Field(900.0, description="How long a release waits for another release of the same environment.")
    dependency_timeout_s: float = Field(5.0, description="Timeout for the database and Redis reachability checks.")
    app: AppConfig = Field(default_factory=AppConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="Canary steps judged by real traffic "
                                 "(empty steps: the rolling deploy as usual). PM2 target only for now.")


class SpecError(ValueError):
    """The release spec is invalid; the message lists every problem with the field it concerns."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid release spec ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}")


def _bad_number(value: float, minimum: float, *, strict: bool = False) -> bool:
    """Not a finite number, or below `minimum` (at or below it when `strict`): NaN and inf are refused too."""
    return not math.isfinite(value) or value < minimum or (strict and value == minimum)


def _check_url(value: str, field_name: str, schemes: tuple[str, ...], problems: list[str]) -> None:
    if not value:
        return
    try:
        parts = urlsplit(value)
        # urlsplit drops tabs and newlines and keeps spaces: neither reaches an HTTP client intact
        ok = parts.scheme in schemes and bool(parts.hostname) and not any(c.isspace() or not c.isprintable() for c in value)
        if ok:
            parts.port  # raises on a malformed port
    except ValueError:
        ok = False
    if not ok:
        problems.append(f"{field_name}: malformed URL {value!r} (expected {'/'.join(schemes)}://host[:port]/...)")


def _check_ref(value: str, field_name: str, production: bool, problems: list[str]) -> None:
    if not SECRET_REF.match(value or ""):
        problems.append(f"{field_name}: {value!r} is not a reference (env:NAME, file:/absolute/path or generate); "
                        "secret values are never written in the spec")
    elif value == "generate" and production:
        problems.append(f"{field_name}: 'generate' is not allowed in production (give env:NAME or file:/path)")


def validate_app_environment(app: AppConfig, *, production: bool, problems: list[str]) -> None:
    """The app's variables: names valid, secrets given by reference, no variable set twice, the health check well formed."""
    owners: dict[str, str] = {}

    def claim(name: str, where: str) -> None:
        if not name:
            return
        if not ENV_VAR.match(name):
            problems.append(f"{where}: {name!r} is not a valid environment variable name")
        elif name in owners and owners[name] != where:
            problems.append(f"{where}: {name} is already set by {owners[name]}")
        else:
            owners[name] = where

    for name in app.env:
        claim(name, f"app.env.{name}")
    for name, ref in app.secrets.items():
        claim(name, f"app.secrets.{name}")
        _check_ref(ref, f"app.secrets.{name}", production, problems)
    for name in app.instance_env:
        claim(name, f"app.instance_env.{name}")
    for block, conn in (("database", app.database), ("redis", app.redis)):
        if block == "redis" and not app.redis.enabled:
            continue
        for part in ConnectionVarsConfig.model_fields:
            claim(getattr(conn.app_vars, part), f"app.{block}.app_vars.{part}")
        if not any(getattr(conn.app_vars, part) for part in ("url", "host")):
            problems.append(f"app.{block}.app_vars: name the app's variable for the URL (url) or its parts (host, port, ...)")
        if not SECRET_REF.match(conn.url_from or "") or conn.url_from == "generate":
            problems.append(f"app.{block}.url_from: {conn.url_from!r} must be env:NAME or file:/absolute/path")
    for fname in ("port_env", "instance_port_env", "version_env"):  # set per instance by the target: never twice
        if ENV_VAR.match(getattr(app, fname) or ""):
            claim(getattr(app, fname), f"app.{fname}")
    for name in app.required_env:
        if name in owners:
            problems.append(f"app.required_env: {name} is already set by {owners[name]}")
    _check_backups(app.database, problems)
    for fname in ("embedded_database", "embedded_role"):
        value = getattr(app.database, fname)
        if not re.match(r"^[a-z_][a-z0-9_]{0,62}\Z", value or ""):
            problems.append(f"app.database.{fname}: {value!r} must be a lower-case PostgreSQL name (letters, digits, _)")
    if not (0 <= app.redis.embedded_db <= 15):
        problems.append(f"app.redis.embedded_db: must be between 0 and 15 (got {app.redis.embedded_db})")
    if not VERSION_CHECK.match(app.health_version or ""):
        problems.append(f"app.health_version: {app.health_version!r} must be json:<field.path>, header:<Name> or off")
    if not app.port_env:
        problems.append("app.port_env: required (the variable through which the app learns its port)")
    if app.start_dir and (app.start_dir.startswith("/") or ".." in Path(app.start_dir).parts):
        problems.append(f"app.start_dir: {app.start_dir!r} must be a relative path inside the bundle")
    for name, value in app.instance_env.items():
        try:
            value.format(slot=0, port=0, instance_dir="")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # {slot.x}, {port[0]}
            problems.append(f"app.instance_env.{name}: unknown placeholder {exc} (use {{slot}}, {{port}}, {{instance_dir}})")


def validate_release_config(cfg: ReleaseConfig, *, check_paths: bool = True) -> list[str]:
    """Every problem in the config, each naming its field. Empty list: valid."""
    problems: list[str] = []
    _check_release(cfg, problems)
    _check_app(cfg, check_paths, problems)
    _check_target(cfg.target, cfg.app, problems)
    _check_hosts(cfg.target, check_paths, problems)
    if check_paths and cfg.target.kind == DeployTargetKind.pm2 and ENV_NAME.match(cfg.environment or ""):
        _check_pm2_home(cfg, problems)  # where this machine keeps the environment: not a property of a recorded spec
    _check_gate(cfg.gate, problems)
    _check_canary(cfg, problems)
    return problems


def _check_canary(cfg: ReleaseConfig, problems: list[str]) -> None:
    c = cfg.canary
    if not c.enabled:
        return
    if cfg.target.kind != DeployTargetKind.pm2:
        problems.append(f"canary: not supported on the {cfg.target.kind.value} target yet (PM2 only); remove "
                        "canary.steps to release with a rolling deploy")
    previous = 0
    for i, step in enumerate(c.steps):
        if not (1 <= step.weight <= 99):
            problems.append(f"canary.steps[{i}].weight: must be between 1 and 99 (got {step.weight}; 100 is the "
                            "promotion after the last step)")
        elif step.weight <= previous:
            problems.append(f"canary.steps[{i}].weight: weights must increase strictly ({step.weight} after {previous})")
        previous = max(previous, step.weight)
        if _bad_number(step.pause_s, 0, strict=True):
            problems.append(f"canary.steps[{i}].pause_s: must be > 0 (got {step.pause_s})")
    a = c.analysis
    if a.min_requests < 1:
        problems.append(f"canary.analysis.min_requests: must be >= 1 (got {a.min_requests})")
    for fname in ("max_error_rate", "max_error_rate_increase"):
        value = getattr(a, fname)
        if _bad_number(value, 0) or value > 1:
            problems.append(f"canary.analysis.{fname}: must be a share between 0 and 1 (got {value})")
    if _bad_number(a.max_p95_ratio, 1):
        problems.append(f"canary.analysis.max_p95_ratio: must be >= 1 (got {a.max_p95_ratio})")
    for fname in ("p95_floor_ms", "max_p95_ms", "max_inconclusive_s"):
        if _bad_number(getattr(a, fname), 0):
            problems.append(f"canary.analysis.{fname}: must be >= 0 (got {getattr(a, fname)})")
    if cfg.app.metrics_path and (not cfg.app.metrics_path.startswith("/")
                                 or any(ch.isspace() or not ch.isprintable() for ch in cfg.app.metrics_path)):
        problems.append(f"app.metrics_path: must start with '/' and hold no spaces (got {cfg.app.metrics_path!r})")
    for fname in ("metrics_histogram", "metrics_status_label"):
        if not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*\Z", getattr(a, fname) or ""):
            problems.append(f"canary.analysis.{fname}: {getattr(a, fname)!r} is not a Prometheus name")


def _check_hosts(t: TargetConfig, check_paths: bool, problems: list[str]) -> None:
    if not t.hosts:
        return
    if not t.known_hosts:
        problems.append("target.known_hosts: required with target.hosts (a known_hosts file pinning every host's key; "
                        "get a key with `ssh-keyscan -p PORT ADDRESS` and check its fingerprint out of band)")
    elif check_paths and not paths.resolve(t.known_hosts).is_file():
        problems.append(f"target.known_hosts: {t.known_hosts!r} is not a file")
    if _bad_number(t.ssh_timeout_s, 0, strict=True):
        problems.append(f"target.ssh_timeout_s: must be > 0 (got {t.ssh_timeout_s})")
    seen: dict[tuple[str, int], int] = {}
    labels: dict[str, int] = {}
    for n, h in enumerate(t.hosts):
        where = f"target.hosts[{n}]"
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}\Z", h.address or ""):
            problems.append(f"{where}.address: {h.address!r} is not a host name or IP address")
        if not re.match(r"^[a-z_][a-z0-9_-]{0,31}\Z", h.user or ""):
            problems.append(f"{where}.user: {h.user!r} is not a user name")
        if not (1 <= h.port <= 65535):
            problems.append(f"{where}.port: must be between 1 and 65535 (got {h.port})")
        if h.key_file and not h.key_file.startswith("/"):
            problems.append(f"{where}.key_file: {h.key_file!r} must be an absolute path")
        elif h.key_file and check_paths and not Path(h.key_file).is_file():
            problems.append(f"{where}.key_file: {h.key_file!r} is not a file")
        unknown = sorted(set(h.roles) - set(HOST_ROLES))
        if unknown or not h.roles:
            problems.append(f"{where}.roles: {h.roles} (known roles: {', '.join(HOST_ROLES)}; at least one)")
        if (h.address, h.port) in seen:
            problems.append(f"{where}: {h.address}:{h.port} is listed twice (also target.hosts[{seen[h.address, h.port]}])")
        seen.setdefault((h.address, h.port), n)
        if h.label in labels:
            problems.append(f"{where}.name: {h.label!r} names two hosts (also target.hosts[{labels[h.label]}])")
        labels.setdefault(h.label, n)
    if not any("web" in h.roles for h in t.hosts):
        problems.append("target.hosts: no host has the web role (nothing would serve)")
    migrate = [h.label for h in t.hosts if "migrate" in h.roles]
    if len(migrate) > 1:
        problems.append(f"target.hosts: the migrate role is on {len(migrate)} hosts ({', '.join(migrate)}); the "
                        "migration runs once, on one host")


UNIX_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def _check_pm2_home(cfg: ReleaseConfig, problems: list[str]) -> None:
    """PM2 talks to its daemon over Unix sockets in PM2_HOME; past 107 bytes the daemon cannot bind them and every
    `pm2` command hangs while the daemon spins (seen with a deep state folder). Refused before anything starts."""
    home = Path(cfg.target.pm2.home) if cfg.target.pm2.home else paths.environment_dir(cfg.environment) / "pm2"
    longest = home / "interactor.sock"
    if len(os.fsencode(longest)) > UNIX_SOCKET_PATH_MAX:
        field = "target.pm2.home" if cfg.target.pm2.home else "the state folder (OPS_STATE_DIR)"
        problems.append(f"{field}: PM2's socket {longest} would be {len(os.fsencode(longest))} bytes, over the "
                        f"{UNIX_SOCKET_PATH_MAX}-byte limit of a Unix socket path; use a shorter folder")


def _check_release(cfg: ReleaseConfig, problems: list[str]) -> None:
    if not ENV_NAME.match(cfg.environment or ""):
        problems.append(
            f"environment: {cfg.environment!r} is not a valid environment name (lower-case letters, digits, '-'; starts with a letter)"
        )
    if cfg.version and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}\Z", cfg.version):
        problems.append(f"version: {cfg.version!r} may only contain letters, digits, '.', '_', '+', '-'")
    if cfg.production and cfg.embedded_services:
        problems.append("embedded_services: must be false in a production environment (it would release against a throw-away database)")
    if _bad_number(cfg.lock_wait_s, 0):
        problems.append(f"lock_wait_s: must be >= 0 (got {cfg.lock_wait_s})")
    if _bad_number(cfg.dependency_timeout_s, 0, strict=True):
        problems.append(f"dependency_timeout_s: must be > 0 (got {cfg.dependency_timeout_s})")
    stages = ["migrate", "deploy", *(f"canary-{s.weight}" for s in cfg.canary.steps)]
    if cfg.approval.before not in stages:
        hint = "; canary-<weight> names a step of canary.steps" if cfg.approval.before.startswith("canary-") else ""
        problems.append(f"approval.before: must be {', '.join(stages[:-1])} or {stages[-1]} "
                        f"(got {cfg.approval.before!r}{hint})")
    if _bad_number(cfg.approval.timeout_s, 0, strict=True):
        problems.append(f"approval.timeout_s: must be > 0 (got {cfg.approval.timeout_s})")


def _check_backups(db: DatabaseConfig, problems: list[str]) -> None:
    if db.backups not in ("dump", "archive"):
        problems.append(f"app.database.backups: must be dump or archive (got {db.backups!r})")
    for fname in ("admin_url_from", "cipher_key_from"):
        ref = getattr(db.archive, fname)
        if ref and (not SECRET_REF.match(ref) or ref == "generate"):
            problems.append(f"app.database.archive.{fname}: {ref!r} must be env:NAME or file:/absolute/path")
    if db.archive.repo_dir and not db.archive.repo_dir.startswith("/"):
        problems.append(f"app.database.archive.repo_dir: {db.archive.repo_dir!r} must be an absolute path")
    if not 1 <= db.archive.retention_full <= 100:
        problems.append(f"app.database.archive.retention_full: must be between 1 and 100 (got {db.archive.retention_full})")
    if not 1 <= db.archive.archive_timeout_s <= 3600:
        problems.append(f"app.database.archive.archive_timeout_s: must be between 1 and 3600 (got {db.archive.archive_timeout_s})")


def _check_app(cfg: ReleaseConfig, check_paths: bool, problems: list[str]) -> None:
    app = cfg.app
    if not re.match(r"^[a-z0-9][a-z0-9-]{0,39}\Z", app.name or ""):
        problems.append(f"app.name: {app.name!r} must be lower-case letters, digits and '-'")
    app_dir = None
    if check_paths:
        try:
            app_dir = paths.resolve(app.path)
        except ValueError:  # a NUL character or a lone surrogate
            problems.append(f"app.path: {app.path!r} is not a usable path")
        if app_dir is None:
            pass
        elif not app_dir.is_dir():
            problems.append(f"app.path: app folder {str(app_dir)!r} does not exist")
        elif not (app_dir / "package.json").is_file():
            problems.append(f"app.path: {str(app_dir)!r} has no package.json")
    for fname in ("required_env", "secret_env"):
        for name in getattr(app, fname):
            if not ENV_VAR.match(name):
                problems.append(f"app.{fname}: {name!r} is not a valid environment variable name")
    for fname in ("jwt_secret_env", "node_env_var", "version_env", "port_env", "instance_port_env"):
        value = getattr(app, fname)
        if value and not ENV_VAR.match(value):
            problems.append(f"app.{fname}: {value!r} is not a valid environment variable name")
    validate_app_environment(app, production=cfg.production, problems=problems)
    if not app.health_path.startswith("/") or any(c.isspace() or not c.isprintable() for c in app.health_path):
        problems.append(f"app.health_path: must start with '/' and hold no spaces or control characters (got {app.health_path!r})")
    if app.min_secret_length < 1:
        problems.append(f"app.min_secret_length: must be >= 1 (got {app.min_secret_length})")
    if _bad_number(app.commands.timeout_s, 0, strict=True):
        problems.append(f"app.commands.timeout_s: must be > 0 (got {app.commands.timeout_s})")
    for fname in ("migration_lock_timeout_s", "migration_statement_timeout_s"):
        if _bad_number(getattr(app, fname), 0, strict=True):
            problems.append(f"app.{fname}: must be > 0 (got {getattr(app, fname)})")
    if _bad_number(app.shutdown_timeout_s, 0):
        problems.append(f"app.shutdown_timeout_s: must be >= 0 (got {app.shutdown_timeout_s})")
    entry = PurePosixPath(app.entrypoint or ".")
    if not app.start and (entry.is_absolute() or ".." in entry.parts or not app.entrypoint.strip()):
        problems.append(f"app.entrypoint: {app.entrypoint!r} must be a path inside the app folder (or set app.start)")
    if not app.commands.migrate.strip():
        problems.append("app.commands.migrate: must not be empty (use a no-op command such as 'true' for apps without a database schema)")
    problems += commands_problems(app, app_dir)


def _check_target(t: TargetConfig, app: AppConfig, problems: list[str]) -> None:
    if t.instances < 1:
        problems.append(f"target.instances: must be >= 1 (got {t.instances})")
    elif t.instances > 64:
        problems.append(f"target.instances: at most 64 (got {t.instances})")
    if not (1 <= t.port <= 65535):
        problems.append(f"target.port: must be between 1 and 65535 (got {t.port})")
    if not re.match(r"^[A-Za-z0-9._-]+\Z", t.host or ""):  # it goes into nginx's listen directive and URLs
        problems.append(f"target.host: {t.host!r} is not a host name or address")
    _check_url(t.public_url, "target.public_url", ("http", "https"), problems)
    if _bad_number(t.standby_s, 0):
        problems.append(f"target.standby_s: must be >= 0, 0 for no standby (got {t.standby_s})")
    elif t.standby_s and t.kind != DeployTargetKind.pm2:
        problems.append(f"target.standby_s: a warm standby is built for the pm2 target only so far, not {t.kind.value} "
                        "(set 0: a rollback redeploys)")
    if t.kind == DeployTargetKind.pm2:
        if t.pm2.keep_releases < 2:
            problems.append(f"target.pm2.keep_releases: must be >= 2 to keep a rollback target (got {t.pm2.keep_releases})")
        if _bad_number(t.pm2.kill_timeout_s, 0, strict=True) or (
                not _bad_number(app.shutdown_timeout_s, 0) and t.pm2.kill_timeout_s <= app.shutdown_timeout_s):
            problems.append(
                f"target.pm2.kill_timeout_s: must exceed app.shutdown_timeout_s ({app.shutdown_timeout_s}) or in-flight requests are cut"
            )
        if _bad_number(t.pm2.drain_s, 0):
            problems.append(f"target.pm2.drain_s: must be >= 0 (got {t.pm2.drain_s})")
        if not re.match(r"^[1-9][0-9]*[KMG]?\Z", t.pm2.max_memory_restart or ""):
            problems.append(f"target.pm2.max_memory_restart: {t.pm2.max_memory_restart!r} is not a size such as 500M, 2G")
        if _bad_number(t.pm2.listen_timeout_s, 0, strict=True):
            problems.append(f"target.pm2.listen_timeout_s: must be > 0 (got {t.pm2.listen_timeout_s})")
    if t.kind == DeployTargetKind.docker:
        bad_names = [n for n in t.docker.env_file_vars if not ENV_VAR.match(n)]
        if bad_names:
            problems.append(f"target.docker.env_file_vars: not variable names: {', '.join(map(repr, bad_names))}")
        if _bad_number(t.docker.drain_s, 0):
            problems.append(f"target.docker.drain_s: must be >= 0 (got {t.docker.drain_s})")
        if _bad_number(t.docker.start_timeout_s, 0):
            problems.append(f"target.docker.start_timeout_s: must be >= 0, 0 for the gate's deadline (got {t.docker.start_timeout_s})")
        if not (1 <= t.docker.container_port <= 65535):
            problems.append(f"target.docker.container_port: must be between 1 and 65535 (got {t.docker.container_port})")
    if t.kind == DeployTargetKind.kubernetes:
        k = t.kubernetes
        _check_url(k.api_server, "target.kubernetes.api_server", ("http", "https"), problems)
        for fname in ("namespace", "deployment", "container"):
            if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z", getattr(k, fname) or ""):
                problems.append(f"target.kubernetes.{fname}: {getattr(k, fname)!r} is not a valid Kubernetes name")
        if not k.image_repository:
            problems.append("target.kubernetes.image_repository: required for the kubernetes target (the cluster pulls from it)")
        if _bad_number(k.progress_deadline_s, 0, strict=True):
            problems.append(f"target.kubernetes.progress_deadline_s: must be > 0 (got {k.progress_deadline_s})")


def _check_gate(g: GateConfig, problems: list[str]) -> None:
    if _bad_number(g.interval_s, 0, strict=True):
        problems.append(f"gate.interval_s: must be > 0 (got {g.interval_s})")
    if _bad_number(g.request_timeout_s, 0, strict=True):
        problems.append(f"gate.request_timeout_s: must be > 0 (got {g.request_timeout_s})")
    if g.required_successes < 1:
        problems.append(f"gate.required_successes: must be >= 1 (got {g.required_successes})")
    if _bad_number(g.deadline_s, 0, strict=True):
        problems.append(f"gate.deadline_s: must be > 0 (got {g.deadline_s})")
    elif g.required_successes >= 1 and not _bad_number(g.interval_s, 0, strict=True) and (g.required_successes - 1) * g.interval_s >= g.deadline_s:
        problems.append(
            f"gate.required_successes: {g.required_successes} probes {g.interval_s} s apart need "
            f"{(g.required_successes - 1) * g.interval_s:.1f} s, more than gate.deadline_s ({g.deadline_s} s)"
        )


def _known_fields(model: type[dg.Config], data: dict) -> dict:
    out = {}
    for name, value in data.items():
        info = model.model_fields.get(name)
        if info is None:
            continue
        sub = info.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, dg.Config):
            value = _known_fields(sub, value)
        out[name] = value
    return out


@dataclass(frozen=True)
class ReleaseSpec:
    """A validated release: the config plus what was derived from it. Passed from op to op."""

    config: ReleaseConfig
    version: str
    app_dir: str
    commit: str = ""
    dirty: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def environment(self) -> str:
        return self.config.environment

    @property
    def app(self) -> AppConfig:
        return self.config.app

    @property
    def target(self) -> TargetConfig:
        return self.config.target

    @property
    def gate(self) -> GateConfig:
        return self.config.gate

    @property
    def public_url(self) -> str:
        t = self.config.target
        return t.public_url or f"http://{t.host}:{t.port}"

    @property
    def health_url(self) -> str:
        return self.public_url.rstrip("/") + self.config.app.health_path

    def env_dir(self) -> Path:
        return paths.environment_dir(self.environment)

    def to_json(self) -> dict:
        return {
            "config": json.loads(self.config.model_dump_json()),
            "version": self.version,
            "app_dir": self.app_dir,
            "commit": self.commit,
            "dirty": self.dirty,
        }

    @classmethod
    def from_json(cls, data: dict, *, version: Optional[str] = None, validate: bool = True) -> "ReleaseSpec":
        """A recorded spec back (fields that a newer ops-pipeline no longer has are dropped; new ones get defaults),
        validated like a new one except for paths (an old release's folder may be gone): `SpecError` names every
        problem. `validate=False` only for a spec the same run already validated (the rollback plan's)."""
        try:
            config = ReleaseConfig(**_known_fields(ReleaseConfig, data["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError([f"recorded spec: unreadable ({type(exc).__name__}: {str(exc)[:300]})"]) from None
        if validate and (problems := validate_release_config(config, check_paths=False)):
            raise SpecError([f"recorded spec: {p}" for p in problems])
        return cls(
            config=config,
            version=version or data.get("version", ""),
            app_dir=data.get("app_dir", ""),
            commit=data.get("commit", ""),
            dirty=bool(data.get("dirty", False)),
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m ops_pipeline.platform.spec FILE`: check a release spec (run config YAML) without side effects."""
    import sys

    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ops_pipeline.platform.spec <release spec .yaml>", file=sys.stderr)
        return 2
    try:
        data = yaml.safe_load(Path(args[0]).read_text())
        config = ReleaseConfig(**data["ops"]["verify_env"]["config"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        print(f"{args[0]}: not a release spec ({type(exc).__name__}: {exc}); expected ops.verify_env.config", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic: a field of the wrong type
        print(f"{args[0]}: {exc}", file=sys.stderr)
        return 2
    problems = validate_release_config(config)
    if problems:
        print(f"{args[0]}: {SpecError(problems)}", file=sys.stderr)
        return 1
    print(f"{args[0]}: valid release spec of {config.app.name} to {config.environment} ({config.target.kind.value})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
