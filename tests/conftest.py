"""Shared fixtures: a real embedded PostgreSQL + Redis, a test Dagster instance, copies of the example app.

Everything a test session writes lives in one state directory (OPS_STATE_DIR), created world-traversable
so the unprivileged PostgreSQL user can reach its data folder, and removed at the end.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_APP = ROOT / "examples" / "node-api"

# Set before anything imports ops_pipeline.platform.paths users: the whole session shares one state dir.
_STATE = Path(tempfile.mkdtemp(prefix="ops-test-state-"))
_STATE.chmod(0o755)
os.environ["OPS_STATE_DIR"] = str(_STATE)
os.environ["OPS_PROJECT_ROOT"] = str(ROOT)
os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("DAGSTER_HOME", str(_STATE / "dagster_home"))
(_STATE / "dagster_home").mkdir(exist_ok=True)
shutil.copy(ROOT / "config" / "dagster.yaml", _STATE / "dagster_home" / "dagster.yaml")
# Rows of the fault-injection summary, written by whichever process ran the test (pytest-xdist workers inherit
# the controller's path) and printed at the end by the controller.
os.environ.setdefault("OPS_FAULT_REPORT", str(Path(tempfile.gettempdir()) / f"ops-fault-report-{os.getpid()}.jsonl"))
# The app's own variables must not leak in from the developer's shell.
for _name in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "NODE_ENV"):
    os.environ.pop(_name, None)

from ops_pipeline.platform.local_stack import LocalStack, free_port  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    import json

    if hasattr(terminalreporter.config, "workerinput"):  # an xdist worker: the controller prints the table
        return
    path = Path(os.environ["OPS_FAULT_REPORT"])
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.unlink(missing_ok=True)
    if not rows:
        return
    tr = terminalreporter
    tr.section("fault-injection summary")
    widths = (36, 10, 72, 10, 10)
    header = ("fault", "result", "outcome (as the run explains it)", "serving", "data lost")
    tr.write_line("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    tr.write_line("  ".join("-" * w for w in widths))
    for row in sorted(rows, key=lambda r: r["fault"]):
        cells = (row["fault"], row["result"], row["outcome"], row["serving"], row["data_lost"])
        tr.write_line("  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)))


def _kill_leftovers_of_this_session() -> None:
    """Any process still running with a PM2_HOME in this session's state dir (a daemon that a late `pm2` call
    respawned after its test had killed it) is killed, so a test run leaves nothing behind."""
    import psutil

    prefix = str(_STATE) + os.sep
    left = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("PM2_HOME", "").startswith(prefix):
                proc.kill()
                left.append(f"{proc.pid} {proc.info['name']}")
        except (psutil.Error, OSError):
            continue
    if left:
        print(f"\nkilled {len(left)} leftover process(es) of this session: {', '.join(left)}")


def stop_front_proxy(env_dir: Path) -> None:
    """Stop the nginx front proxy of an environment (PM2 target), if it runs."""
    try:
        os.kill(int((env_dir / "nginx" / "nginx.pid").read_text().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def pytest_sessionfinish(session, exitstatus):
    pm2 = ROOT / "tools" / "node_modules" / ".bin" / "pm2"
    envs = _STATE / "envs"
    if envs.is_dir() and pm2.exists():
        for env_dir in envs.iterdir():
            stop_front_proxy(env_dir)
            if (env_dir / "pm2").is_dir():
                try:
                    subprocess.run([str(pm2), "kill"], env={**os.environ, "PM2_HOME": str(env_dir / "pm2")},
                                   capture_output=True, timeout=60)
                except subprocess.TimeoutExpired:  # a hung daemon must not swallow the session's report
                    print(f"\npm2 kill timed out for {env_dir.name}; its processes are killed below", file=sys.stderr)
    _kill_leftovers_of_this_session()
    try:
        LocalStack().stop()
    except Exception:
        pass
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


@pytest.fixture(scope="session")
def local_stack():
    stack = LocalStack()
    stack.ensure_running()
    return stack


@pytest.fixture(scope="session")
def services(local_stack):
    return local_stack.services()


@pytest.fixture
def instance():
    """A fresh Dagster instance per test (its own storage), telemetry off."""
    import dagster as dg

    with tempfile.TemporaryDirectory(prefix="ops-test-instance-") as d:
        shutil.copy(ROOT / "config" / "dagster.yaml", Path(d) / "dagster.yaml")
        with dg.instance_for_test(temp_dir=d) as inst:
            yield inst


def _copy_app(src: Path, dst: Path, *, link_node_modules: bool = True) -> Path:
    ignore = shutil.ignore_patterns("node_modules", "dist", ".test-dist")
    shutil.copytree(src, dst, ignore=ignore)
    nm = src / "node_modules"
    if link_node_modules and nm.is_dir():
        # Hard-linked copy: as fast as a symlink, but `npm` in the copy cannot touch the original.
        subprocess.run(["cp", "-al", str(nm), str(dst / "node_modules")], check=True)
    return dst


@pytest.fixture(scope="session")
def node_app(state_dir) -> Path:
    """A private copy of examples/node-api with its dependencies installed once per session."""
    dst = _copy_app(EXAMPLE_APP, state_dir / "apps" / "node-api", link_node_modules=False)
    from ops_pipeline.platform.packagers import detect
    from ops_pipeline.release.ops.tests import INSTALL_STAMP, install_stamp

    pm = detect(dst)
    subprocess.run(pm.install().split(), cwd=dst, check=True, capture_output=True, timeout=600)
    # what run_tests itself records after an install: releases of this copy skip the (identical) install
    (dst / "node_modules" / INSTALL_STAMP).write_text(install_stamp(dst, pm, pm.install()))
    subprocess.run(["npm", "run", "build"], cwd=dst, check=True, capture_output=True, timeout=300)
    return dst


@pytest.fixture
def app_variant(node_app, tmp_path_factory):
    """make_variant(name, edit) -> a copy of the session app with `edit(path)` applied (a different app version)."""
    counter = {"n": 0}

    def make(name: str, edit=None) -> Path:
        counter["n"] += 1
        dst = _STATE / "apps" / f"{name}-{os.getpid()}-{time.time_ns()}"
        _copy_app(node_app, dst)
        if edit:
            edit(dst)
        return dst

    return make


def release_run_config(app_dir: Path, environment: str, *, version: str, port: int | None = None, instances: int = 2,
                       fast: bool = False, **overrides) -> dict:
    """Run config of the release job. `fast` skips lint and the app's test suite (for deploy-focused tests), and the
    build too when the app folder is already built (the session copy; edited variants are always built)."""
    cfg: dict = {
        "environment": environment,
        "version": version,
        "app": {"path": str(app_dir)},
        "target": {"kind": "pm2", "instances": instances, "port": port or free_port()},
        "gate": {"interval_s": 0.25, "deadline_s": 60},
    }
    if fast:
        cfg["app"]["commands"] = {"lint": "", "test": ""}
        if (Path(app_dir) / "dist" / "server.js").exists():
            cfg["app"]["commands"]["build"] = ""
    _merge(cfg, overrides)
    return {"ops": {"verify_env": {"config": cfg}}}


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


@pytest.fixture
def environment_name(request) -> str:
    """A unique environment name per test (its own PM2 daemon, ports, history)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:20].strip("-")
    return f"t-{base}-{os.getpid() % 1000}-{time.time_ns() % 100000}"


@pytest.fixture
def pm2_cleanup():
    """Kill the PM2 daemons of the environments a test registers."""
    envs: list[str] = []
    yield envs.append
    pm2 = ROOT / "tools" / "node_modules" / ".bin" / "pm2"
    for env in envs:
        stop_front_proxy(_STATE / "envs" / env)
        home = _STATE / "envs" / env / "pm2"
        if home.is_dir():
            subprocess.run([str(pm2), "kill"], env={**os.environ, "PM2_HOME": str(home)}, capture_output=True, timeout=60)


@pytest.fixture
def scratch_db(services):
    """A fresh database (owned by the app role) with two tables of data; yields its URL."""
    import psycopg
    from psycopg import sql

    from ops_pipeline.platform.postgres import ConnInfo

    name = f"t_{os.getpid()}_{time.time_ns() % 10**9}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ConnInfo.parse(services.database_url).url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id bigserial PRIMARY KEY, email text NOT NULL, created_at timestamptz DEFAULT now())")
        conn.execute("INSERT INTO customers (email) SELECT 'user' || i || '@example.com' FROM generate_series(1, 5000) i")
        conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers, total numeric(10,2), note text)")
        conn.execute("INSERT INTO orders (customer_id, total, note) SELECT 1 + i % 5000, i * 1.5, md5(i::text) FROM generate_series(1, 20000) i")
        conn.execute("CREATE INDEX orders_customer_idx ON orders (customer_id)")
    yield url
    # As the superuser: an autovacuum worker that just started on a fresh database can only be terminated by a
    # superuser (the app role gets "permission denied to terminate process" from DROP ... WITH (FORCE)).
    with psycopg.connect(services.admin_database_url, autocommit=True) as conn:
        for (db,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",)).fetchall():
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


def make_defs(**resource_overrides):
    """The project's Definitions with some resources replaced (e.g. a temporary backup store)."""
    import dagster as dg

    from ops_pipeline import definitions

    resources = {**definitions.build_resources(), **resource_overrides}
    return dg.Definitions(jobs=definitions.defs.jobs, sensors=definitions.defs.sensors,
                          schedules=definitions.defs.schedules, resources=resources)
