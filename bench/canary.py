"""Requests failed because of a bad version: a canary release against an all-at-once rollout (benchmark, not a test).

    .venv/bin/python bench/canary.py [--rate 200] [--window 45] [--runs 3]

Both phases release the same bad version of examples/node-api (every 20th request of each instance answers 500:
5%, its /health is fine, so the health gate and the health watch see nothing wrong) over a good v1 on the PM2
target behind nginx, in fresh environments, while bench/loadgen.py sends GET /items at a constant rate through the
public port for a fixed window counted from the release's launch:

* canary: `canary.steps` 10% for 10 s then 50% for 10 s; the analysis (min 50 requests, max 1% 5xx) aborts it;
* all at once: the usual rolling deploy of the same version (it passes its gate and then serves everything).

Printed: failed requests as a share of all requests in the window for each, their ratio (all at once / canary), best
and worst of `--runs` runs, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workdir import copy_example_app, dagster_home, isolated_state, npm_ci

STATE = isolated_state("ops-bench-canary-")

import dagster as dg

from bench.loadgen import Load
from ops_pipeline.definitions import defs
from ops_pipeline.platform.local_stack import LocalStack, free_port
from tests.canary import variants

CANARY = {"steps": [{"weight": 10, "pause_s": 10}, {"weight": 50, "pause_s": 10}],
          "analysis": {"min_requests": 50, "max_error_rate": 0.01, "max_error_rate_increase": 0.005,
                       "max_inconclusive_s": 20}}


def config(app: Path, env: str, version: str, port: int, canary: dict | None = None) -> dict:
    cfg: dict = {"environment": env, "version": version,
                 "app": {"path": str(app), "commands": {"lint": "", "test": "", "build": ""}},
                 "target": {"kind": "pm2", "instances": 2, "port": port}, "gate": {"interval_s": 0.5}}
    if canary:
        cfg["canary"] = canary
    return {"ops": {"verify_env": {"config": cfg}}}


def teardown(env: str) -> None:
    subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "kill"], capture_output=True, check=False,
                   env={**os.environ, "PM2_HOME": str(STATE / "envs" / env / "pm2")})
    try:
        os.kill(int((STATE / "envs" / env / "nginx" / "nginx.pid").read_text()), 15)
    except (OSError, ValueError):
        pass


def phase(release, instance, good: Path, bad: Path, env: str, rate: float, window_s: float, canary: bool) -> dict:
    port = free_port()
    try:
        assert release.execute_in_process(run_config=config(good, env, "v1", port), instance=instance).success
        t0 = time.monotonic()
        with Load(port, rate=rate) as load:
            result = release.execute_in_process(run_config=config(bad, env, "v-bad", port, CANARY if canary else None),
                                                instance=instance, raise_on_error=False)
            released_s = time.monotonic() - t0
            while time.monotonic() - t0 < window_s:
                time.sleep(0.2)
    finally:
        teardown(env)
    r = load.result
    row = {"mode": "canary" if canary else "all at once", "release_ok": result.success, "release_s": released_s,
           "requests": r.requests, "failed": r.failed, "errors": r.errors, "share": r.failed / max(r.requests, 1),
           "bad_served": r.versions.get("v-bad", 0), "failed_versions": r.failed_versions}
    print(f"  {row['mode']:<12} release {'succeeded' if row['release_ok'] else 'failed'} in {released_s:5.1f} s; "
          f"{r.requests} requests in {r.seconds:.0f} s, {r.failed} failed ({row['share']:.3%}; by version "
          f"{r.failed_versions}, {r.errors} connection errors), v-bad answered {row['bad_served']}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    parser.add_argument("--window", type=float, default=60, help="seconds of load counted from each release's launch")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    home = dagster_home(STATE)
    good = copy_example_app(STATE / "app")
    stack = LocalStack()
    load_before = os.getloadavg()
    rows: list[tuple[dict, dict]] = []
    try:
        stack.ensure_running()
        npm_ci(good)
        bad = STATE / "app-bad"
        shutil.copytree(good, bad, symlinks=True)
        variants.errors_500(every=20)(bad)
        for app in (good, bad):
            subprocess.run(["npm", "run", "build"], cwd=app, check=True, capture_output=True)
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            release = defs.get_job_def("release")
            for run in range(1, args.runs + 1):
                print(f"run {run}/{args.runs} (load average {os.getloadavg()[0]:.2f})", flush=True)
                c = phase(release, instance, good, bad, f"cb-canary-{run}", args.rate, args.window, canary=True)
                a = phase(release, instance, good, bad, f"cb-all-{run}", args.rate, args.window, canary=False)
                rows.append((c, a))
    finally:
        stack.stop()
        shutil.rmtree(STATE, ignore_errors=True)
    load_after = os.getloadavg()
    print()
    print(f"{'run':<5}{'canary failed':>16}{'share':>9}{'all at once failed':>20}{'share':>9}{'ratio':>8}")
    ratios = []
    for i, (c, a) in enumerate(rows, 1):
        ratio = a["share"] / c["share"] if c["share"] else float("inf")
        ratios.append(ratio)
        print(f"{i:<5}{c['failed']:>9} of {c['requests']:<6}{c['share']:>8.3%}{a['failed']:>11} of {a['requests']:<6}"
              f"{a['share']:>8.3%}{ratio:>7.1f}x")
    print(f"\nfailed requests because of the bad version, all at once / canary: best {max(ratios):.1f}x, worst "
          f"{min(ratios):.1f}x fewer with the canary ({args.rate:g} req/s, {args.window:g} s windows)")
    print(f"load average (1/5/15 min): before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}")
    ok = all(not c["release_ok"] and a["release_ok"] and set(c["failed_versions"]) <= {"v-bad"} and c["errors"] == 0
             for c, a in rows)
    print(f"every canary aborted, every all-at-once rollout released, the canary's failures all from v-bad: "
          f"{'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
