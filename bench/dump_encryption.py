#!/usr/bin/env python
"""Benchmark: the cost of encrypting dumps at rest, plain vs encrypted backup of the same database, same run.

    .venv/bin/python bench/dump_encryption.py [--mb 300] [--runs 3]

Starts its own embedded stack (LocalStack in a temp dir), generates `opsbench_enc` server-side, warms the cache with
one untimed backup, then takes `--runs` plain and `--runs` encrypted backups, interleaved, each one the full
`take_backup` (dump + zstd [+ AES-256-GCM] + sha256 + full verification read). Prints best and worst of each, the
ratio encrypted/plain of the best and of the worst, and the load average at each run's start. A benchmark, not a
test: wall times on a shared machine vary; compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from ops_pipeline import backup as backups
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.postgres import ConnInfo, PostgresResource


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300, help="approximate table data size")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-enc-"))
    os.chmod(tmp, 0o755)
    stack = LocalStack(state_dir=str(tmp / "stack"))
    try:
        services = stack.ensure_running()
        url = ConnInfo.parse(services.database_url).url("opsbench_enc")
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS opsbench_enc")
            conn.execute("CREATE DATABASE opsbench_enc")
        rows = args.mb * 1_000_000 // 120
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, n numeric, at timestamptz, note text)")
            conn.execute("INSERT INTO t SELECT i, random() * 1e6, now() - i * interval '1 s', md5(i::text) || "
                         "md5((i * 7)::text) FROM generate_series(1, %s) i", (rows,))
            conn.execute("VACUUM ANALYZE t")
        os.environ["BENCH_DUMP_KEY"] = secrets.token_urlsafe(48)
        pg = PostgresResource()
        stores = {"plain": BackupStore(local_dir=str(tmp / "plain")),
                  "encrypted": BackupStore(local_dir=str(tmp / "enc"), cipher_key_from="env:BENCH_DUMP_KEY")}
        backups.take_backup(pg, stores["plain"], url, trigger="manual", environment="bench", log=lambda m: None)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in stores}
        for _ in range(args.runs):
            for kind, store in stores.items():
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                m = backups.take_backup(pg, store, url, trigger="manual", environment="bench", log=lambda m: None)
                times[kind].append((time.monotonic() - t0, load))
                print(f"{kind:9} {times[kind][-1][0]:6.2f} s  load {load:.2f}  dump {m['dump_bytes'] / 1e6:.0f} MB "
                      f"stored {m['stored_bytes'] / 1e6:.0f} MB", flush=True)
        best = {k: min(t for t, _ in v) for k, v in times.items()}
        worst = {k: max(t for t, _ in v) for k, v in times.items()}
        print(f"best:  plain {best['plain']:.2f} s, encrypted {best['encrypted']:.2f} s, "
              f"ratio {best['encrypted'] / best['plain']:.3f}")
        print(f"worst: plain {worst['plain']:.2f} s, encrypted {worst['encrypted']:.2f} s, "
              f"ratio {worst['encrypted'] / worst['plain']:.3f}")
        print(f"load average now {os.getloadavg()}")
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
