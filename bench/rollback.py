"""Automatic rollback speed under load, with and without a warm standby (benchmark, not a test).

    .venv/bin/python bench/rollback.py [--rate 200] [--runs 3] [--standby-s 300] [--modes standby,redeploy]

A real dagster-daemon (sensors, run queue) runs on a temporary instance. For each run, a new environment gets v1
and then v2 of the example app on PM2; v2 has a latent fault: its /health starts answering 503 when a file appears
(only its health answers break, so any failed user request is the rollback's fault). Under a constant load on
GET /items the file is created, and the benchmark measures the time from the first failing health probe (its own
probe, every 50 ms) to every request served by v1: the first of the public requests (a probe of GET /items every
50 ms, fresh connection, version from X-App-Version) after which every one was answered by v1 until the rollback
run finished. Two modes, interleaved in the same run:

* standby: `target.standby_s` > 0. v1's instances wait warm out of traffic after v2's release; the health watch
  switches the traffic to them itself (one nginx reload), and the rollback run it requests stops v2;
* redeploy: `target.standby_s` 0, today's way: the rollback run redeploys v1 (new processes).

Targets: standby <= 8 s at 200 req/s, redeploy <= 15 s; 0 failed requests. Best and worst of `--runs` per mode,
their ratio, and the load average are printed; it exits 0 either way (a benchmark reports, it does not assert).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workdir import copy_example_app, isolated_state, npm_ci  # noqa: E402

STATE = isolated_state("ops-bench-rb-")

import httpx  # noqa: E402

from bench.loadgen import Load  # noqa: E402
from ops_pipeline.platform.local_stack import LocalStack, free_port  # noqa: E402
from ops_pipeline.release.status import stop as stop_environment  # noqa: E402
from tests import app_variants  # noqa: E402
from tests.e2e.servers import DagsterServers  # noqa: E402

STANDBY_TARGET_S, REDEPLOY_TARGET_S = 8.0, 15.0


def release_config(app: Path, env: str, version: str, port: int, standby_s: float) -> dict:
    return {"ops": {"verify_env": {"config": {
        "environment": env, "version": version, "app": {"path": str(app), "commands": {"lint": "", "test": ""}},
        "target": {"kind": "pm2", "instances": 2, "port": port, "standby_s": standby_s}, "gate": {"interval_s": 0.5}}}}}


def health_status(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, headers={"Connection": "close"}).status_code
    except httpx.HTTPError:
        return None


class Served:
    """GET /items every 50 ms on a fresh connection: (time, version or error) of each answer."""

    def __init__(self, port: int) -> None:
        self.port, self.samples, self._stop = port, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/items?limit=1", timeout=2, headers={"Connection": "close"})
                self.samples.append((t, r.headers.get("X-App-Version") if r.status_code < 300 else f"HTTP {r.status_code}"))
            except httpx.HTTPError as exc:
                self.samples.append((t, type(exc).__name__))
            time.sleep(0.05)

    def __enter__(self) -> Served:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def all_old_since(self, old: str) -> float | None:
        """When the streak of answers from `old` that lasts to the end began (None: the last answer was not `old`)."""
        since = None
        for t, version in self.samples:
            if version == old:
                since = t if since is None else since
            else:
                since = None
        return since


def make_v2(v1: Path, dest: Path, break_file: Path) -> Path:
    shutil.copytree(v1, dest, symlinks=True, ignore=shutil.ignore_patterns("node_modules", "dist"))
    subprocess.run(["cp", "-al", str(v1 / "node_modules"), str(dest / "node_modules")], check=True)
    app_variants.health_503_when_file_exists(break_file)(dest)
    return dest


def submit(servers: DagsterServers, job: str, run_config: dict, tags: dict, timeout_s: float = 180) -> str:
    """Submit through the webserver, once it has loaded the code location (it answers before it has)."""
    from dagster_graphql import DagsterGraphQLClientError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return servers.submit(job, run_config, tags)
        except DagsterGraphQLClientError as exc:
            if "NotFound" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def one_run(servers: DagsterServers, v1: Path, mode: str, index: int, standby_s: float, rate: float) -> dict:
    env, port = f"rb-{mode}-{index}", free_port()
    break_file = STATE / f"{env}-breaks"
    v2 = make_v2(v1, STATE / "apps" / f"v2-{env}", break_file)
    window = standby_s if mode == "standby" else 0.0
    try:
        for app, version in ((v1, "v1"), (v2, "v2")):
            run = servers.wait_run(submit(servers, "release", release_config(app, env, version, port, window),
                                          {"ops/environment": env}))
            if run.status.value != "SUCCESS":
                return {"mode": mode, "error": f"release {version}: {run.status.value}"}
        load_before = os.getloadavg()[0]
        with Load(port, rate=rate) as load, Served(port) as served:
            time.sleep(2)
            break_file.touch()
            broke_at = time.time()
            first_fail = None
            while first_fail is None and time.time() - broke_at < 30:
                if health_status(port) != 200:
                    first_fail = time.time()
                time.sleep(0.05)
            finished = None
            while finished is None and time.time() - broke_at < 180:
                rbs = servers.runs("rollback", {"ops/environment": env})
                if rbs and rbs[0].status.value in ("SUCCESS", "FAILURE", "CANCELED"):
                    finished = rbs[0]
                time.sleep(0.2)
            time.sleep(1)
        with servers.instance() as inst:
            rb = servers.runs("rollback", {"ops/environment": env})
            record = inst.get_run_record_by_id(rb[0].run_id) if rb else None
            stats = inst.get_run_stats(rb[0].run_id) if rb else None
            switched_in_tick = any("traffic switched to the warm standby" in (r.user_message or "")
                                   or "already on the warm standby" in (r.user_message or "")
                                   for r in inst.all_logs(rb[0].run_id)) if rb else False
        done = served.all_old_since("v1")
        res = load.result
        return {
            "mode": mode, "env": env, "first_fail": first_fail,
            "took": (done - first_fail) if done and first_fail else None,
            "requested": (record.create_timestamp.timestamp() - first_fail) if record and first_fail else None,
            "run_started": (stats.start_time - first_fail) if stats and stats.start_time and first_fail else None,
            "run_finished": (stats.end_time - first_fail) if stats and stats.end_time and first_fail else None,
            "rollback_status": finished.status.value if finished else "not finished",
            "rollback_runs": len(rb), "switched_by_sensor": switched_in_tick,
            "requests": res.requests, "failed": res.failed, "non_2xx": res.non_2xx, "errors": res.errors,
            "rate": res.rate, "load_before": load_before, "load_after": os.getloadavg()[0],
            "not_v1_after_fail": sum(1 for t, v in served.samples if first_fail and t > first_fail and v != "v1"),
        }
    finally:
        stop_environment(env)


def fmt(x: float | None, unit: str = " s") -> str:
    return f"{x:5.1f}{unit}" if x is not None else "    -  "


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200, help="requests per second of user load")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (interleaved)")
    parser.add_argument("--standby-s", type=float, default=300, help="target.standby_s of the standby mode")
    parser.add_argument("--modes", default="standby,redeploy", help="comma-separated: standby, redeploy")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    apps = STATE / "apps"
    v1 = apps / "v1"
    copy_example_app(v1)
    stack = LocalStack()
    servers = DagsterServers(STATE / "dagster_home", env={"OPS_STATE_DIR": str(STATE)})
    results: list[dict] = []
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        stack.ensure_running()
        npm_ci(v1)
        servers.start()
        for i in range(args.runs):
            for mode in modes:
                r = one_run(servers, v1, mode, i, args.standby_s, args.rate)
                results.append(r)
                print(f"run {i + 1} {mode:8}: " + (r.get("error") or (
                    f"first failing probe -> every request on v1 {fmt(r['took'])}; sensor requested the rollback "
                    f"{fmt(r['requested'])}, run started {fmt(r['run_started'])}, finished {fmt(r['run_finished'])} "
                    f"({r['rollback_status']}, {r['rollback_runs']} run(s), switched by the sensor: "
                    f"{r['switched_by_sensor']}); {r['requests']} requests at {r['rate']:.0f}/s, failed {r['failed']} "
                    f"(non-2xx {r['non_2xx']}, errors {r['errors']}); load {r['load_before']:.2f} -> {r['load_after']:.2f}")),
                    flush=True)
    finally:
        servers.stop()
        stack.stop()
        shutil.rmtree(STATE, ignore_errors=True)

    print(f"\nfirst failing probe -> every request served by v1, {args.rate:.0f} req/s, best / worst of {args.runs}:")
    best: dict[str, float] = {}
    worst: dict[str, float] = {}
    ok = True
    for mode in modes:
        took = [r["took"] for r in results if r["mode"] == mode and r.get("took") is not None]
        failed = sum(r.get("failed", 0) for r in results if r["mode"] == mode)
        target = STANDBY_TARGET_S if mode == "standby" else REDEPLOY_TARGET_S
        if len(took) < args.runs:
            ok = False
        if took:
            best[mode], worst[mode] = min(took), max(took)
            met = worst[mode] <= target and failed == 0
            ok = ok and met
            print(f"  {mode:8}  best {best[mode]:5.1f} s  worst {worst[mode]:5.1f} s  failed requests {failed}  "
                  f"(target <= {target:.0f} s, 0 failed: {'met' if met else 'NOT met'})")
        else:
            print(f"  {mode:8}  no complete run")
    if "standby" in best and "redeploy" in best:
        print(f"  redeploy / standby: {best['redeploy'] / best['standby']:.1f}x faster (best), "
              f"{worst['redeploy'] / worst['standby']:.1f}x (worst)")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("all targets met" if ok else "not every target met (see above)")
    return 0  # a benchmark reports, it does not assert (bench/README.md)


if __name__ == "__main__":
    sys.exit(main())
