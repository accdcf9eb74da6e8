"""docker-compose.yml + docker/: static checks (no engine needed) and one bring-up through Podman.

Static: `docker-compose config -q` (Debian's docker-compose 1.29.2, which validates against its compose schema),
dagster's instance schema and the config schemas of the configured classes, and the
invariants that tie the files together (location names, network and volume names, env vars, image names, pins).

Bring-up (`-m containers`, a few minutes): builds local stand-in base images (no registry is reachable here),
builds and starts the stack with `docker-compose up -d` against Podman's Docker API, waits for the webservers and the
daemon through the UI proxy (401 without a user, the viewer's launch refused), launches `backup` runs as an operator
through the proxy, the queue and the DockerRunLauncher, checks that each ran in its own container and that the
per-environment limit serialised them, then `docker-compose down -v`.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from ops_pipeline.platform.local_stack import free_port
from tests.compose.conftest import ROOT, run_script, tail

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "docker"
INSTANCE_YAML = DOCKER_DIR / "dagster.yaml"
WORKSPACE_YAML = DOCKER_DIR / "workspace.yaml"
DOCKERFILE_DAGSTER = DOCKER_DIR / "Dockerfile_dagster"
DOCKERFILE_USER_CODE = DOCKER_DIR / "Dockerfile_user_code"
PROXY_DIR = DOCKER_DIR / "proxy"
USER_CODE_IGNORE = DOCKER_DIR / "Dockerfile_user_code.dockerignore"
DAGSTER_SERVICES = ("user_code", "webserver", "webserver_readonly", "daemon")
WEBSERVERS = ("webserver", "webserver_readonly")
PROJECT = "opscomposetest"


# --------------------------------------------------------------------------------------------- helpers

def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def instance_config() -> dict:
    return yaml.safe_load(INSTANCE_YAML.read_text())


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def env_refs(node) -> set[str]:
    """Names of every `{env: NAME}` in a dagster.yaml tree."""
    found: set[str] = set()
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            found.add(node["env"])
        for value in node.values():
            found |= env_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= env_refs(value)
    return found


def launcher_env_names() -> set[str]:
    """Bare names under run_launcher.config.env_vars (copied from the launching process's environment)."""
    names = instance_config()["run_launcher"]["config"].get("env_vars") or []
    return {n for n in names if "=" not in n}


def dockerfile_cmd(path: Path) -> list[str]:
    cmds = [line for line in path.read_text().splitlines() if line.startswith("CMD ")]
    assert len(cmds) == 1, f"{path.name}: expected one CMD line, found {cmds}"
    return json.loads(cmds[0][4:])


def option(argv: list[str], *names: str) -> str:
    for i, arg in enumerate(argv):
        if arg in names:
            return argv[i + 1]
    raise AssertionError(f"none of {names} in {argv}")


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.+\-]*)\s*", dep)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def dockerfile_pins(path: Path) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2)
            for m in re.finditer(r"[\"']?(dagster[a-z\-]*)==([0-9][0-9A-Za-z.+\-]*)", path.read_text())}


def interpolate_defaults(value: str) -> str:
    """The value docker compose gives `${VAR:-default}` / `${VAR-default}` / `${VAR}` with an empty environment."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", value)
    return value.replace("$$", "$")


# ------------------------------------------------------------------------------------ static checks (CI)

def test_docker_compose_config_passes():
    """`docker-compose -f docker-compose.yml config -q` (Debian's docker-compose 1.29.2) accepts the file."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); the JSON-schema test still runs")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, f"docker-compose config -q failed:\n{proc.stdout}\n{proc.stderr}"
    # and the resolved view has what the rest of the stack relies on
    resolved = yaml.safe_load(subprocess.run([binary, "-f", str(COMPOSE_FILE), "config"], capture_output=True,
                                             text=True, env=env, cwd=ROOT, timeout=120, check=True).stdout)
    assert resolved["networks"]["ops_pipeline_network"]["name"] == "ops_pipeline_network"
    assert resolved["services"]["daemon"]["depends_on"]["user_code"]["condition"] == "service_healthy"


def test_docker_compose_v2_config_passes_if_installed():
    """`docker compose config -q` too, where the compose v2 plugin exists (not on this machine)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        check=False).returncode != 0:
        pytest.skip("the docker compose v2 plugin is not installed here; docker-compose 1.29 checks the file")
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_location_names_match():
    """docker/workspace.yaml, the code server's --location-name, the root workspace.yaml and pyproject agree (P6)."""
    services = compose()["services"]
    (entry,) = yaml.safe_load(WORKSPACE_YAML.read_text())["load_from"]
    grpc = entry["grpc_server"]
    argv = services["user_code"].get("command") or dockerfile_cmd(DOCKERFILE_USER_CODE)
    assert argv[:3] == ["dagster", "code-server", "start"]
    assert grpc["location_name"] == option(argv, "--location-name") == "ops_pipeline"
    assert grpc["host"] == "user_code" and "user_code" in services
    assert int(grpc["port"]) == int(option(argv, "-p", "--port"))
    assert option(argv, "-h", "--host") == "0.0.0.0"
    assert option(argv, "-m", "--module-name") == "ops_pipeline.definitions"
    (root_entry,) = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    assert root_entry["python_module"]["location_name"] == grpc["location_name"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["dagster"]["code_location_name"] == grpc["location_name"]
    assert pyproject["tool"]["dagster"]["module_name"] == option(argv, "-m", "--module-name")
    # webservers and daemon load exactly this workspace file
    for name in (*WEBSERVERS, "daemon"):
        assert option(services[name]["entrypoint"], "-w", "--workspace") == "workspace.yaml"
    assert "COPY dagster.yaml workspace.yaml /opt/dagster/dagster_home/" in DOCKERFILE_DAGSTER.read_text()


def test_run_launcher_network_is_the_compose_network():
    doc = compose()
    launcher = instance_config()["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    network = launcher["config"]["network"]
    real_names = {key: (spec or {}).get("name", f"<project>_{key}") for key, spec in doc["networks"].items()}
    assert network in real_names.values(), f"run_launcher network {network!r} is none of the compose networks' real " \
                                           f"names {real_names} (set `name:` so compose does not prefix it)"
    key = next(k for k, v in real_names.items() if v == network)
    for name, service in doc["services"].items():
        assert key in (service.get("networks") or []), f"service {name} is not on {key}"


def test_every_env_var_of_the_instance_reaches_daemon_and_webserver():
    """Every `env:` of docker/dagster.yaml and every bare run_launcher env_vars name is set for daemon + webserver."""
    services = compose()["services"]
    needed = env_refs(instance_config()) | launcher_env_names()
    assert {"DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD",
            "DAGSTER_POSTGRES_DB"} <= needed
    for name in ("daemon", *WEBSERVERS):
        missing = sorted(needed - set(service_env(services[name])))
        assert not missing, f"{name} lacks {missing}: the launch fails with 'Tried to load environment variable'"
    # the run containers get the storage credentials (the instance ref they receive refers to them, P8)
    assert env_refs(instance_config()["storage"]) <= launcher_env_names()
    # the app settings that ops_pipeline reads are passed on to runs
    assert {"DATABASE_URL", "REDIS_URL", "JWT_SECRET", "OPS_BACKUP_STORE", "OPS_BACKUP_DIR"} <= launcher_env_names()
    # dagster_postgres is initialised with the same credentials the instance uses
    pg = service_env(services["dagster_postgres"])
    dagster_env = service_env(services["daemon"])
    assert pg["POSTGRES_USER"] == dagster_env["DAGSTER_POSTGRES_USER"]
    assert pg["POSTGRES_PASSWORD"] == dagster_env["DAGSTER_POSTGRES_PASSWORD"]
    assert pg["POSTGRES_DB"] == dagster_env["DAGSTER_POSTGRES_DB"]
    assert dagster_env["DAGSTER_POSTGRES_HOST"] == "dagster_postgres"


def test_app_services_and_their_urls_agree():
    services = compose()["services"]
    env = {k: interpolate_defaults(v) for k, v in service_env(services["daemon"]).items()}
    app_pg = {k: interpolate_defaults(v) for k, v in service_env(services["app_postgres"]).items()}
    assert env["DATABASE_URL"] == (f"postgresql://{app_pg['POSTGRES_USER']}:{app_pg['POSTGRES_PASSWORD']}"
                                   f"@app_postgres:5432/{app_pg['POSTGRES_DB']}")
    redis_password = interpolate_defaults(service_env(services["app_redis"])["REDISCLI_AUTH"])
    command = [interpolate_defaults(c) for c in services["app_redis"]["command"]]
    assert option(command, "--requirepass") == redis_password
    assert env["REDIS_URL"] == f"redis://:{redis_password}@app_redis:6379/0"
    # passwords are overridable from the environment; the defaults are marked as local-only
    for service, key in (("dagster_postgres", "POSTGRES_PASSWORD"), ("app_postgres", "POSTGRES_PASSWORD"),
                         ("app_redis", "REDISCLI_AUTH")):
        raw = service_env(services[service])[key]
        assert raw.startswith("${") and "local-only" in raw, f"{service}.{key} must come from the environment: {raw}"
    assert "local-only" in service_env(services["daemon"])["JWT_SECRET"]


def test_images_base_images_and_current_image():
    services = compose()["services"]
    user_code = services["user_code"]
    # DAGSTER_CURRENT_IMAGE is the user-code image itself: runs start in it
    assert service_env(user_code)["DAGSTER_CURRENT_IMAGE"] == user_code["image"]
    assert user_code["build"]["dockerfile"] == "docker/Dockerfile_user_code" and user_code["build"]["context"] == "."
    # webservers and daemon share one image built from docker/Dockerfile_dagster
    for name in WEBSERVERS:
        assert services[name]["image"] == services["daemon"]["image"]
        assert services[name]["build"] == services["daemon"]["build"]
    assert services["webserver"]["build"]["dockerfile"] == "Dockerfile_dagster"
    # base images: the real ones by default, overridable (local stand-ins on machines without a registry)
    for name in DAGSTER_SERVICES:
        assert services[name]["build"]["args"]["PYTHON_BASE_IMAGE"] == "${PYTHON_BASE_IMAGE:-python:3.11-slim}"
    for path in (DOCKERFILE_DAGSTER, DOCKERFILE_USER_CODE):
        text = path.read_text()
        assert "ARG PYTHON_BASE_IMAGE=python:3.11-slim" in text and "FROM ${PYTHON_BASE_IMAGE}" in text
    for name in ("dagster_postgres", "app_postgres"):
        assert services[name]["image"] == "${POSTGRES_IMAGE:-postgres:16-alpine}"
    assert services["app_redis"]["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    # CMD (not ENTRYPOINT) in the run image: the launcher replaces the command to execute runs
    assert not [line for line in DOCKERFILE_USER_CODE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert "entrypoint" not in user_code and "command" not in user_code


def test_dagster_pins_in_dockerfiles_equal_pyproject():
    """Exact pins everywhere (P14): the same dagster/library versions in pyproject.toml and both Dockerfiles."""
    pins = pyproject_pins()
    assert {"dagster", "dagster-webserver", "dagster-graphql", "dagster-postgres", "dagster-docker"} <= set(pins)
    dagster_pins = dockerfile_pins(DOCKERFILE_DAGSTER)
    assert set(dagster_pins) >= {"dagster", "dagster-webserver", "dagster-graphql", "dagster-postgres", "dagster-docker"}
    for path in (DOCKERFILE_DAGSTER, DOCKERFILE_USER_CODE):
        for package, version in dockerfile_pins(path).items():
            assert pins.get(package) == version, f"{path.name} pins {package}=={version}, pyproject.toml has " \
                                                 f"{pins.get(package)}"
    # every dagster package that Dockerfile_dagster installs is pinned, none is left to the resolver
    for line in DOCKERFILE_DAGSTER.read_text().splitlines():
        for package in re.findall(r"\"(dagster[a-z\-]*)[^\"]*\"", line):
            assert f'"{package}==' in line, f"unpinned {package} in Dockerfile_dagster: {line.strip()}"
    # the user-code image installs the project itself, i.e. pyproject's pins
    user_code = DOCKERFILE_USER_CODE.read_text()
    assert "COPY pyproject.toml ./" in user_code and "pip install --no-cache-dir ." in user_code


def test_user_code_build_context_filter_keeps_what_the_dockerfile_copies():
    """BuildKit reads docker/Dockerfile_user_code.dockerignore; everything the Dockerfile COPYs must pass it."""
    allowed = [line[1:].rstrip("/") for line in USER_CODE_IGNORE.read_text().splitlines() if line.startswith("!")]
    sources = []
    for line in DOCKERFILE_USER_CODE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    assert sources, "no COPY in Dockerfile_user_code?"
    for src in sources:
        assert src.rstrip("/") in allowed, f"COPY {src} is excluded by {USER_CODE_IGNORE.name} ({allowed})"
        assert (ROOT / src).exists(), src


def test_volumes_shared_with_run_containers():
    doc = compose()
    config = instance_config()
    services = doc["services"]
    real = {key: (spec or {}).get("name") for key, spec in doc["volumes"].items()}
    mounts = dict(v.split(":")[:2] for v in config["run_launcher"]["config"]["container_kwargs"]["volumes"])
    backup_dir = service_env(services["daemon"])["OPS_BACKUP_DIR"]
    # the launcher refers to compose volumes by their fixed real names
    for volume in mounts:
        assert volume in real.values(), f"container_kwargs volume {volume} is not a compose volume with a fixed name"
    key_of = {v: k for k, v in real.items()}
    assert mounts["ops_pipeline_backups"] == backup_dir
    assert f"{key_of['ops_pipeline_backups']}:{backup_dir}" in services["user_code"]["volumes"]
    # compute logs: written by run containers, read by the webserver
    base_dir = config["compute_logs"]["config"]["base_dir"]
    assert mounts["ops_pipeline_compute_logs"] == base_dir
    for name in WEBSERVERS:
        assert f"{key_of['ops_pipeline_compute_logs']}:{base_dir}" in services[name]["volumes"]
    # both databases keep their data in volumes
    for name in ("dagster_postgres", "app_postgres"):
        assert any(v.endswith(":/var/lib/postgresql/data") for v in services[name]["volumes"])
    # daemon (launches runs) and webserver (terminates them) reach the engine
    for name in ("daemon", "webserver"):
        assert "${DOCKER_SOCKET:-/var/run/docker.sock}:/var/run/docker.sock" in services[name]["volumes"]
    # the viewers' webserver terminates nothing: no engine socket
    assert not [v for v in services["webserver_readonly"]["volumes"] if "docker.sock" in v]


def test_healthchecks_and_dependency_conditions():
    services = compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        test = service["healthcheck"]["test"]
        # Podman 4.3's Docker API splits CMD array items at spaces: keep those in CMD-SHELL strings
        if test[0] == "CMD":
            assert all(" " not in arg for arg in test[1:]), f"{name}: CMD healthcheck argument with a space: {test}"
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert spec["condition"] in ("service_healthy", "service_started", "service_completed_successfully")
            if spec["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{name} waits for {dependency}'s health, it has none"
    for name in (*WEBSERVERS, "daemon"):
        assert services[name]["depends_on"]["dagster_postgres"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["user_code"]["condition"] == "service_healthy"
    assert services["user_code"]["restart"] == "always"


def test_only_the_ui_proxy_is_published_and_routes_to_both_webservers():
    """The webservers are reachable through ui_proxy only; it sends operators to the launching one, viewers to the
    --read-only one (what those do is tested with real processes in tests/e2e/test_ui_auth.py and below)."""
    doc = compose()
    services = doc["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"ui_proxy"}, f"published services: {published} (the webservers have no login of their own)"
    (port,) = services["ui_proxy"]["ports"]
    bind, _, target = interpolate_defaults(port).rpartition(":")
    assert bind.startswith("127.0.0.1:") and target == "8080", port
    assert "--read-only" in services["webserver_readonly"]["entrypoint"]
    assert "--read-only" not in services["webserver"]["entrypoint"]
    env = service_env(services["ui_proxy"])
    for key, name in (("OPS_UI_OPERATOR_UPSTREAM", "webserver"), ("OPS_UI_VIEWER_UPSTREAM", "webserver_readonly")):
        host, _, upstream_port = env[key].partition(":")
        assert host == name and upstream_port == option(services[name]["entrypoint"], "-p", "--port"), (key, env[key])
    # the users come as secrets from files outside the repository's tracked files, never inline
    assert set(services["ui_proxy"]["secrets"]) == {"ui_operators", "ui_viewers"}
    for secret, var in (("ui_operators", "OPS_UI_OPERATORS_HTPASSWD"), ("ui_viewers", "OPS_UI_VIEWERS_HTPASSWD")):
        assert doc["secrets"][secret]["file"].startswith("${" + var + ":-./docker/proxy/users/")
        assert env[f"OPS_UI_{secret.removeprefix('ui_').upper()}_FILE"] == f"/run/secrets/{secret}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/proxy/users/operators.htpasswd"], cwd=ROOT,
                             check=False).returncode
    assert ignored == 0, "docker/proxy/users/ must be git-ignored (it holds the password hashes)"
    for name in WEBSERVERS:
        assert services["ui_proxy"]["depends_on"][name]["condition"] == "service_healthy"
    # the proxy's image: Debian's nginx on a base image that local stand-ins can replace
    assert services["ui_proxy"]["build"]["args"]["DEBIAN_BASE_IMAGE"] == "${DEBIAN_BASE_IMAGE:-debian:bookworm-slim}"
    text = (PROXY_DIR / "Dockerfile").read_text()
    assert "ARG DEBIAN_BASE_IMAGE=debian:bookworm-slim" in text and "FROM ${DEBIAN_BASE_IMAGE}" in text


def test_telemetry_is_off():
    assert instance_config()["telemetry"] == {"enabled": False}
    for name in DAGSTER_SERVICES:
        assert service_env(compose()["services"][name])["DAGSTER_DISABLE_TELEMETRY"] == "1"
    for path in (DOCKERFILE_DAGSTER, DOCKERFILE_USER_CODE):
        assert "DAGSTER_DISABLE_TELEMETRY=1" in path.read_text()


def test_instance_yaml_validates_against_dagster_schemas(monkeypatch, tmp_path):
    """docker/dagster.yaml passes dagster's instance schema and each configured class's own config schema."""
    from dagster._config import process_config
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster._core.scheduler import DagsterDaemonScheduler
    from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
    from dagster_docker import DockerRunLauncher

    for name in env_refs(instance_config()) | launcher_env_names():
        monkeypatch.setenv(name, "x")

    def load(doc: dict):
        d = tmp_path / f"home{secrets.token_hex(4)}"
        d.mkdir()
        (d / "dagster.yaml").write_text(yaml.safe_dump(doc))
        return dagster_instance_config(str(d))

    doc = instance_config()
    config, custom_class = load(doc)
    assert custom_class is None
    assert config["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_POSTGRES_HOST"}

    classes = {"run_coordinator": QueuedRunCoordinator, "run_launcher": DockerRunLauncher,
               "compute_logs": LocalComputeLogManager, "scheduler": DagsterDaemonScheduler}
    for key, klass in classes.items():
        assert klass.__name__ == doc[key]["class"], key
        module = __import__(doc[key]["module"], fromlist=[klass.__name__])
        assert getattr(module, klass.__name__) is klass, f"{doc[key]['module']}.{klass.__name__}"
        result = process_config(klass.config_type(), doc[key].get("config") or {})
        assert result.success, f"{key}: {[e.message for e in result.errors]}"

    # the queue: one run per `ops/environment` value at a time, polled every second
    coordinator = doc["run_coordinator"]["config"]
    assert {"key": "ops/environment", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in \
        coordinator["tag_concurrency_limits"]
    assert coordinator["dequeue_interval_seconds"] <= 2
    assert doc["run_monitoring"]["enabled"] is True
    assert doc["run_retries"] == {"enabled": False}
    for key in ("sensors", "schedules"):
        assert doc[key]["use_threads"] is True
    # explicit psycopg2 driver: SQLAlchemy >= 2.1 would pick psycopg 3, absent from the webserver/daemon image
    assert doc["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"

    # the checks do reject mistakes (typos in the instance schema and in a class schema)
    bad = copy.deepcopy(doc)
    bad["storage"]["postgres"]["postgres_db"]["hostnme"] = bad["storage"]["postgres"]["postgres_db"].pop("hostname")
    with pytest.raises(DagsterInvalidConfigError):
        load(bad)
    bad_coordinator = {**coordinator, "tag_concurrency_limit": coordinator["tag_concurrency_limits"]}
    assert not process_config(QueuedRunCoordinator.config_type(), bad_coordinator).success
    assert not process_config(DockerRunLauncher.config_type(),
                              {**doc["run_launcher"]["config"], "netwrok": "x"}).success


# ----------------------------------------------------------------------------- bring-up through Podman

PYTHON_STANDIN = "localhost/ops-pipeline/python:3.11"
POSTGRES_STANDIN = "localhost/ops-pipeline/postgres:16"
REDIS_STANDIN = "localhost/ops-pipeline/redis:7"
USER_CODE_IMAGE = "localhost/ops-pipeline/compose-user-code:test"
DAGSTER_IMAGE = "localhost/ops-pipeline/compose-dagster:test"
DEBIAN_STANDIN = "localhost/ops-pipeline/debian:bookworm"
UI_PROXY_IMAGE = "localhost/ops-pipeline/compose-ui-proxy:test"


def stage_build_context(dest: Path) -> Path:
    """A copy of what the stack needs: the compose file, docker/, and what Dockerfile_user_code.dockerignore lets in.

    docker-compose 1.x (legacy builder) ignores Dockerfile-specific .dockerignore files and would otherwise send the
    whole repository (.venv, .ops, node_modules: over 1 GB) as the user_code build context."""
    shutil.copy2(COMPOSE_FILE, dest / COMPOSE_FILE.name)
    # not docker/proxy/users/: a developer's real UI users stay out of the test (it makes its own)
    shutil.copytree(DOCKER_DIR, dest / "docker", ignore=shutil.ignore_patterns("__pycache__", "users"))
    for line in USER_CODE_IGNORE.read_text().splitlines():
        if line.startswith("!"):
            src = ROOT / line[1:].rstrip("/")
            if src.is_dir():
                shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, dest / src.name)
    return dest


class Stack:
    def __init__(self, workdir: Path, env: dict[str, str], docker_host: str):
        import docker

        self.workdir = workdir
        self.env = env
        self.client = docker.DockerClient(base_url=docker_host, timeout=300)
        self.timings: dict[str, float] = {}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker-compose", "-f", str(self.workdir / "docker-compose.yml"), *args],
                              cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} exited {proc.returncode}:\n{tail(proc, 60)}\n"
                                 f"{self.diagnostics()}")
        return proc

    def timed(self, name: str, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[name] = round(time.monotonic() - t0, 1)

    def containers(self) -> dict[str, object]:
        found = self.client.containers.list(all=True, filters={"label": f"com.docker.compose.project={PROJECT}"})
        return {c.labels.get("com.docker.compose.service"): c for c in found}

    def run_containers(self) -> list:
        return self.client.containers.list(all=True, filters={"label": "dagster/run_id",
                                                              "network": "ops_pipeline_network"})

    def exec(self, service: str, cmd: list[str]) -> str:
        container = self.containers()[service]
        code, out = container.exec_run(cmd, demux=False)
        text = out.decode(errors="replace") if out else ""
        assert code == 0, f"{service}: {cmd} exited {code}:\n{text}"
        return text

    def image_id(self, ref: str) -> str | None:
        import docker

        try:
            return self.client.images.get(ref).id
        except docker.errors.ImageNotFound:
            return None

    def remove_replaced_images(self, before: dict[str, str | None]) -> None:
        """Remove this test's previous builds of the stack images once a rebuild untagged them (no pile-up)."""
        import docker

        for ref, old_id in before.items():
            if old_id and old_id != self.image_id(ref):
                try:
                    self.client.images.remove(old_id)
                except docker.errors.APIError:
                    pass  # still used by a container or another tag: keep it

    def health(self, service: str) -> str:
        container = self.containers()[service]
        container.reload()
        return ((container.attrs.get("State") or {}).get("Health") or {}).get("Status", "none")

    def diagnostics(self) -> str:
        parts = []
        try:
            for name, c in sorted(self.containers().items()):
                c.reload()
                parts.append(f"--- {name}: {c.status}, health {self.health(name)}\n"
                             f"{c.logs(tail=40).decode(errors='replace')}")
            for c in self.run_containers():
                parts.append(f"--- run container {c.short_id} ({c.labels.get('dagster/run_id')}): {c.status}\n"
                             f"{c.logs(tail=60).decode(errors='replace')}")
        except Exception as exc:  # noqa: BLE001  diagnostics must never hide the real failure
            parts.append(f"(diagnostics failed: {exc!r})")
        return "\n".join(parts)


def basic(auth: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()}


def graphql(port: int, query: str, variables: dict | None = None, *, auth: tuple[str, str] | None = None) -> dict:
    """POST a query to /graphql through the UI proxy as `auth` (user, password); returns `data` (raises on GraphQL
    errors)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                     headers={"Content-Type": "application/json", **(basic(auth) if auth else {})})
    with urllib.request.urlopen(request, timeout=60) as r:
        reply = json.loads(r.read())
    if reply.get("errors"):
        raise AssertionError(f"GraphQL errors: {reply['errors']}")
    return reply["data"]


class Fatal(Exception):
    """Raised by a wait_for predicate: stop waiting, this will not get better."""


def wait_for(what: str, predicate, timeout: float, interval: float = 2.0, stack: Stack | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Fatal:
            raise
        except Exception as exc:  # noqa: BLE001  not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})\n"
                         f"{stack.diagnostics() if stack else ''}")


@pytest.mark.containers
@pytest.mark.xdist_group("engine")
@pytest.mark.timeout(2700)
@pytest.mark.filterwarnings("ignore::DeprecationWarning:gql.*")
def test_stack_comes_up_and_runs_a_backup_in_its_own_container(podman_engine, tmp_path, record_property):
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose) but the engine is available")
    from dagster_graphql import DagsterGraphQLClient
    from requests.auth import HTTPBasicAuth

    timings: dict[str, float] = {"setup_engine": podman_engine["setup_s"]}
    t0 = time.monotonic()
    base = run_script("build-python-base-image.sh", timeout=1800)
    timings["base_images"] = round(time.monotonic() - t0, 1)
    assert base.returncode == 0, f"build-python-base-image.sh failed:\n{tail(base, 40)}"

    workdir = stage_build_context(tmp_path)
    port = free_port()
    # the UI's users, made as docker/README.md says (bcrypt htpasswd files given to ui_proxy as secrets)
    users = {"operator": ("olivia", "op-" + secrets.token_hex(12)), "viewer": ("victor", "vw-" + secrets.token_hex(12))}
    for role, (name, password) in users.items():
        made = subprocess.run([str(PROXY_DIR / "ui-user.sh"), name, role], input=password + "\n", text=True,
                              capture_output=True, env={**os.environ, "OPS_UI_USERS_DIR": str(tmp_path / "users")},
                              timeout=60, check=False)
        assert made.returncode == 0, made.stderr
    operator, viewer = users["operator"], users["viewer"]
    passwords = {k: secrets.token_hex(12) for k in ("DAGSTER_POSTGRES_PASSWORD", "APP_POSTGRES_PASSWORD",
                                                    "APP_REDIS_PASSWORD", "APP_JWT_SECRET")}
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "DOCKER_HOST": podman_engine["docker_host"],
        "COMPOSE_PROJECT_NAME": PROJECT,
        "DOCKER_SOCKET": podman_engine["socket"],
        "PYTHON_BASE_IMAGE": PYTHON_STANDIN,
        "POSTGRES_IMAGE": POSTGRES_STANDIN,
        "REDIS_IMAGE": REDIS_STANDIN,
        "OPS_USER_CODE_IMAGE": USER_CODE_IMAGE,
        "OPS_DAGSTER_IMAGE": DAGSTER_IMAGE,
        "DEBIAN_BASE_IMAGE": DEBIAN_STANDIN,
        "OPS_UI_PROXY_IMAGE": UI_PROXY_IMAGE,
        "OPS_UI_OPERATORS_HTPASSWD": str(tmp_path / "users" / "operators.htpasswd"),
        "OPS_UI_VIEWERS_HTPASSWD": str(tmp_path / "users" / "viewers.htpasswd"),
        "DAGSTER_WEBSERVER_PORT": str(port),
        "COMPOSE_HTTP_TIMEOUT": "600",
        **passwords,
    }
    stack = Stack(workdir, env, podman_engine["docker_host"])

    # leftovers of an interrupted earlier run of this test; another stack on the fixed names is an error
    stack.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
    for c in stack.run_containers():
        c.remove(force=True)
    leftover = stack.client.networks.list(names=["ops_pipeline_network"])
    if leftover:
        users = [c.name for c in stack.client.containers.list(all=True, filters={"network": "ops_pipeline_network"})]
        if users:
            pytest.fail(f"network ops_pipeline_network is in use by {users}: another ops-pipeline stack runs on this "
                        "engine; stop it first (docker compose down)")
        leftover[0].remove()

    try:
        # OPS_COMPOSE_TEST_NO_CACHE=1: build without the layer cache (to measure a cold build)
        no_cache = ["--no-cache"] if os.environ.get("OPS_COMPOSE_TEST_NO_CACHE") == "1" else []
        before = {ref: stack.image_id(ref) for ref in (USER_CODE_IMAGE, DAGSTER_IMAGE, UI_PROXY_IMAGE)}
        stack.timed("compose_build", stack.compose, "build", *no_cache, timeout=1800)
        stack.remove_replaced_images(before)
        stack.timed("compose_up", stack.compose, "up", "-d", timeout=900)
        ps = stack.containers()
        assert set(ps) == {"dagster_postgres", "app_postgres", "app_redis", "user_code", "webserver",
                           "webserver_readonly", "daemon", "ui_proxy"}, ps
        # only the proxy is published on the host
        for name, container in ps.items():
            bindings = {k: v for k, v in (container.attrs["HostConfig"].get("PortBindings") or {}).items() if v}
            assert bool(bindings) == (name == "ui_proxy"), f"{name} publishes {bindings}"

        # the webservers through the published (loopback) port of the proxy, as each role
        def server_info(auth):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/server_info", headers=basic(auth))
            with urllib.request.urlopen(request, timeout=5) as r:
                return json.loads(r.read())
        info = stack.timed("webserver_ready", wait_for, "webserver /server_info through ui_proxy",
                           lambda: server_info(operator) and server_info(viewer), 300, stack=stack)
        pins = pyproject_pins()
        assert info["dagster_version"] == pins["dagster"] and info["dagster_webserver_version"] == pins["dagster-webserver"]

        # nothing without a valid user: pages, /graphql (a launch), wrong password
        launch_query = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
            ... on UnauthorizedError { message } ... on LaunchRunSuccess { run { runId } } } }"""
        launch_vars = {"p": {"selector": {"repositoryLocationName": "ops_pipeline", "repositoryName": "__repository__",
                                          "jobName": "backup"},
                             "runConfigData": {"ops": {"backup_target": {"config": {"environment": "compose-viewer",
                                                                                     "trigger": "manual"}}}}}}
        for path, body, auth in (("/", None, None), ("/graphql", json.dumps({"query": launch_query,
                                 "variables": launch_vars}).encode(), None), ("/graphql", b"{}", (operator[0], "wrong"))):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                             headers={"Content-Type": "application/json", **(basic(auth) if auth else {})})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 401, (path, auth and auth[0], refused.value.code)

        client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60,
                                      auth=HTTPBasicAuth(*operator))

        def daemons_healthy():
            data = graphql(port, """{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }""",
                           auth=viewer)
            statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
            required = {s["daemonType"]: s["healthy"] for s in statuses if s["required"]}
            return required if required and all(required.values()) else None
        daemons = stack.timed("daemon_ready", wait_for, "the daemon's heartbeats", daemons_healthy, 300, 3, stack)
        assert {"QUEUED_RUN_COORDINATOR", "SCHEDULER", "SENSOR"} <= set(daemons), daemons

        def location_loaded():
            data = graphql(port, """{ workspaceOrError { ... on Workspace { locationEntries { name
                locationOrLoadError { __typename ... on PythonError { message } } } } } }""", auth=viewer)
            entries = {e["name"]: e["locationOrLoadError"] for e in data["workspaceOrError"]["locationEntries"]}
            assert entries["ops_pipeline"]["__typename"] == "RepositoryLocation", entries
            return entries
        wait_for("code location ops_pipeline loaded in the webserver", location_loaded, 120, stack=stack)

        # the viewer's launch is refused by the read-only webserver
        refused = graphql(port, launch_query, launch_vars, auth=viewer)["launchRun"]
        assert refused == {"__typename": "UnauthorizedError", "message": "Authorization failed"}, refused

        # exact pins inside the images, not only in the files
        probe = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
                 "['dagster', 'dagster-webserver', 'dagster-graphql', 'dagster-postgres', 'dagster-docker']}))")
        for service in ("webserver", "user_code"):
            installed = json.loads(stack.exec(service, ["python", "-c", probe]).strip().splitlines()[-1])
            assert installed == {p: pins[p] for p in installed}, f"{service}: {installed}"

        # two backups of one environment, launched together: through the queue, one container each, one at a time
        run_config = {"ops": {"backup_target": {"config": {"environment": "compose", "trigger": "manual"}}}}
        t_runs = time.monotonic()
        run_ids = [client.submit_job_execution("backup", repository_location_name="ops_pipeline",
                                               repository_name="__repository__", run_config=run_config,
                                               tags={"ops/environment": "compose"})
                   for _ in range(2)]

        def succeeded(ids: list[str]):
            statuses = [client.get_run_status(r).value for r in ids]
            if any(s in ("FAILURE", "CANCELED") for s in statuses):
                raise Fatal(f"run statuses {dict(zip(ids, statuses, strict=True))}\n{stack.diagnostics()}")
            return statuses if all(s == "SUCCESS" for s in statuses) else None
        wait_for("both backup runs to succeed", lambda: succeeded(run_ids), 900, 3, stack)
        timings["two_backup_runs"] = round(time.monotonic() - t_runs, 1)

        # the CLI way docker/README.md documents: `dagster job launch` inside the webserver container (queued too)
        cli_run_id = str(uuid.uuid4())
        t_cli = time.monotonic()
        stack.exec("webserver", ["dagster", "job", "launch", "-w", "workspace.yaml", "-j", "backup",
                                 "--config-json", json.dumps({"ops": {"backup_target": {"config": {
                                     "environment": "compose-cli", "trigger": "manual"}}}}),
                                 "--tags", json.dumps({"ops/environment": "compose-cli"}), "--run-id", cli_run_id])
        wait_for("the CLI-launched backup run to succeed", lambda: succeeded([cli_run_id]), 600, 3, stack)
        timings["cli_backup_run"] = round(time.monotonic() - t_cli, 1)
        run_ids.append(cli_run_id)

        runs = []
        for run_id in run_ids:
            data = graphql(port, """query($id: ID!) { runOrError(runId: $id) { ... on Run { runId status startTime
                endTime tags { key value } } } logsForRun(runId: $id) { ... on EventConnection { events { __typename } } } }""",
                           {"id": run_id}, auth=viewer)
            run = data["runOrError"]
            run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
            run["events"] = [e["__typename"] for e in data["logsForRun"]["events"]]
            runs.append(run)

        service_ids = {c.id for c in stack.containers().values()}
        for run in runs:
            assert {"RunEnqueuedEvent", "RunStartingEvent", "RunSuccessEvent"} <= set(run["events"]), run["events"]
            assert run["tags"]["dagster/code_location"] == "ops_pipeline"
            assert run["tags"]["dagster/image"] == USER_CODE_IMAGE
            container_id = run["tags"].get("docker/container_id")
            assert container_id, f"run {run['runId']} has no docker/container_id tag: {run['tags']}"
            assert container_id not in service_ids, "the run ran in a compose service container, not its own"
            container = stack.client.containers.get(container_id)
            assert container.labels["dagster/run_id"] == run["runId"]
            assert container.labels["dagster/job_name"] == "backup"
            assert container.attrs["State"]["ExitCode"] == 0
            assert USER_CODE_IMAGE in {container.attrs["Config"]["Image"], *container.image.tags}
            assert "ops_pipeline_network" in container.attrs["NetworkSettings"]["Networks"]
            cmd = container.attrs["Config"]["Cmd"]
            assert cmd[-3:-1] == ["api", "execute_run"], cmd[:-1]
            mounts = {m.get("Name"): m["Destination"] for m in container.attrs["Mounts"] if m.get("Name")}
            assert mounts.get("ops_pipeline_backups") == "/var/backups/ops-pipeline", mounts
        assert len({run["tags"]["docker/container_id"] for run in runs}) == len(runs)
        # applyLimitPerUniqueValue / limit 1: the second run of environment `compose` started after the first ended
        first, second = sorted(runs[:2], key=lambda r: r["startTime"])
        assert second["startTime"] >= first["endTime"], \
            f"runs of one environment overlapped: {first['startTime']}-{first['endTime']} vs {second['startTime']}"

        # the viewer's attempt launched nothing
        all_runs = graphql(port, "{ runsOrError { ... on Runs { results { runId } } } }", auth=viewer)
        assert {r["runId"] for r in all_runs["runsOrError"]["results"]} == set(run_ids), all_runs

        # the backups landed in the shared volume, visible from the user_code service
        listing = stack.exec("user_code", ["sh", "-c", "find /var/backups/ops-pipeline -type f | sort"])
        assert "/backups/compose/" in listing and "/backups/compose-cli/" in listing, listing

        # A recreated webserver at another address is found by the running proxy (it resolves the name per request,
        # nginx would otherwise keep the old address until restarted). The old address is taken by a placeholder
        # container meanwhile, so the new one cannot get it back.
        def address(service: str) -> str:
            container = stack.containers()[service]
            container.reload()
            return container.attrs["NetworkSettings"]["Networks"]["ops_pipeline_network"]["IPAddress"]
        old_ip, proxy_id = address("webserver_readonly"), stack.containers()["ui_proxy"].id
        stack.compose("stop", "webserver_readonly", timeout=300)
        stack.compose("rm", "-f", "webserver_readonly", timeout=300)
        placeholder = stack.client.containers.run(DEBIAN_STANDIN, ["sleep", "600"], detach=True, remove=True,
                                                  network="ops_pipeline_network",
                                                  labels={"ops-pipeline/test": "ip-placeholder"})
        try:
            stack.timed("recreate_webserver_readonly", stack.compose, "up", "-d", "--no-deps", "webserver_readonly",
                        timeout=600)
            new_ip = address("webserver_readonly")
            assert new_ip != old_ip, f"webserver_readonly got its old address {old_ip} back: nothing proven"
            stack.timed("viewer_back_through_proxy", wait_for, "the viewer's webserver again, through the same proxy",
                        lambda: server_info(viewer), 300, stack=stack)
        finally:
            placeholder.remove(force=True)
        assert stack.containers()["ui_proxy"].id == proxy_id
        assert graphql(port, launch_query, launch_vars, auth=viewer)["launchRun"]["__typename"] == "UnauthorizedError"
        ps = stack.containers()

        # compose's own health checks settle too (the daemon's first liveness check runs 60 s after start)
        for service in ps:
            stack.timed(f"healthy_{service}", wait_for, f"{service} healthy", lambda s=service: stack.health(s) == "healthy",
                        300, 5, stack)
    finally:
        for c in stack.run_containers():
            c.remove(force=True)
        t_down = time.monotonic()
        down = stack.compose("down", "-v", "--remove-orphans", timeout=600, check=False)
        timings["compose_down"] = round(time.monotonic() - t_down, 1)
        timings.update(stack.timings)
        timings["total"] = round(time.monotonic() - t0, 1)
        record_property("timings", json.dumps(timings))
        print(f"\ncompose bring-up timings (s), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {json.dumps(timings)}")
    assert down.returncode == 0, tail(down, 30)
    assert not stack.client.networks.list(names=["ops_pipeline_network"]), "network left behind by down -v"
    assert not stack.client.volumes.list(filters={"name": "ops_pipeline_backups"}), "volume left behind by down -v"
