"""Container tests: Podman's Docker-compatible API, a local registry on loopback, the node base image built from host
files, and Debian's nginx on the host (scripts/containers/, see its README).

The session fixture runs the colleague's idempotent scripts (setup-engine.sh, start-registry.sh,
build-node-base-image.sh), points DOCKER_HOST at the engine for the session, and stops the engine and the
registry at the end only if it started them. The only reason to skip is an engine that cannot start at all.
Every test environment's containers, nginx, network and host relays are removed when its test ends.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import EXAMPLE_APP, ROOT, _copy_app, make_defs, release_run_config

SCRIPTS = ROOT / "scripts" / "containers"
REGISTRY = "127.0.0.1:5000"
REPOSITORY = f"{REGISTRY}/node-api"
BASE_IMAGE = "localhost/ops-pipeline/node:20"


def _script(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def _tail(proc: subprocess.CompletedProcess, n: int = 15) -> str:
    return "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-n:])


def _containers_state_dir() -> Path:
    return Path(os.environ.get("OPS_CONTAINERS_STATE_DIR") or ROOT / ".ops" / "containers")


def _engine_answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    proc = subprocess.run(["curl", "-fsS", "-m", "3", "--unix-socket", str(sock), "http://d/_ping"],
                          capture_output=True, check=False)
    return proc.returncode == 0


def _registry_answers() -> bool:
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def container_engine():
    """The Docker-compatible engine (Podman), the local registry and the base image, for the whole session."""
    if os.geteuid() != 0:
        pytest.skip("container engine cannot start: rootful Podman (scripts/containers/setup-engine.sh) needs root")
    state = _containers_state_dir()
    engine_was_up = _engine_answers(state / "podman.sock")
    registry_was_up = _registry_answers()
    t0 = time.monotonic()
    setup = _script("setup-engine.sh")
    m = re.search(r"^export DOCKER_HOST=(\S+)$", setup.stdout, re.MULTILINE)
    if setup.returncode != 0 or not m:
        pytest.skip(f"container engine cannot start (scripts/containers/setup-engine.sh exited {setup.returncode}):\n"
                    f"{_tail(setup)}")
    docker_host = m.group(1)
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = docker_host
    registry = _script("start-registry.sh")
    if registry.returncode != 0:
        pytest.fail(f"scripts/containers/start-registry.sh failed:\n{_tail(registry)}")
    base = _script("build-node-base-image.sh")
    if base.returncode != 0:
        pytest.fail(f"scripts/containers/build-node-base-image.sh failed:\n{_tail(base)}")
    import docker

    client = docker.DockerClient(base_url=docker_host, version="auto", timeout=600)
    print(f"\ncontainer engine ready in {time.monotonic() - t0:.1f} s ({docker_host})", flush=True)
    yield SimpleNamespace(docker_host=docker_host, client=client, registry=REGISTRY, repository=REPOSITORY,
                          base_image=BASE_IMAGE)
    client.close()
    if not registry_was_up:
        _script("stop-registry.sh", timeout=120)
    if not engine_was_up:
        _script("stop-engine.sh", timeout=120)
    if previous is None:
        os.environ.pop("DOCKER_HOST", None)
    else:
        os.environ["DOCKER_HOST"] = previous


@pytest.fixture(scope="session")
def container_app(state_dir) -> Path:
    """A private copy of examples/node-api for image builds. No `npm ci` on the host: on a container target the
    Dockerfile installs and compiles (node_modules and dist are .dockerignored anyway)."""
    return _copy_app(EXAMPLE_APP, state_dir / "apps" / "node-api-containers", link_node_modules=False)


@pytest.fixture
def container_variant(container_app):
    """make(name, edit) -> a copy of the container app with `edit(path)` applied (another release of it)."""

    def make(name: str, edit=None) -> Path:
        dst = _copy_app(container_app, container_app.parent / f"{name}-{os.getpid()}-{time.time_ns()}",
                        link_node_modules=False)
        if edit:
            edit(dst)
        return dst

    return make


def docker_target_config(**docker_overrides) -> dict:
    return {"kind": "docker", "docker": {"image_repository": REPOSITORY, "base_image": BASE_IMAGE, "drain_s": 10,
                                         **docker_overrides}}


def docker_run_config(app_dir: Path, environment: str, *, version: str, port: int, instances: int = 3, **overrides) -> dict:
    """Release run config on the Docker target. Lint and the app's tests are skipped (fast), and so are the host's
    install/build: on a container target the image build (npm ci + tsc inside the Dockerfile) is the build."""
    overrides.setdefault("target", docker_target_config())
    cfg = release_run_config(app_dir, environment, version=version, port=port, instances=instances, fast=True,
                             **overrides)
    cfg["ops"]["verify_env"]["config"]["app"]["commands"].update({"install": "", "build": ""})
    return cfg


def docker_target_for(environment: str, port: int, app_dir: Path | str = ""):
    from ops_pipeline.platform.prober import HttpProber
    from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
    from ops_pipeline.targets.docker.engine import DockerEngine
    from ops_pipeline.targets.docker.target import DockerTarget

    cfg = ReleaseConfig(environment=environment, app={"path": str(app_dir or ROOT)},
                        target={**docker_target_config(), "port": port, "instances": 3})
    spec = ReleaseSpec(config=cfg, version="inspect", app_dir=str(app_dir or ROOT))
    return DockerTarget(spec, DockerEngine(base_url=os.environ.get("DOCKER_HOST", "")), HttpProber())


def _environment(name: str, backups: Path):
    from ops_pipeline.backup.store import BackupStore
    from ops_pipeline.platform.local_stack import free_port

    defs = make_defs(backup_store=BackupStore(local_dir=str(backups)))
    port = free_port()
    return SimpleNamespace(env=name, port=port, defs=defs, release=defs.get_job_def("release"),
                           rollback=defs.get_job_def("rollback"), target=lambda: docker_target_for(name, port))


def _remove_environment(env) -> None:
    target = docker_target_for(env.env, env.port)
    try:
        target.stop()
    finally:
        target.close()


@pytest.fixture
def docker_release(container_engine, environment_name, instance, tmp_path):
    """A fresh environment on the Docker target: its name, public port, the Definitions and a Dagster instance.
    Its containers, nginx, network and relays are removed afterwards."""
    env = _environment(environment_name, tmp_path / "backups")
    env.instance = instance
    yield env
    _remove_environment(env)


@pytest.fixture(scope="module")
def shared_docker_environment(container_engine, tmp_path_factory):
    """One Docker-target environment for several tests of a module (each test checks the state it starts from,
    read from the engine; a test that needs replicas serving releases them itself when run alone).
    Saves one three-replica release per test; removed at the end of the module."""
    env = _environment(f"t-docker-{os.getpid() % 1000}-{time.time_ns() % 100000}",
                       tmp_path_factory.mktemp("shared-docker-backups"))
    yield env
    _remove_environment(env)


# ---- steady load on the public port (a separate process: no GIL shared with the in-process run) ----------
def _load_main(argv: list[str]) -> None:
    """Two request loops against 127.0.0.1:PORT until SIGTERM: one opens a fresh connection per request, one
    reuses a keep-alive connection. A request counts as failed unless it gets HTTP 200. Like browsers and
    common HTTP clients (RFC 9112 9.3.1), the keep-alive loop resends an idempotent GET once on a fresh
    connection when a *reused* connection was closed by the server before any response byte arrived (the
    graceful-reload race of idle keep-alive connections); those resends are counted separately."""
    import http.client
    import json as _json
    import select
    import signal as _signal
    import threading
    import time as _time

    port, path, out_file, pause = int(argv[0]), argv[1], argv[2], float(argv[3])
    stop = threading.Event()
    _signal.signal(_signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()
    stats = {"requests": 0, "ok": 0, "failed": 0, "stale_keepalive_resends": 0, "fresh": 0, "keepalive": 0,
             "versions": {}, "failures": [], "first_version_change_s": None}
    t0 = _time.monotonic()

    def record(mode, status, body, error=""):
        with lock:
            stats["requests"] += 1
            stats[mode] += 1
            if status == 200:
                stats["ok"] += 1
                try:
                    version = _json.loads(body).get("version", "?")
                except ValueError:
                    version = "?"
                stats["versions"][version] = stats["versions"].get(version, 0) + 1
            else:
                stats["failed"] += 1
                if len(stats["failures"]) < 30:
                    stats["failures"].append(f"+{_time.monotonic() - t0:.2f}s {mode}: {status} {error or body[:120]!r}")

    def fresh_loop():
        while not stop.is_set():
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request("GET", path, headers={"Connection": "close"})
                r = c.getresponse()
                record("fresh", r.status, r.read())
                c.close()
            except Exception as exc:  # noqa: BLE001
                record("fresh", None, b"", f"{type(exc).__name__}: {exc}")
            _time.sleep(pause)

    def keepalive_loop():
        conn, reused = None, False
        while not stop.is_set():
            for attempt in (1, 2):
                phase = "connect"
                try:
                    if conn is not None and select.select([conn.sock], [], [], 0)[0]:
                        conn.close()  # closed by the server while idle: reconnect (as urllib3 does)
                        conn = None
                    if conn is None:
                        conn, reused = http.client.HTTPConnection("127.0.0.1", port, timeout=10), False
                    phase = "request"
                    conn.request("GET", path)
                    r = conn.getresponse()
                    phase = "body"
                    body = r.read()
                    if r.will_close:
                        conn.close()
                        conn = None
                    else:
                        reused = True
                    record("keepalive", r.status, body)
                    break
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                    was_reused = reused
                    if conn is not None:
                        conn.close()
                    conn = None
                    if was_reused and attempt == 1 and phase == "request":  # nothing of a response came back
                        with lock:
                            stats["stale_keepalive_resends"] += 1
                        continue
                    record("keepalive", None, b"", f"{type(exc).__name__}: {exc}")
                    break
                except Exception as exc:  # noqa: BLE001
                    if conn is not None:
                        conn.close()
                    conn = None
                    record("keepalive", None, b"", f"{type(exc).__name__}: {exc}")
                    break
            _time.sleep(pause)

    threads = [threading.Thread(target=fresh_loop), threading.Thread(target=keepalive_loop)]
    for t in threads:
        t.start()
    print("load started", flush=True)
    while not stop.is_set():
        _time.sleep(0.1)
    for t in threads:
        t.join(timeout=15)
    stats["duration_s"] = round(_time.monotonic() - t0, 1)
    with open(out_file, "w") as f:
        _json.dump(stats, f)


class SteadyLoad:
    """`with SteadyLoad(port) as load: ...` then `load.result` (dict)."""

    def __init__(self, port: int, out_dir: Path, path: str = "/health", pause_s: float = 0.02) -> None:
        self.port, self.path, self.pause_s = port, path, pause_s
        self.out = out_dir / f"load-{time.time_ns()}.json"
        self.result: dict = {}

    def __enter__(self) -> SteadyLoad:  # noqa: PYI034
        source = inspect.getsource(_load_main) + "\n_load_main(__import__('sys').argv[1:])\n"
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", source, str(self.port), self.path, str(self.out),
                                      str(self.pause_s)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "load started"
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.result = json.loads(self.out.read_text())

    def summary(self) -> str:
        r = self.result
        return (f"{r['requests']} requests in {r['duration_s']} s ({r['fresh']} fresh-connection, {r['keepalive']} "
                f"keep-alive), {r['failed']} failed, {r['stale_keepalive_resends']} stale keep-alive resends, "
                f"versions {r['versions']}")
