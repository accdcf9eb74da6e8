"""Checks a restore drill runs on the database it restored: row counts against the manifest, pg_amcheck."""

from __future__ import annotations

import subprocess
import time

import psycopg

from ops_pipeline.backup.common import LogFn
from ops_pipeline.platform.postgres import ConnInfo, DatabaseError, PostgresResource


def compare_counts(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    problems = []
    for table, n in sorted(expected.items()):
        if table not in actual:
            problems.append(f"{table}: missing after restore (expected {n} rows)")
        elif actual[table] != n:
            problems.append(f"{table}: {actual[table]} rows after restore, {n} in the backup")
    return problems


def amcheck(postgres: PostgresResource, url: str, database: str, log: LogFn) -> dict:
    """pg_amcheck --heapallindexed on `database` (needs the amcheck extension and rights to use it)."""
    t0 = time.monotonic()
    try:
        with postgres.connect(ConnInfo.parse(url).url(database)) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    except (DatabaseError, psycopg.Error) as exc:
        return {"ran": False, "reason": f"amcheck extension unavailable: {str(exc).splitlines()[0][:200]}"}
    # The database comes from PGDATABASE (tool_env): pg_amcheck's --database takes a pattern, not a name.
    proc = subprocess.run([postgres.binary("pg_amcheck"), "--heapallindexed", "--no-password"],
                          env=postgres.tool_env(url, database), capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    result = {"ran": True, "ok": proc.returncode == 0, "seconds": round(time.monotonic() - t0, 3), "output": out[-1000:]}
    log(f"pg_amcheck --heapallindexed: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s")
    return result
