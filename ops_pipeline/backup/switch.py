"""Switching the app over to a restored database: the live one is renamed aside and the restored one takes its name."""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from ops_pipeline.platform.postgres import ConnInfo, DatabaseError, PostgresResource


def switch_databases(postgres: PostgresResource, url: str, *, live: str, restored: str, aside: str,
                     attempts: int = 5) -> None:
    """Rename live -> aside and restored -> live, closing the app's sessions for the moment of the swap.

    Only client sessions are terminated. An autovacuum worker in the live database (likely right after the
    accident a restore repairs: a mass DELETE) belongs to a superuser, so an app role may not terminate it; the
    RENAME itself makes PostgreSQL stop such workers, and it is retried while the database is still in use. A
    session that cannot be closed (a superuser's) fails the switch with its role named, and nothing is renamed.
    """
    info = ConnInfo.parse(url)
    maint = info.url("postgres")
    with postgres.connect(maint) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(live)))
        try:
            sessions = ("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
                        "AND backend_type = 'client backend'")
            for (pid,) in conn.execute(sessions, (live,)).fetchall():
                try:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                except psycopg.errors.InsufficientPrivilege:
                    pass  # named below if it stays
            for attempt in range(attempts):
                deadline = time.monotonic() + 5
                while conn.execute(sessions, (live,)).fetchone() and time.monotonic() < deadline:
                    time.sleep(0.1)
                try:
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(live), sql.Identifier(aside)))
                    break
                except psycopg.errors.ObjectInUse:
                    if attempt == attempts - 1:
                        left = conn.execute("SELECT usename, backend_type FROM pg_stat_activity WHERE datname = %s "
                                            "AND pid <> pg_backend_pid()", (live,)).fetchall()
                        # backend_type of other roles' sessions is hidden from a non-superuser (NULL)
                        who = ", ".join(sorted({f"role {u}" + (f" ({t})" if t else "") if u else (t or "a server process")
                                                for u, t in left})) or "none left now"
                        raise DatabaseError(f"cannot switch: {live} still has sessions this role may not close: {who}. "
                                            f"Nothing was renamed; {restored} holds the verified restore") from None
                    time.sleep(1 + attempt)
        except BaseException:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(live)))
            raise
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), sql.Identifier(live)))
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(aside)))
