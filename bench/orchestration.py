"""How much of a release is orchestration overhead? (benchmark, not a test)

    .venv/bin/python bench/orchestration.py [--full]

Runs the `release` job on the embedded local stack twice in the same run: once as shipped (in-process
executor) and once with Dagster's default multiprocess executor (the baseline: a process per step). For each it
prints the job's wall time, the sum of the ops' own work (STEP_START -> STEP_SUCCESS), and the overhead
(wall - work). Target: overhead <= 2 s. `--full` also runs the app's lint and test suite (slower, same overhead).
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

from bench.workdir import copy_example_app, dagster_home, isolated_state, npm_ci  # noqa: E402

# Step processes of the multiprocess run re-import this module: they must find the same state dir.
STATE = isolated_state("ops-bench-orch-", reuse_env="OPS_BENCH_ORCH_STATE")

import dagster as dg  # noqa: E402

from ops_pipeline.definitions import defs  # noqa: E402
from ops_pipeline.platform.local_stack import LocalStack, free_port  # noqa: E402


def release_multiprocess():
    """The same release graph and resources with Dagster's default multiprocess executor."""
    job = defs.get_job_def("release")
    return job.graph.to_job(name="release_multiprocess", executor_def=dg.multiprocess_executor,
                            resource_defs=job.resource_defs, tags=job.tags)


def timings(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float, dict[str, float]]:
    starts, steps = {}, {}
    first = last = None
    for rec in instance.all_logs(run_id):
        ev = rec.dagster_event
        if ev is None:
            continue
        if ev.event_type_value in ("PIPELINE_START", "RUN_START"):
            first = rec.timestamp
        if ev.event_type_value in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE", "RUN_SUCCESS", "RUN_FAILURE"):
            last = rec.timestamp
        if ev.event_type_value == "STEP_START":
            starts[ev.step_key] = rec.timestamp
        if ev.event_type_value == "STEP_SUCCESS":
            steps[ev.step_key] = rec.timestamp - starts[ev.step_key]
    return (last - first), sum(steps.values()), steps


def run_config(app: Path, env: str, version: str, port: int, full: bool) -> dict:
    cfg = {"environment": env, "version": version, "app": {"path": str(app)},
           "target": {"kind": "pm2", "instances": 2, "port": port}}
    if not full:
        cfg["app"]["commands"] = {"lint": "", "test": ""}
    return {"ops": {"verify_env": {"config": cfg}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the app's lint and tests too")
    args = parser.parse_args()
    home = dagster_home(STATE)
    app = copy_example_app(STATE / "app")
    stack = LocalStack()
    rows = []
    try:
        t0 = time.monotonic()
        stack.ensure_running()
        print(f"embedded stack up in {time.monotonic() - t0:.1f} s; npm ci of the app (not timed)...", flush=True)
        npm_ci(app)
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            # warm-up releases: build the caches (install stamp, production dependencies) both variants then share,
            # and put a v0 in each environment so both measured runs replace a serving version.
            ports = {"bench-inproc": free_port(), "bench-multiproc": free_port()}
            for env, port in ports.items():
                warm = defs.get_job_def("release").execute_in_process(
                    run_config=run_config(app, env, "v0", port, args.full), instance=instance)
                assert warm.success
            for label, env in (("in-process (shipped)", "bench-inproc"), ("multiprocess (default)", "bench-multiproc")):
                started = time.monotonic()
                cfg = run_config(app, env, "v1", ports[env], args.full)
                if env == "bench-inproc":
                    result = defs.get_job_def("release").execute_in_process(run_config=cfg, instance=instance)
                    run_id, ok = result.run_id, result.success
                else:
                    result = dg.execute_job(dg.reconstructable(release_multiprocess), instance=instance, run_config=cfg)
                    run_id, ok = result.run_id, result.success
                outer = time.monotonic() - started
                assert ok, f"{label} release failed"
                wall, work, steps = timings(instance, run_id)
                rows.append((label, outer, wall, work, wall - work, steps))
    finally:
        for env in ("bench-inproc", "bench-multiproc"):
            subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "kill"], capture_output=True,
                           env={**os.environ, "PM2_HOME": str(STATE / "envs" / env / "pm2")})
        stack.stop()
        shutil.rmtree(STATE, ignore_errors=True)

    print()
    print(f"{'executor':<24}{'call s':>8}{'run wall s':>12}{'ops work s':>12}{'overhead s':>12}")
    for label, outer, wall, work, over, _ in rows:
        print(f"{label:<24}{outer:>8.2f}{wall:>12.2f}{work:>12.2f}{over:>12.2f}")
    base, ours = rows[1][4], rows[0][4]
    print(f"\noverhead ratio multiprocess / in-process: {base / max(ours, 1e-3):.1f}x "
          f"(in-process overhead {ours:.2f} s; target <= 2 s: {'met' if ours <= 2 else 'NOT met'})")
    print("\nper-op work, in-process run (s): " + ", ".join(f"{k} {v:.2f}" for k, v in rows[0][5].items()))
    print("per-op work, multiprocess run (s): " + ", ".join(f"{k} {v:.2f}" for k, v in rows[1][5].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
