"""Soak: release/rollback cycles in a row on one environment, counting what could leak (benchmark, not a test).

    .venv/bin/python bench/soak.py               # 50 cycles
    .venv/bin/python bench/soak.py --cycles 3    # quick check that it works

On the embedded local stack (real PostgreSQL, Redis, PM2, nginx) in its own state folder, one environment on the
PM2 target (2 instances behind nginx) is released once (v0, the baseline), then every cycle releases a new version
(lint and test skipped, the app's build reused; every version has its own build output, so its own artifact) and
runs the rollback job back to the last good version, both through the job definitions with execute_in_process on
one persistent Dagster instance. Before, every 10 cycles and after, it counts processes of the environment by kind,
listening TCP ports, PM2 entries, release folders and artifacts, PostgreSQL connections to the app database,
Redis clients, files in the temp and state folders, disk usage and RSS. The bench runs with its own TMPDIR, which
every process it starts inherits, so "temp files" are the stack's own.

Exit 1 on a leak: any growth of processes, listening ports, PM2 entries or database connections / Redis clients
between before and after, release folders above the retention (target.pm2.keep_releases), artifacts beyond what
the retention keeps (the newest keep_releases besides those of the release folders), leftover staging or temp folders, or temp files growing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workdir import copy_example_app, dagster_home, isolated_state, npm_ci  # noqa: E402

STATE = isolated_state("ops-bench-soak-")
TMP = Path(tempfile.mkdtemp(prefix="ops-bench-soak-tmp-"))
TMP.chmod(0o777)  # the opspg server user's tools may write there too
os.environ["TMPDIR"] = str(TMP)
tempfile.tempdir = None  # re-read TMPDIR

import dagster as dg  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

from ops_pipeline.definitions import defs  # noqa: E402
from ops_pipeline.platform.local_stack import LocalStack, free_port  # noqa: E402

ENV = "soak"
KEEP_RELEASES = 5  # target.pm2.keep_releases (the default)
INSTANCES = 2
PM2 = ROOT / "tools" / "node_modules" / ".bin" / "pm2"
PM2_HOME = STATE / "envs" / ENV / "pm2"


def release_config(app: Path, version: str, port: int, build: bool) -> dict:
    commands = {"lint": "", "test": ""} | ({} if build else {"build": ""})
    return {"ops": {"verify_env": {"config": {
        "environment": ENV, "version": version, "app": {"path": str(app), "commands": commands},
        "target": {"kind": "pm2", "instances": INSTANCES, "port": port, "pm2": {"keep_releases": KEEP_RELEASES}},
        "gate": {"interval_s": 0.25, "deadline_s": 60}}}}}


def rollback_config() -> dict:
    return {"ops": {"plan_rollback": {"config": {"environment": ENV, "reason": "soak"}}}}


# ---- counting --------------------------------------------------------------------------------------------------
def _postmaster_pid() -> int | None:
    try:
        return int((STATE / "local" / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _redis_pid() -> int | None:
    try:
        return int((STATE / "local" / "redis" / "redis.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kind(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except psutil.Error:
        return "?"
    if "God Daemon" in cmd:
        return "pm2 daemon"
    if name.startswith("nginx"):
        return "nginx master" if "master" in cmd else "nginx worker"
    if name in ("postgres", "postmaster") or cmd.startswith("postgres:"):
        return "postgres (all)"
    if name.startswith("redis"):
        return "redis-server"
    if name == "node" or cmd.startswith("node "):
        return "node (app)"
    if name.startswith("python"):
        return "python (bench children)"
    return f"other: {name}"


def environment_processes() -> dict[int, str]:
    """Every process of this bench's world: its descendants, the postmaster's, and any process whose command line
    or environment names the state or temp folder (PM2 daemon, its apps, nginx, redis-server)."""
    me = psutil.Process()
    procs: dict[int, psutil.Process] = {c.pid: c for c in me.children(recursive=True)}
    servers = {_postmaster_pid(), _redis_pid()}  # redis-server's process title overwrites its environment
    markers = (str(STATE), str(TMP))
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == me.pid:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        hit = any(m in cmd for m in markers) or p.pid in servers
        if not hit:
            try:
                env = p.environ()
                hit = any(m in env.get(k, "") for k in ("OPS_STATE_DIR", "PM2_HOME", "TMPDIR") for m in markers)
            except psutil.Error:
                pass
        if hit:
            procs[p.pid] = p
            try:
                for c in p.children(recursive=True):
                    procs[c.pid] = c
            except psutil.Error:
                pass
    return {pid: _kind(p) for pid, p in procs.items()}


def _tree_stats(root: Path) -> tuple[int, int]:
    """(files, bytes on disk) under root; hard-linked files counted once."""
    files, seen, used = 0, set(), 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                used += st.st_blocks * 512
    return files, used


def _rss(pid: int | None) -> int:
    try:
        return psutil.Process(pid).memory_info().rss if pid else 0
    except psutil.Error:
        return 0


def pm2_entries() -> tuple[int, int]:
    """(entries, online) in the environment's PM2 daemon."""
    if not (PM2_HOME / "pm2.pid").exists():
        return 0, 0
    out = subprocess.run([str(PM2), "jlist"], capture_output=True, text=True, check=False, env={**os.environ, "PM2_HOME": str(PM2_HOME)}).stdout
    procs = json.loads(out[out.find("["):]) if "[" in out else []
    return len(procs), sum(1 for p in procs if p["pm2_env"].get("status") == "online")


def snapshot(stack: LocalStack) -> dict:
    s: dict = {}
    procs = environment_processes()
    for kind in sorted(set(procs.values())):
        s[f"processes: {kind}"] = sum(1 for k in procs.values() if k == kind)
    s["processes: total"] = len(procs)
    listening = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            listening.add(c.laddr.port)
    s["listening TCP ports"] = len(listening)
    me = psutil.Process()
    s["bench: open fds"] = me.num_fds()
    s["bench: TCP connections"] = len(me.net_connections(kind="tcp"))
    s["bench: threads"] = me.num_threads()
    s["PM2 entries"], s["PM2 entries online"] = pm2_entries()
    releases = STATE / "envs" / ENV / "app" / "releases"
    entries = list(releases.iterdir()) if releases.is_dir() else []
    s["release folders"] = sum(1 for d in entries if d.is_dir() and not d.name.startswith("."))
    s["release folders: hidden/temp"] = sum(1 for d in entries if d.name.startswith("."))
    store = STATE / "artifacts"
    art = list(store.iterdir()) if store.is_dir() else []
    s["artifacts"] = sum(1 for d in art if d.is_dir() and not d.name.startswith("."))
    held = set()
    for record in releases.glob("*/release.json") if releases.is_dir() else []:
        held.add(json.loads(record.read_text()).get("artifact_id"))
    s["artifacts: not in a release folder"] = sum(1 for d in art if d.is_dir() and not d.name.startswith(".") and d.name not in held)
    s["artifacts: .staging/.tmp"] = sum(1 for d in art if d.name.startswith((".staging", ".tmp")))
    deps = store / ".deps"
    s["artifacts: dependency caches"] = sum(1 for _ in deps.iterdir()) if deps.is_dir() else 0
    env_dir = STATE / "envs" / ENV
    s["PM2 app files"] = sum(1 for _ in (env_dir / "pm2-apps").glob("*.json"))
    s["instance log files"] = sum(1 for _ in (env_dir / "logs").glob("*.log"))
    backups = STATE / "backups"
    s["backups (files)"] = _tree_stats(backups)[0] if backups.is_dir() else 0
    svc = stack.services()
    with psycopg.connect(svc.admin_database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT datname, count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                            "AND backend_type = 'client backend' GROUP BY 1").fetchall()
    by_db = {d: n for d, n in rows}
    s["PostgreSQL connections: app"] = by_db.get("app", 0)
    s["PostgreSQL connections: all"] = sum(by_db.values())
    r = redis.Redis.from_url(svc.redis_url)
    try:
        s["Redis clients"] = len(r.client_list()) - 1
    finally:
        r.close()
    s["temp dir: files"], _ = _tree_stats(TMP)
    s["temp dir: entries"] = sum(1 for _ in TMP.iterdir())
    s["state dir: files"], s["state dir: disk MB"] = _tree_stats(STATE)
    s["state dir: files (no backups, dagster, db)"] = s["state dir: files"] - sum(
        _tree_stats(STATE / d)[0] for d in ("backups", "dagster_home", "local"))
    s["dagster home: disk MB"] = _tree_stats(STATE / "dagster_home")[1]
    s["database: disk MB"] = _tree_stats(STATE / "local" / "pgdata")[1] if os.access(STATE / "local" / "pgdata", os.R_OK) else 0
    pm2_pid = int((PM2_HOME / "pm2.pid").read_text()) if (PM2_HOME / "pm2.pid").exists() else None
    nginx_pid = next((pid for pid, k in procs.items() if k == "nginx master"), None)
    s["RSS MB: PM2 daemon"] = _rss(pm2_pid)
    s["RSS MB: nginx master"] = _rss(nginx_pid)
    s["RSS MB: app instances (sum)"] = sum(_rss(pid) for pid, k in procs.items() if k == "node (app)")
    s["RSS MB: postgres (sum)"] = sum(_rss(pid) for pid, k in procs.items() if k == "postgres (all)")
    s["RSS MB: bench"] = _rss(me.pid)
    for k in list(s):
        if "MB" in k:
            s[k] = round(s[k] / 1e6, 1)
    s["load average (1 min)"] = round(os.getloadavg()[0], 2)
    return s


# ---- verdict ---------------------------------------------------------------------------------------------------
NO_GROWTH = ("processes:", "listening TCP ports", "PM2 entries", "PostgreSQL connections", "Redis clients",
             "temp dir:", "artifacts: .staging/.tmp", "release folders: hidden/temp")
# The retention: release folders are pruned to keep_releases; artifacts to the newest keep_releases plus those
# the release folders hold (prune_artifacts in ops_pipeline/release/ops/artifact.py).


def leaks(before: dict, after: dict, cycles: int, steady: tuple[str, dict] | None) -> list[str]:
    found = []
    for k in sorted(set(before) | set(after)):
        b, a = before.get(k, 0), after.get(k, 0)
        if k.startswith(NO_GROWTH) and a > b:
            found.append(f"{k}: {b} -> {a}")
    if after["release folders"] > KEEP_RELEASES:
        found.append(f"release folders: {after['release folders']} > keep_releases {KEEP_RELEASES}")
    if after["artifacts: not in a release folder"] > KEEP_RELEASES:
        found.append(f"artifacts no release folder holds: {after['artifacts: not in a release folder']} > "
                     f"keep_releases {KEEP_RELEASES}")
    if after["PM2 app files"] > 2 * INSTANCES:
        found.append(f"PM2 app files: {after['PM2 app files']} > {2 * INSTANCES} (the serving and the removed instances' of the last rollout)")
    if after["instance log files"] > INSTANCES * (2 + KEEP_RELEASES):
        found.append(f"instance log files: {after['instance log files']} > {INSTANCES * (2 + KEEP_RELEASES)} (what the "
                     "release's prune keeps: the serving instances' and keep_releases x instances others; + the rollback's)")
    if steady is not None:
        k = "state dir: files (no backups, dagster, db)"
        if after[k] - steady[1][k] > 100:
            found.append(f"{k}: {steady[1][k]} at {steady[0]} -> {after[k]} after (retention should hold it steady)")
    if after["bench: open fds"] - before["bench: open fds"] >= max(cycles, 5):
        found.append(f"bench: open fds: {before['bench: open fds']} -> {after['bench: open fds']} (one or more per cycle)")
    return found


def print_table(snaps: list[tuple[str, dict]]) -> None:
    keys = list(dict.fromkeys(k for _, s in snaps for k in s))
    head = f"{'':<44}" + "".join(f"{label:>10}" for label, _ in snaps) + f"{'growth':>10}"
    print(head)
    first, last = snaps[0][1], snaps[-1][1]
    for k in keys:
        cells = "".join(f"{s.get(k, 0):>10}" for _, s in snaps)
        g = last.get(k, 0) - first.get(k, 0)
        g = round(g, 1) if isinstance(g, float) else g
        print(f"{k:<44}{cells}{('+' if g > 0 else '') + str(g):>10}")


def set_build_output(app: Path, version: str) -> None:
    """A new version has its own build output (so its own artifact), without running the build again."""
    (app / "dist" / "build-info.json").write_text(json.dumps({"version": version, "at": time.time()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--every", type=int, default=10, help="count every N cycles")
    parser.add_argument("--keep", action="store_true", help="leave the state folder and the stack in place")
    args = parser.parse_args()
    home = dagster_home(STATE)
    app = copy_example_app(STATE / "app-src")
    stack = LocalStack()
    port = free_port()
    snaps: list[tuple[str, dict]] = []
    durations: list[tuple[float, float]] = []
    failures: list[str] = []
    load_start = os.getloadavg()
    try:
        stack.ensure_running()
        npm_ci(app)
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            release, rollback = defs.get_job_def("release"), defs.get_job_def("rollback")
            t0 = time.monotonic()
            res = release.execute_in_process(run_config=release_config(app, "v0", port, build=True), instance=instance,
                                             raise_on_error=False)
            assert res.success, "baseline release v0 failed"
            print(f"baseline v0 released on port {port} in {time.monotonic() - t0:.1f} s (with the build)", flush=True)
            snaps.append(("before", snapshot(stack)))
            for i in range(1, args.cycles + 1):
                version = f"v{i}"
                set_build_output(app, version)
                t0 = time.monotonic()
                ok = release.execute_in_process(run_config=release_config(app, version, port, build=False),
                                                instance=instance, raise_on_error=False).success
                t1 = time.monotonic()
                ok_rb = rollback.execute_in_process(run_config=rollback_config(), instance=instance,
                                                    raise_on_error=False).success
                t2 = time.monotonic()
                durations.append((t1 - t0, t2 - t1))
                if not (ok and ok_rb):
                    failures.append(f"cycle {i}: release {'ok' if ok else 'FAILED'}, rollback {'ok' if ok_rb else 'FAILED'}")
                print(f"cycle {i}: release {version} {t1 - t0:.1f} s ({'ok' if ok else 'FAILED'}), rollback "
                      f"{t2 - t1:.1f} s ({'ok' if ok_rb else 'FAILED'}), load {os.getloadavg()[0]:.2f}", flush=True)
                if i % args.every == 0 and i != args.cycles:
                    snaps.append((f"cycle {i}", snapshot(stack)))
            snaps.append(("after", snapshot(stack)))
    finally:
        if not args.keep:
            subprocess.run([str(PM2), "kill"], capture_output=True, check=False, env={**os.environ, "PM2_HOME": str(PM2_HOME)})
            try:
                os.kill(int((STATE / "envs" / ENV / "nginx" / "nginx.pid").read_text()), 15)
            except (OSError, ValueError):
                pass
            stack.stop()
            import shutil
            shutil.rmtree(STATE, ignore_errors=True)
            shutil.rmtree(TMP, ignore_errors=True)
        else:
            print(f"kept: {STATE} (TMPDIR {TMP})")
    load_end = os.getloadavg()

    print()
    print(f"soak: {args.cycles} release/rollback cycles on one environment (PM2 target, 2 instances, embedded stack)")
    print_table(snaps)
    if durations:
        for label, xs in (("release", [d[0] for d in durations]), ("rollback", [d[1] for d in durations]),
                          ("cycle", [d[0] + d[1] for d in durations])):
            print(f"{label + ' duration:':<20} best {min(xs):5.1f} s  median {statistics.median(xs):5.1f} s  worst {max(xs):5.1f} s")
        n = len(durations) // 5
        if n:
            first5 = statistics.median(d[0] + d[1] for d in durations[:n])
            last5 = statistics.median(d[0] + d[1] for d in durations[-n:])
            print(f"cycle median, first fifth vs last fifth: {first5:.1f} s vs {last5:.1f} s")
    print(f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, "
          f"at end {'/'.join(f'{x:.2f}' for x in load_end)} ({os.cpu_count()} cores)")
    # Retention holds the state folder steady once it is full: compared from the first count at or past cycle 10.
    steady = next(((label, s) for label, s in snaps[1:-1] if int(label.split()[1]) >= 2 * KEEP_RELEASES), None)
    found = leaks(snaps[0][1], snaps[-1][1], args.cycles, steady) if len(snaps) >= 2 else ["no after snapshot"]
    found += failures
    print("\nleaks: " + ("none" if not found else "\n  " + "\n  ".join(found)))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
