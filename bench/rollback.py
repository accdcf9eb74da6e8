"""Automatic rollback speed under load (benchmark, not a test).

    .venv/bin/python bench/rollback.py [--rate 600]

A real dagster-daemon (sensors, run queue) and webserver run on a temporary instance. v1 and then v2 of the
example app are released to PM2; v2 has a latent fault: its /health starts answering 503 when a file appears
(only its health answers break, so any failed user request is the rollback's fault). Under a constant load on
GET /items the file is created, and the benchmark measures the time from the first failing health probe
(its own probe, every 50 ms) to every instance serving v1, with the steps in between taken from the instance:
sensor request, run start, rollback done. Targets: <= 15 s and 0 failed requests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workdir import copy_example_app, isolated_state, npm_ci  # noqa: E402

STATE = isolated_state("ops-bench-rb-")

import dagster as dg  # noqa: E402
import httpx  # noqa: E402

from bench.loadgen import Load  # noqa: E402
from ops_pipeline.platform.local_stack import LocalStack, free_port  # noqa: E402
from tests import app_variants  # noqa: E402
from tests.e2e.servers import DagsterServers  # noqa: E402


def release_config(app: Path, env: str, version: str, port: int) -> dict:
    return {"ops": {"verify_env": {"config": {
        "environment": env, "version": version, "app": {"path": str(app), "commands": {"lint": "", "test": ""}},
        "target": {"kind": "pm2", "instances": 2, "port": port}, "gate": {"interval_s": 0.5}}}}}


def pm2_versions(env: str) -> list[str]:
    out = subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "jlist"], capture_output=True, text=True,
                         env={**os.environ, "PM2_HOME": str(STATE / "envs" / env / "pm2")}).stdout
    procs = json.loads(out[out.find("["):]) if "[" in out else []
    return sorted(p["pm2_env"].get("APP_VERSION", "?") for p in procs if p["pm2_env"].get("status") == "online")


def health(port: int) -> tuple[int | None, str | None]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, headers={"Connection": "close"})
        return r.status_code, r.json().get("version")
    except (httpx.HTTPError, ValueError):
        return None, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=600, help="requests per second of user load")
    args = parser.parse_args()
    env, port = "rb-bench", free_port()
    apps = STATE / "apps"
    v1 = apps / "v1"
    copy_example_app(v1)
    stack = LocalStack()
    servers = DagsterServers(STATE / "dagster_home", env={"OPS_STATE_DIR": str(STATE)})
    try:
        stack.ensure_running()
        npm_ci(v1)
        v2 = apps / "v2"
        shutil.copytree(v1, v2, symlinks=True, ignore=shutil.ignore_patterns("node_modules"))
        subprocess.run(["cp", "-al", str(v1 / "node_modules"), str(v2 / "node_modules")], check=True)
        break_file = STATE / "v2-breaks"
        app_variants.health_503_when_file_exists(break_file)(v2)
        servers.start()
        for app, version in ((v1, "v1"), (v2, "v2")):
            run = servers.wait_run(servers.submit("release", release_config(app, env, version, port), {"ops/environment": env}))
            assert run.status.value == "SUCCESS", f"release {version}: {run.status}"
        print(f"v2 serving on {port}: {pm2_versions(env)}; starting the load and breaking v2's health", flush=True)
        with Load(port, rate=args.rate) as load:
            time.sleep(2)
            break_file.touch()
            broke_at = time.time()
            first_fail = None
            while first_fail is None and time.time() - broke_at < 30:
                status, _ = health(port)
                if status != 200:
                    first_fail = time.time()
                time.sleep(0.05)
            done = None
            while done is None and time.time() - broke_at < 120:
                if pm2_versions(env) == ["v1", "v1"] and health(port) == (200, "v1"):
                    done = time.time()
                time.sleep(0.1)
            time.sleep(2)
        result = load.result
        with servers.instance() as inst:
            rbs = list(inst.get_runs(filters=dg.RunsFilter(job_name="rollback")))
            stats = inst.get_run_stats(rbs[0].run_id) if rbs else None
            created = inst.get_run_record_by_id(rbs[0].run_id).create_timestamp.timestamp() if rbs else None
            timeline = []
            for rec in (inst.all_logs(rbs[0].run_id) if rbs else []):
                ev = rec.dagster_event
                if ev and ev.event_type_value in ("PIPELINE_ENQUEUED", "PIPELINE_DEQUEUED", "PIPELINE_STARTING", "PIPELINE_START",
                                                  "RESOURCE_INIT_STARTED", "RESOURCE_INIT_SUCCESS",
                                                  "STEP_START", "STEP_SUCCESS", "RUN_SUCCESS"):
                    timeline.append((rec.timestamp, f"{ev.event_type_value} {ev.step_key or ''}".strip()))
    finally:
        servers.stop()
        subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "kill"], capture_output=True,
                       env={**os.environ, "PM2_HOME": str(STATE / "envs" / env / "pm2")})
        stack.stop()
        shutil.rmtree(STATE, ignore_errors=True)

    if first_fail is None or done is None:
        print("rollback did not complete")
        return 1
    took = done - first_fail
    print()
    print("first failing probe -> all instances serving v1")
    print(f"  sensor requested the rollback run  +{created - first_fail:5.1f} s" if created else "  no rollback run found")
    if stats and stats.start_time:
        print(f"  rollback run started               +{stats.start_time - first_fail:5.1f} s")
    print(f"  every instance on v1               +{took:5.1f} s   (target <= 15 s: {'met' if took <= 15 else 'NOT met'})")
    if stats and stats.end_time:
        print(f"  rollback run finished (gate too)   +{stats.end_time - first_fail:5.1f} s")
    print("\nrollback run timeline (from the first failing probe):")
    for ts, what in timeline:
        print(f"  +{ts - first_fail:5.1f} s  {what}")
    print(f"\nuser requests during the incident: {result.requests}, failed {result.failed} "
          f"(non-2xx {result.non_2xx}, connection errors {result.errors}); versions {result.versions}")
    print(f"rollback runs: {len(rbs)} (expected exactly 1)")
    return 0 if took <= 15 and result.failed == 0 and len(rbs) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
