"""PostgreSQL: connections, client binaries (pg_dump / pg_restore / pg_amcheck) and advisory locks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from ops_pipeline.platform.local_stack import pg_bin_dir
from ops_pipeline.platform.redaction import mask_url


class DatabaseError(RuntimeError):
    """A database problem, described without secrets."""


class LockTimeout(DatabaseError):
    pass


@dataclass(frozen=True)
class ConnInfo:
    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def parse(cls, url: str) -> ConnInfo:
        try:
            parts = urlsplit(url)
            port = parts.port or 5432
        except ValueError as exc:
            raise DatabaseError(f"malformed database URL {mask_url(url)!r}: {exc}") from None
        if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
            raise DatabaseError(f"malformed database URL {mask_url(url)!r}: expected postgresql://user:password@host:port/database")
        return cls(
            host=parts.hostname,
            port=port,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=unquote(parts.path.lstrip("/")) or unquote(parts.username or "postgres"),
        )

    def libpq_env(self, database: str | None = None) -> dict[str, str]:
        """Environment for libpq tools: the password travels in the environment, never on argv (`ps`)."""
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": database or self.database,
            "PGCONNECT_TIMEOUT": "10",
            "PGAPPNAME": "ops-pipeline",
        }
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def url(self, database: str | None = None) -> str:
        from urllib.parse import quote

        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database or self.database, safe='')}"

    @property
    def display(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for `name`."""
    return int.from_bytes(hashlib.sha256(f"ops-pipeline:{name}".encode()).digest()[:8], "big", signed=True)


def _describe(exc: Exception) -> str:
    """psycopg error text without the connection string."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return mask_url(re.sub(r"password=\S+", "password=***", text))


class PostgresResource(dg.ConfigurableResource):
    """Connections to the application's PostgreSQL and its client tools (pg_dump, pg_restore, pg_amcheck)."""

    bin_dir: str = Field("", description="Folder of pg_dump/pg_restore (empty: bundled PostgreSQL 16, then pg_config).")
    connect_timeout_s: float = Field(5.0, description="Connection timeout.")
    _held_locks: dict = PrivateAttr(default_factory=dict)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._held_locks and context.log:
            # logged before the unlock: its timestamp is an upper bound of the time the lock was held
            context.log.info(f"releasing lock(s) {', '.join(repr(n) for n in self._held_locks)}")
        self.release_held_locks()

    def hold_lock(self, url: str, name: str, *, holder: str, wait_s: float, on_wait: Callable[[str], None] | None = None) -> bool:
        """Take `name` for the rest of this run (released when the run's resources are torn down, or when the
        run's process dies). Returns False if this run already held it."""
        if name in self._held_locks:
            return False
        cm = self.advisory_lock(url, name, holder=holder, wait_s=wait_s, on_wait=on_wait)
        cm.__enter__()
        self._held_locks[name] = cm
        return True

    def release_held_locks(self) -> list[str]:
        released = []
        while self._held_locks:
            name, cm = self._held_locks.popitem()
            with contextlib.suppress(Exception):
                cm.__exit__(None, None, None)
            released.append(name)
        return released

    def binary(self, name: str) -> str:
        d = Path(self.bin_dir) if self.bin_dir else pg_bin_dir()
        path = d / name
        if not path.exists():
            raise DatabaseError(f"{name} not found in {d}")
        return str(path)

    def connect(self, url: str, *, autocommit: bool = True, timeout_s: float | None = None, application_name: str = "ops-pipeline",
                **kwargs) -> psycopg.Connection:
        info = ConnInfo.parse(url)
        try:
            return psycopg.connect(
                host=info.host,
                port=info.port,
                user=info.user,
                password=info.password or None,
                dbname=info.database,
                autocommit=autocommit,
                connect_timeout=max(1, int(round(timeout_s or self.connect_timeout_s))),
                application_name=application_name,
                **kwargs,
            )
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to {info.display}: {_describe(exc)}") from None

    def check(self, url: str, timeout_s: float | None = None) -> dict:
        """`SELECT 1` within the timeout; returns server facts."""
        timeout = timeout_s or self.connect_timeout_s
        started = time.monotonic()
        with self.connect(url, timeout_s=timeout) as conn:
            conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
            conn.execute("SELECT 1")
            version = conn.execute("SHOW server_version_num").fetchone()[0]
        return {"server_version_num": int(version), "latency_ms": round((time.monotonic() - started) * 1000, 1)}

    def server_version_num(self, url: str) -> int:
        with self.connect(url) as conn:
            return int(conn.execute("SHOW server_version_num").fetchone()[0])

    def client_version_num(self, tool: str = "pg_dump") -> int:
        out = subprocess.run([self.binary(tool), "--version"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"(\d+)(?:\.(\d+))?", out)
        if not m:
            raise DatabaseError(f"cannot parse {tool} version from {out!r}")
        major, minor = int(m.group(1)), int(m.group(2) or 0)
        return major * 10000 + minor

    def tool_env(self, url: str, database: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(ConnInfo.parse(url).libpq_env(database))
        return env

    @contextlib.contextmanager
    def advisory_lock(
        self,
        url: str,
        name: str,
        *,
        holder: str,
        wait_s: float,
        on_wait: Callable[[str], None] | None = None,
        poll_s: float = 0.5,
    ) -> Iterator[psycopg.Connection]:
        """Hold a session-level advisory lock `name` on a dedicated idle connection.

        Waiters poll `pg_try_advisory_lock` (never block inside the server) and report who holds the lock
        (the holder's application_name). The lock dies with the connection, so a crashed holder never
        leaves a stale lock.
        """
        key = lock_key(name)
        app_name = f"ops-pipeline {holder}"[:63]
        conn = self.connect(url, application_name=app_name)
        deadline = time.monotonic() + wait_s
        last_report = 0.0
        try:
            while True:
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
                if got:
                    break
                who = self.lock_holder(conn, key)
                now = time.monotonic()
                if now >= deadline:
                    raise LockTimeout(f"gave up after {wait_s:.0f} s waiting for lock '{name}' held by {who}")
                if on_wait and now - last_report >= 10:
                    on_wait(f"waiting for lock '{name}' held by {who} ({deadline - now:.0f} s left)")
                    last_report = now
                time.sleep(poll_s)
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            conn.close()

    @staticmethod
    def lock_holder(conn: psycopg.Connection, key: int) -> str:
        classid, objid = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
        row = conn.execute(
            """SELECT a.application_name, a.pid, a.backend_start
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1""",
            (classid, objid),
        ).fetchone()
        if not row:
            return "another session (gone now)"
        return f"'{row[0]}' (backend pid {row[1]}, since {row[2]:%H:%M:%S})"

    def database_exists(self, url: str, database: str) -> bool:
        with self.connect(url) as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None

    def table_row_counts(self, url: str, database: str | None = None) -> dict[str, int]:
        """Exact row counts of every user table (schema-qualified)."""
        target = ConnInfo.parse(url).url(database) if database else url
        with self.connect(target) as conn:
            tables = conn.execute(
                """SELECT quote_ident(schemaname) || '.' || quote_ident(tablename)
                     FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
                    ORDER BY 1"""
            ).fetchall()
            counts = {}
            for (t,) in tables:
                counts[t] = conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            return counts
