"""The migrations an app's migration tool recorded as applied, read from the table the spec names, whatever the tool.

Each tool keeps its own table shape:

    node-pg-migrate   pgmigrations (id, name, run_on)
    db-migrate        migrations (id, name, run_on)
    knex              knex_migrations (id, name, batch, migration_time)
    Sequelize/umzug   "SequelizeMeta" (name)
    TypeORM           migrations (id, timestamp, name)
    Prisma            _prisma_migrations (id, checksum, finished_at, migration_name, logs, rolled_back_at, started_at, ...)

So the table's columns are looked up first (pg_attribute) and the query is built from what exists: the name from
the first of NAME_COLUMNS (else the first text column, else the first column), oldest first by a time column (the
first of TIME_COLUMNS, else any timestamp column), then `id`, then the name. Rows of attempts that did not apply
are left out where the table records them (Prisma: `finished_at` NULL or `rolled_back_at` set; Flyway-like tables:
`success` false), so the count is the number of migrations in effect.

A missing table means none applied yet. Reading runs in a transaction block of its own (a SAVEPOINT when the
connection is already in a transaction, such as the backup's snapshot transaction), so a failure here never aborts
the caller's transaction; it raises MigrationsTableError naming the table and PostgreSQL's reason.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from ops_pipeline.platform.postgres import DatabaseError

NAME_COLUMNS = ("name", "migration_name", "migration", "script", "filename", "version", "description")
TIME_COLUMNS = ("run_on", "migration_time", "finished_at", "executed_at", "installed_on", "applied_at", "created_at",
                "started_at")
TEXT_TYPES = ("text", "character varying", "character", "name")


class MigrationsTableError(DatabaseError):
    pass


def _relation(conn: psycopg.Connection, table: str) -> tuple[int, str, str] | None:
    """The table's oid, schema and name: the name as written (`SequelizeMeta`, `public.knex_migrations`), else as
    SQL would fold it (`KNEX_MIGRATIONS`)."""
    parts = table.split(".")
    quoted = ".".join(sql.Identifier(p).as_string(conn) for p in parts) if all(parts) else None
    return conn.execute(
        """SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = coalesce(to_regclass(%s), to_regclass(%s))""", (quoted, table)).fetchone()


def _applied_query(conn: psycopg.Connection, oid: int, schema: str, relname: str) -> sql.Composed:
    """The SELECT of applied migration names, oldest first, for the table `oid` as its columns allow."""
    columns = dict(conn.execute(
        """SELECT attname, format_type(atttypid, NULL) FROM pg_attribute
            WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum""", (oid,)).fetchall())
    if not columns:
        raise MigrationsTableError(f"cannot read the applied migrations from table {relname!r}: it has no columns")
    name = next((c for c in NAME_COLUMNS if c in columns), None)
    name = name or next((c for c, t in columns.items() if t in TEXT_TYPES), next(iter(columns)))
    timestamps = [c for c, t in columns.items() if t.startswith("timestamp")]
    when = next((c for c in TIME_COLUMNS if c in columns and columns[c].startswith("timestamp")), None)
    when = when or (timestamps[0] if timestamps else None)
    order = [c for c in (when, "id" if "id" in columns else None, name) if c]
    applied = []
    if columns.get("finished_at", "").startswith("timestamp"):
        applied.append(sql.SQL("t.finished_at IS NOT NULL"))
    if "rolled_back_at" in columns:
        applied.append(sql.SQL("t.rolled_back_at IS NULL"))
    if columns.get("success") == "boolean":
        applied.append(sql.SQL("t.success"))
    # ORDER BY t.<column>: the table's column as it is (golang-migrate's bigint version), not the text output
    return sql.SQL("SELECT t.{}::text FROM {} AS t{} ORDER BY {}").format(
        sql.Identifier(name),
        sql.Identifier(schema, relname),
        sql.SQL(" WHERE ") + sql.SQL(" AND ").join(applied) if applied else sql.SQL(""),
        sql.SQL(", ").join(sql.Identifier("t", c) for c in order))


def applied_migrations(conn: psycopg.Connection, table: str) -> list[str]:
    """Names of the migrations recorded as applied in `table`, oldest first; [] when the table does not exist (or
    no table is named). Never aborts the caller's transaction; raises MigrationsTableError when the table exists
    but cannot be read."""
    if not table:
        return []
    try:
        with conn.transaction():
            relation = _relation(conn, table)
            if relation is None:
                return []
            return [r[0] for r in conn.execute(_applied_query(conn, *relation))]
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MigrationsTableError(f"cannot read the applied migrations from table {table!r}: {reason}") from None
