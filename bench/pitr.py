#!/usr/bin/env python
"""Benchmark: the release's safety point in archive mode (a restore point, its WAL archived) against today's
pre-release dump, the recovery point objective under steady writes, and the point-in-time restore against today's
streamed restore of the same data.

    .venv/bin/python bench/pitr.py [--gb 1,5] [--runs 3] [--archive-timeout 5] [--rpo-seconds 30] [--rate 200]

What it does, in one run:
  1. starts Debian's PostgreSQL 15 (tests/pg15.py: as `opspg`, fsync off) archiving its WAL with pgBackRest into a
     repository in /tmp (the embedded PostgreSQL 16 is not supported by Debian's pgBackRest 2.45);
  2. for each size of --gb (ascending): generates bench/backup.py's realistic database `opsbench_src` (products,
     customers, orders, order_items, events; 10 indexes, 4 FKs) to that pg_database_size, takes a full base backup
     (untimed here, printed), then times `--runs` times, interleaved:
        dump          take_backup(...): today's pre-release backup (pg_dump -> zstd -> store, read back, verified)
        restore point create_safety_point(...): pg_create_restore_point + pg_switch_wal + wait until archived
  3. RPO: a writer commits --rate rows/s for --rpo-seconds with archive_timeout = --archive-timeout; every 0.25 s the
     age of the oldest committed row whose WAL segment is not archived yet is sampled (0 when all is archived);
  4. restores at the largest size: the point-in-time restore to the latest WAL (new data folder, recovery, promote)
     against restore_into(...) of a dump taken at the same moment; both checked against the source's row counts;
  5. prints every run (wall time, load average at its start), the best and worst, and the ratios of the bests.

A benchmark, not a test: on this shared 2-core machine wall times vary by 20% and more between runs.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg
from psycopg import sql

from bench.backup import ROWS_PER_GB, database_size, fill_source, source_facts
from ops_pipeline import backup as backups
from ops_pipeline.backup import archiving, pitr
from ops_pipeline.backup.pgbackrest import PgBackRest, Repository, segment_number
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource
from tests import pg15

SOURCE_DB = "opsbench_src"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def folder(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        user = pwd.getpwnam("opspg")
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


class Runs:
    def __init__(self, name: str) -> None:
        self.name, self.runs = name, []

    def add(self, seconds: float, load: float) -> None:
        self.runs.append((seconds, load))

    @property
    def best(self) -> float:
        return min(s for s, _ in self.runs)

    @property
    def worst(self) -> float:
        return max(s for s, _ in self.runs)

    def text(self) -> str:
        return (f"{self.name:<44} best {self.best:8.3f} s  worst {self.worst:8.3f} s  runs "
                + ", ".join(f"{s:.3f} (load {load:.1f})" for s, load in self.runs))


def generate(url: str, gb: float) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(SOURCE_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SOURCE_DB)))
    src = ConnInfo.parse(url).url(SOURCE_DB)
    rows = {t: max(100, int(n * gb)) for t, n in ROWS_PER_GB.items()}
    t0 = time.monotonic()
    fill_source(src, rows)
    size = database_size(src)
    log(f"{SOURCE_DB}: {size / 1e9:.3f} GB generated in {time.monotonic() - t0:.1f} s")
    return {"size": size, "facts": source_facts(src)["facts"]}


def rpo(url: str, tool: PgBackRest, seconds: float, rate: float) -> dict:
    """Steady writes; sample the age of the oldest committed row whose WAL segment is not archived yet."""
    db = ConnInfo.parse(url).url(SOURCE_DB)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS rpo_probe (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), "
                     "pad text DEFAULT repeat('x', 500))")
    commits: list[tuple[float, tuple[int, int]]] = []
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            next_at = time.monotonic()
            while not stop.is_set():
                conn.execute("INSERT INTO rpo_probe DEFAULT VALUES")
                seg = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
                commits.append((time.time(), segment_number(seg)))
                next_at += 1 / rate
                time.sleep(max(0.0, next_at - time.monotonic()))

    samples: list[float] = []
    t = threading.Thread(target=writer)
    t.start()
    end = time.monotonic() + seconds
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < end:
            time.sleep(0.25)
            done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
            frontier = segment_number(done) if done and len(done) == 24 else (0, 0)
            now = time.time()
            pending = next((at for at, seg in list(commits) if seg > frontier), None)
            samples.append(now - pending if pending else 0.0)
    stop.set()
    t.join()
    samples.sort()
    return {"samples": len(samples), "commits": len(commits), "max_s": samples[-1],
            "p50_s": statistics.median(samples), "p95_s": samples[int(len(samples) * 0.95) - 1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", default="1,5", help="database sizes, comma-separated (default 1,5)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--archive-timeout", type=int, default=5)
    ap.add_argument("--rpo-seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=200, help="rows per second of the steady writer")
    args = ap.parse_args()
    sizes = sorted(float(x) for x in args.gb.split(","))
    bindir = pg15.bindir_with("amcheck", tools=("pg_amcheck",))
    if bindir is None or not shutil.which("pgbackrest"):
        sys.exit("needs Debian's postgresql-15 and pgbackrest")
    log(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    results: list[tuple[float, int, Runs, Runs, float]] = []
    with pg15.cluster(bindir, prefix="ops-bench-pitr-") as server:
        repo, conf, store_dir = folder("ops-bench-pitr-repo-"), folder("ops-bench-pitr-conf-"), tempfile.mkdtemp()
        try:
            live = archiving.discover_server(server.url)
            tool = PgBackRest("bench", live, Repository(repo, retention_full=1), conf, log=lambda _l: None)
            tool.write_config()
            archiving.enable_archiving(server.url, tool, archive_timeout_s=args.archive_timeout, log=log)
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET max_wal_size = '4GB'")
                conn.execute("ALTER SYSTEM SET shared_buffers = '256MB'")
            server.restart()
            tool.stanza_create()
            tool.check()
            pg = PostgresResource(bin_dir=str(bindir))
            store = BackupStore(local_dir=store_dir)
            src = ConnInfo.parse(server.url).url(SOURCE_DB)
            facts: dict = {}
            for gb in sizes:
                gen = generate(server.url, gb)
                facts = gen["facts"]
                t0 = time.monotonic()
                tool.backup("full")
                full_s = time.monotonic() - t0
                log(f"full base backup at {gen['size'] / 1e9:.2f} GB: {full_s:.1f} s (once; nightly, not per release)")
                dump, point = Runs("dump (take_backup, verified)"), Runs("restore point (archived)")
                for i in range(args.runs):
                    load, t0 = os.getloadavg()[0], time.monotonic()
                    m = backups.take_backup(pg, store, src, trigger="pre-release", environment="bench", log=lambda _m: None)
                    dump.add(time.monotonic() - t0, load)
                    store.delete_backup(m["scope"], m["id"])
                    load, t0 = os.getloadavg()[0], time.monotonic()
                    archiving.create_safety_point(server.url, f"bench-{gb}-{i}", log=lambda _m: None)
                    point.add(time.monotonic() - t0, load)
                results.append((gb, gen["size"], dump, point, full_s))
            log(f"RPO under {args.rate:.0f} rows/s for {args.rpo_seconds:.0f} s, archive_timeout {args.archive_timeout} s")
            rp = rpo(server.url, tool, args.rpo_seconds, args.rate)
            # restores at the largest size: the same data both ways
            with psycopg.connect(src, autocommit=True) as conn:
                conn.execute("DROP TABLE rpo_probe")
            manifest = backups.take_backup(pg, store, src, trigger="manual", environment="bench", log=lambda _m: None)
            archiving.create_safety_point(server.url, "bench-restore", log=lambda _m: None)
            t0 = time.monotonic()
            target = f"opsbench_r{int(time.time())}"
            backups.restore_into(pg, store, manifest, server.url, target, log=lambda _m: None)
            streamed_s = time.monotonic() - t0
            got = source_facts(ConnInfo.parse(server.url).url(target))["facts"]
            backups.drop_database(pg, server.url, target)
            t0 = time.monotonic()
            restored = pitr.restore(tool, live, server.url, pitr.Target("latest"), log=lambda _m: None)
            pitr_s = time.monotonic() - t0
            got_pitr = source_facts(restored.url(SOURCE_DB))["facts"]
            restored.discard()
            ok = "match" if got == facts == got_pitr else f"DIFFER: {got} / {got_pitr} / {facts}"
        finally:
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(conf, ignore_errors=True)
            shutil.rmtree(store_dir, ignore_errors=True)

    print("\n== release safety point: restore point vs today's dump (same run, interleaved)")
    for gb, size, dump, point, full_s in results:
        print(f"-- {size / 1e9:.2f} GB (asked {gb} GB); full base backup {full_s:.1f} s")
        print("   " + dump.text())
        print("   " + point.text())
        print(f"   ratio dump / restore point (bests): {dump.best / point.best:.1f}x")
    if len(results) > 1:
        print(f"-- restore point best at {results[0][1] / 1e9:.2f} GB: {results[0][3].best:.3f} s, at "
              f"{results[-1][1] / 1e9:.2f} GB: {results[-1][3].best:.3f} s")
    print(f"\n== RPO under steady writes ({rp['commits']} commits, {rp['samples']} samples, archive_timeout "
          f"{args.archive_timeout} s): p50 {rp['p50_s']:.2f} s, p95 {rp['p95_s']:.2f} s, max {rp['max_s']:.2f} s")
    print(f"\n== restore at {results[-1][1] / 1e9:.2f} GB: streamed restore of a dump {streamed_s:.1f} s, point-in-time "
          f"restore to latest {pitr_s:.1f} s (ratio {streamed_s / pitr_s:.2f}x); row counts vs source: {ok}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
