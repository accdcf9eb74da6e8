"""What the restore and the drill do on a database of their own: create it, run pg_restore into it, run statements
on several connections, ANALYZE it, drop it."""

from __future__ import annotations

import concurrent.futures
import queue
import subprocess
import threading
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from ops_pipeline.backup.common import BackupError
from ops_pipeline.platform.postgres import PostgresResource
from ops_pipeline.platform.redaction import Redactor

RESTORE_OPTIONS = "-c maintenance_work_mem=512MB -c synchronous_commit=off"


def create_database(postgres: PostgresResource, url: str, target_db: str, created: list[bool]) -> None:
    with postgres.connect(url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_db)))
    created.append(True)


def pg_restore_runner(postgres: PostgresResource, url: str, target_db: str, archive: str, redact: Redactor):
    """A function that runs pg_restore with some arguments on `archive` into `target_db` and raises BackupError
    with its message when it fails."""
    env = postgres.tool_env(url, target_db)
    base = [postgres.binary("pg_restore"), "--exit-on-error", "--no-owner", "--no-privileges"]

    def pg_restore(*args: str) -> None:
        proc = subprocess.run([*base, *args, "--dbname", target_db, archive], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**env, "PGOPTIONS": RESTORE_OPTIONS})
        if proc.returncode != 0:
            raise BackupError(f"pg_restore {' '.join(args)} into {target_db} failed: {redact(proc.stderr.strip()[-1500:])}")

    return pg_restore


def on_connections(postgres: PostgresResource, url: str, items: list, work: Callable[[psycopg.Connection, object], None],
                    *, jobs: int, **connect_kw) -> None:
    """Run `work(conn, item)` for every item, in order, on `jobs` connections (one per thread, each taking the next
    item). The first failure stops the others from taking more and is raised."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    failed = threading.Event()

    def worker() -> None:
        with postgres.connect(url, autocommit=True, **connect_kw) as conn:
            while not failed.is_set():
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    work(conn, item)
                except BaseException:
                    failed.set()
                    raise

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(worker) for _ in range(min(max(1, jobs), max(1, len(items))))]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def analyze_all(postgres: PostgresResource, target_url: str, jobs: int, skip: set[str] = frozenset()) -> None:
    """ANALYZE every table of the restored database (but `skip`), biggest first, on `jobs` connections."""
    with postgres.connect(target_url) as conn:
        tables = [r[0] for r in conn.execute(
            """SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'm', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg_toast%' ORDER BY pg_total_relation_size(c.oid) DESC""")
                  if r[0] not in skip]
    if tables:
        on_connections(postgres, target_url, tables, lambda conn, table: conn.execute(f"ANALYZE {table}"), jobs=jobs)


def drop_database(postgres: PostgresResource, url: str, database: str, attempts: int = 5) -> None:
    """DROP ... WITH (FORCE), retried: right after a restore an autovacuum worker may hold the database, and a
    non-superuser may not terminate it ("permission denied to terminate process") until it finishes."""
    for attempt in range(attempts):
        try:
            with postgres.connect(url) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            return
        except psycopg.Error:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)
