"""The streamed restore: the stored dump read once, its tables loaded, indexed and analyzed while it is still being
read (see restore.restore_into for why, and StreamedRestore for how)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import threading
import time

import psycopg
from psycopg import sql

from ops_pipeline.backup.common import BackupError, stderr_reader
from ops_pipeline.backup.database import RESTORE_OPTIONS, analyze_all, create_database, pg_restore_runner
from ops_pipeline.backup.pg_archive import (
    SECTION_DATA,
    SECTION_NONE,
    SECTION_POST_DATA,
    SECTION_PRE_DATA,
    ArchiveReader,
    TocEntry,
    UnsupportedArchive,
)
from ops_pipeline.backup.scheduler import Task, schedule
from ops_pipeline.backup.spool import Budget, Spool, copy_table, split
from ops_pipeline.backup.store import StoreError
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource
from ops_pipeline.platform.redaction import Redactor

ROWS_IN_MEMORY = 256 << 20  # table rows a restore holds in memory ahead of its loaders; more wait in temp files
# Foreign keys are checked when they are added (one anti-join of the two tables). The planner picks a hash join;
# after a restore that loaded the tables frozen (all-visible), a merge join over index-only scans of the two
# tables' indexes is several times cheaper (bench/README.md, "Foreign key checks"). Used only where the
# referencing columns lead an index (the referenced side always has one).
FK_CHECK_SETTINGS = {"enable_hashjoin": "off"}
_FK_DEFN = re.compile(r"^ALTER TABLE (?:ONLY )?(\S+)\s+ADD CONSTRAINT .*? FOREIGN KEY \(([^)]*)\) REFERENCES ", re.S)
# What pg_restore sets on its connections before it runs any entry (pg_backup_archiver.c, _doSetFixedOutputState);
# the archive's own ENCODING, STDSTRINGS and SEARCHPATH entries follow.
SESSION_SETTINGS = ("SET statement_timeout = 0", "SET lock_timeout = 0", "SET idle_in_transaction_session_timeout = 0",
                    "SET check_function_bodies = false", "SET xmloption = content", "SET client_min_messages = warning",
                    "SET row_security = off")
# Post-data entries (indexes, constraints) the restore schedules itself, each as soon as its tables are loaded;
# everything else in post-data (triggers, rules, policies, materialized view data, comments...) goes to one
# pg_restore at the end, in pg_restore's own order.
EARLY_POST_DATA = ("INDEX", "CONSTRAINT", "FK CONSTRAINT")  # not CHECK CONSTRAINT: on a parent it checks the
# children's rows too (ALTER TABLE without ONLY), and its dependencies do not name them
_RELATIONS = ("TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE")


def fk_check_settings(conn: psycopg.Connection, defn: str) -> dict[str, str]:
    """Planner settings for adding the foreign key `defn` (`ALTER TABLE ... ADD CONSTRAINT ... FOREIGN KEY`):
    FK_CHECK_SETTINGS when the referencing columns lead one of the table's indexes, else none."""
    match = _FK_DEFN.match(defn.strip())
    if not match:
        return {}
    table = match.group(1)
    columns = [c.strip() for c in match.group(2).split(",")]
    columns = [c[1:-1].replace('""', '"') if c.startswith('"') else c for c in columns]
    leading = conn.execute(
        """SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum  -- NULL: an expression
            WHERE i.indrelid = to_regclass(%s) AND i.indpred IS NULL AND k.n <= i.indnkeyatts
            GROUP BY i.indexrelid""", (table,)).fetchall()
    return dict(FK_CHECK_SETTINGS) if any(cols[: len(columns)] == columns for (cols,) in leading) else {}



class StreamedRestore:
    """One pass over the archive:

    - pre-data first: `pg_restore --section=pre-data` of the header+TOC file (definitions live in the TOC);
    - a feeder thread decompresses the stored dump into `pg_restore --data-only --file=-` (which turns the
      archive's one-chunk-per-row data blocks into plain COPY text, at C speed), and a splitter thread cuts that
      text into one spool per table (in memory up to ROWS_IN_MEMORY, then in temp files);
    - `jobs` worker threads, each with one connection, run tasks as their inputs become ready, loads first: load
      a table (its rows have started to arrive), build an index or add a constraint (its definition from the
      TOC, once the tables it depends on are loaded), ANALYZE a table (once its indexes and constraints are
      in), sequence values (`pg_restore` of those entries). Tasks on one table never overlap, except index
      builds, which take compatible locks;
    - then the post-data entries left (triggers, comments, materialized view data, partition index attachments,
      anything that depends on them) go to one `pg_restore -j` in pg_restore's own order, and what has no
      statistics yet (partitioned parents, materialized views) is analyzed.
    """

    def __init__(self, postgres: PostgresResource, url: str, target_db: str, reader: ArchiveReader, tmpdir: str, *,
                 jobs: int, redact: Redactor, created: list[bool], rows: dict[str, int]) -> None:
        self.postgres, self.url, self.target_db, self.reader = postgres, url, target_db, reader
        self.tmpdir, self.jobs, self.redact, self.created = tmpdir, jobs, redact, created
        self.target_url = ConnInfo.parse(url).url(target_db)
        entries = reader.entries
        self.by_id = {e.dump_id: e for e in entries}
        for e in entries:
            if e.had_dumper and not (e.desc == "TABLE DATA" and e.copy_stmt.startswith("COPY ")):
                raise UnsupportedArchive(f"entry {e.dump_id} ({e.desc} {e.tag}) has data this path does not load")
        encoding = next((e.defn for e in entries if e.desc == "ENCODING"), "")
        if "'UTF8'" not in encoding:  # names and COPY text are handled as UTF-8 here; pg_restore handles the rest
            raise UnsupportedArchive(f"archive encoding is not UTF8 ({encoding.strip() or 'none'})")
        self.data = [e for e in entries if e.desc == "TABLE DATA" and e.had_dumper]
        self.table_of_data = {e.dump_id: next((d for d in e.deps if self.by_id.get(d) and self.by_id[d].desc != "TABLE DATA"),
                                              e.dump_id) for e in self.data}
        self.data_of_table = {t: d for d, t in self.table_of_data.items()}
        self.failed = threading.Event()
        self.connections: list[psycopg.Connection] = []  # the workers', for _fail to cancel what runs on them
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.toc_path = os.path.join(tmpdir, "toc.pgc")
        self.pg_restore = pg_restore_runner(postgres, url, target_db, self.toc_path, redact)  # on the header+TOC
        self.settings = [e.defn for e in entries if e.desc in ("ENCODING", "STDSTRINGS", "SEARCHPATH") and e.defn]
        self.analyzed: set[str] = set()
        self.finished: dict[tuple[str, int], float] = {}  # task key -> when it finished (time.monotonic)
        budget = Budget(ROWS_IN_MEMORY)
        self.spools = {e.dump_id: Spool(os.path.join(tmpdir, f"data-{e.dump_id}.copy"), budget) for e in self.data}
        self.tasks = self._tasks(self.spools, {e.dump_id: rows.get(copy_table(e), 0) for e in self.data})

    # -- the plan -------------------------------------------------------------------------------------
    def _tasks(self, spools: dict[int, Spool], rows: dict[int, int]) -> list[Task]:
        entries = self.reader.entries
        tasks: list[Task] = []
        early: dict[int, frozenset[int]] = {}  # post-data entry -> tables it locks

        def load(dump_id: int) -> tuple[str, int]:  # task keys: names may repeat across schemas, dump ids do not
            return ("load", dump_id)

        def entry(dump_id: int) -> tuple[str, int]:
            return ("entry", dump_id)

        def label(e: TocEntry) -> str:
            return f"{e.desc} {e.namespace + '.' if e.namespace else ''}{e.tag}"

        def settled(d: int) -> bool:  # a dependency that is done once its tables are loaded and its early entries run
            dep = self.by_id.get(d)
            if dep is None or d in self.data_of_table or d in early:
                return True
            # a table without data of its own (a partitioned parent...), a view, a post-data entry left for the end
            return dep.section != SECTION_POST_DATA and dep.desc not in _RELATIONS

        for e in entries:  # in TOC order: an entry's dependencies come before it
            if e.section == SECTION_POST_DATA and e.desc in EARLY_POST_DATA and all(settled(d) for d in e.deps):
                early[e.dump_id] = frozenset(
                    {d for d in e.deps if d in self.data_of_table}
                    | {t for d in e.deps if d in early for t in early[d]})
        for e in self.data:
            table = self.table_of_data[e.dump_id]
            # loads first, in archive order (the order their rows arrive in)
            tasks.append(Task(load(e.dump_id), f"loading {copy_table(e)}", self._loader(e, spools[e.dump_id]), set(),
                               frozenset({table}),
                               rank=(0, len(tasks)), ready=lambda s=spools[e.dump_id]: s.started))
        for dump_id, locks in early.items():
            e = self.by_id[dump_id]
            needs = {load(self.data_of_table[d]) for d in e.deps if d in self.data_of_table}
            needs |= {entry(d) for d in e.deps if d in early}
            if e.desc == "FK CONSTRAINT":  # after its tables' indexes, as in pg_restore: the check may use them
                needs |= {entry(d) for d, on in early.items() if on & locks and self.by_id[d].desc != "FK CONSTRAINT"}
            # then the biggest tables' indexes and constraints: the longest chains of work after the last load
            weight = max((rows.get(self.data_of_table[t], 0) for t in locks), default=0)
            tasks.append(Task(entry(dump_id), label(e), self._ddl(e), needs, locks, shared=e.desc == "INDEX",
                               rank=(1, -weight, e.desc != "CONSTRAINT")))
        for e in self.data:
            table = self.table_of_data[e.dump_id]
            needs = {load(e.dump_id)} | {entry(d) for d, locks in early.items() if table in locks}
            tasks.append(Task(("analyze", e.dump_id), f"ANALYZE {copy_table(e)}", self._analyzer(copy_table(e)), needs,
                               frozenset({table}), rank=(1, -rows.get(e.dump_id, 0), True)))
        misc = [e for e in entries if e.section == SECTION_DATA and not e.had_dumper and e.desc != "TABLE DATA"]
        if misc:  # sequence values and the like: definitions in the TOC, no data blocks
            tasks.append(Task(("misc", 0), "data entries without data blocks (sequence values...)",
                               self._pg_restore_entries(misc, "data"), set(), frozenset(), rank=(0, -1)))
        self.early = set(early)
        return tasks

    # -- task bodies ----------------------------------------------------------------------------------
    def _listing(self, name: str, entries: list[TocEntry]) -> str:
        """A `pg_restore --use-list` file of these entries, in this order."""
        path = os.path.join(self.tmpdir, name)
        with open(path, "w") as f:
            f.writelines(e.list_line() + "\n" for e in entries)
        return path

    def _pg_restore_entries(self, entries: list[TocEntry], section: str):
        def run(_conn) -> None:
            self.pg_restore(f"--section={section}", f"--use-list={self._listing('misc.list', entries)}")

        return run

    def _ddl(self, entry: TocEntry):
        """An index or constraint entry, run as pg_restore would run it (its definition, in its tablespace), on the
        worker's connection: no process and no new backend per entry."""
        def run(conn_factory) -> None:
            conn = conn_factory()
            settings = fk_check_settings(conn, entry.defn) if entry.desc == "FK CONSTRAINT" else {}
            cur = psycopg.ClientCursor(conn)  # simple query protocol: a definition may hold several statements
            cur.execute(sql.SQL("SET default_tablespace = {}").format(
                sql.Identifier(entry.tablespace) if entry.tablespace else sql.Literal("")))
            for name, value in settings.items():
                cur.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
            cur.execute(entry.defn)
            for name in settings:
                cur.execute(sql.SQL("RESET {}").format(sql.Identifier(name)))

        return run

    def _loader(self, entry: TocEntry, spool: Spool):
        copy_stmt = entry.copy_stmt.strip().removesuffix(";")
        table = copy_table(entry)

        def run(conn_factory) -> None:
            conn = conn_factory()
            with conn.transaction():
                kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
                # A table truncated in this transaction may be loaded frozen. Only an empty one is truncated: an
                # extension's configuration table already holds the rows CREATE EXTENSION put there.
                freeze = (kind is not None and kind[0] == "r"
                          and not conn.execute(f"SELECT EXISTS (SELECT FROM ONLY {table})").fetchone()[0])
                if freeze:
                    conn.execute(f"TRUNCATE ONLY {table}")
                with conn.cursor().copy(copy_stmt + (" WITH (FREEZE)" if freeze else "")) as copy:
                    for block in spool.chunks(self.failed):
                        copy.write(block)

        return run

    def _analyzer(self, table: str):
        def run(conn_factory) -> None:
            conn_factory().execute(f"ANALYZE {table}")
            self.analyzed.add(table)

        return run

    # -- the stream -----------------------------------------------------------------------------------
    def _feed(self, proc: subprocess.Popen) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(self.reader.prefix)
            for chunk in self.reader.rest():
                if self.failed.is_set():
                    break
                proc.stdin.write(chunk)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # pg_restore stopped reading: the splitter reports why
        except StoreError as exc:
            self._fail(BackupError(f"reading the stored backup failed: {exc}"))
            proc.kill()
        except BaseException as exc:
            self._fail(exc)
            proc.kill()

    def _fail(self, exc: BaseException) -> None:
        """Record the first and later errors, stop every part: no new tasks, statements running on the workers'
        connections cancelled (a long index build would otherwise run to its end)."""
        with self.lock:
            self.errors.append(exc)
            first = not self.failed.is_set()
            self.failed.set()
            connections = list(self.connections) if first else []
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=5)

    def _connect(self) -> psycopg.Connection:
        """A worker's connection, with pg_restore's session settings; _fail cancels what runs on it."""
        conn = self.postgres.connect(self.target_url, autocommit=True, options=RESTORE_OPTIONS)
        with self.lock:
            self.connections.append(conn)
        cur = psycopg.ClientCursor(conn)
        for stmt in (*SESSION_SETTINGS, *self.settings):  # + client_encoding, std strings, search_path
            cur.execute(stmt)
        return conn

    def _disconnect(self, conn: psycopg.Connection) -> None:
        with self.lock:
            self.connections.remove(conn)
        conn.close()

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        spools = self.spools
        with open(self.toc_path, "wb") as f:
            f.write(self.reader.prefix)
        create_database(self.postgres, self.url, self.target_db, self.created)
        phases = {}
        self.pg_restore("--section=pre-data")
        phases["pre_data_s"] = time.monotonic() - t0
        listing = self._listing("data.list", self.data)
        proc = subprocess.Popen([self.postgres.binary("pg_restore"), "--data-only", f"--use-list={listing}", "--file=-"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for pipe in (proc.stdin, proc.stdout):  # fewer, larger pipe transfers (Linux; the default is 64 kB)
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        err: list[str] = []
        err_thread = stderr_reader(proc, err)
        threads = [threading.Thread(target=self._feed, args=(proc,), daemon=True),
                   threading.Thread(target=split, args=(proc, self.data, [spools[e.dump_id] for e in self.data], err, err_thread,
                                                       self.redact, self._fail), daemon=True)]
        for t in threads:
            t.start()
        try:
            schedule(self.tasks, jobs=self.jobs, failed=self.failed, fail=self._fail, connect=self._connect,
                     disconnect=self._disconnect, finished=self.finished, redact=self.redact)
        finally:
            if self.failed.is_set():
                proc.kill()
            for t in threads:
                t.join()
            err_thread.join(5)
            for spool in spools.values():
                spool.close()
        if self.errors:
            raise next((e for e in self.errors if not str(e).startswith("stopped:")), self.errors[0])
        # wall time until every table's rows were in, then until its indexes, constraints and statistics were
        rows_in = max((t for key, t in self.finished.items() if key[0] == "load"), default=t0)
        phases["rows_in_s"] = rows_in - t0 - phases["pre_data_s"]
        phases["indexes_constraints_analyze_s"] = time.monotonic() - rows_in
        t = time.monotonic()
        # The post-data entries not run yet, with the comments and labels that belong to post-data: an entry
        # without a section of its own (COMMENT, SECURITY LABEL) is in the section of the entry before it in the
        # TOC, which pg_restore would judge by the list's order instead.
        section, rest = SECTION_PRE_DATA, []
        for e in self.reader.entries:
            section = e.section if e.section != SECTION_NONE else section
            if section == SECTION_POST_DATA and e.dump_id not in self.early:
                rest.append(e)
        if rest:
            self.pg_restore(f"--use-list={self._listing('post-data-rest.list', rest)}", f"--jobs={self.jobs}")
        phases["other_post_data_s"] = time.monotonic() - t
        t = time.monotonic()
        analyze_all(self.postgres, self.target_url, self.jobs, skip=self.analyzed)
        phases["analyze_rest_s"] = time.monotonic() - t
        return {k: round(v, 3) for k, v in phases.items()} | {"path": "streamed", "tables_loaded": len(self.data)}
