"""A short account of a run, read from the Dagster instance: each step with its outcome and duration, the run's
outcome, what it materialized. Used by the Makefile's job targets (`make demo`, `release`, `rollback`, ...).

    python -m ops_pipeline.platform.run_report launch JOB CONFIG [--verbose] [--log FILE]
        `dg launch --job JOB --config CONFIG`, its whole output (the Dagster log with its DEBUG events, the app's
        test output, warnings) into FILE (default `<state>/logs/<job>-<UTC time>.log`), and on the terminal too
        with --verbose; then the account of the run it made. Exit status 0 only when the run succeeded.
    python -m ops_pipeline.platform.run_report show [RUN_ID]
        the account of a run of the instance (default: the newest).

`dg launch --job` executes the run in its own process (what `dagster job execute` does), not through the
instance's run queue or run launcher; the run is found again by the process id of its RUN_START event.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from dagster._core.events import DagsterEventType

from ops_pipeline.platform import paths

OUTCOME = {"SUCCESS": "ok", "FAILURE": "FAILED", "SKIPPED": "skipped", "IN_PROGRESS": "unfinished"}
MESSAGE_WIDTH = 76
FAILURE_LINES = 8


def _seconds(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return ""
    took = end - start
    return f"{took:.1f} s" if took < 120 else f"{int(took // 60)} min {int(took % 60)} s"


def _first_line(text: str, width: int = MESSAGE_WIDTH) -> str:
    line = next((part.strip() for part in (text or "").splitlines() if part.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def _plan_order(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    """The run's step keys, upstream before downstream (the plan snapshot lists them alphabetically)."""
    snap = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id) if run.execution_plan_snapshot_id else None
    if snap is None:
        return []
    upstream = {s.key: {h.step_key for i in s.inputs for h in i.upstream_output_handles} for s in snap.steps}
    order: list[str] = []
    while len(order) < len(upstream):
        ready = [k for k, ups in upstream.items() if k not in order and ups <= set(order)]
        if not ready:  # not a DAG: should not happen, keep whatever is left
            ready = [k for k in upstream if k not in order]
        order.append(sorted(ready)[0])
    return order


def _records(instance: dg.DagsterInstance, run_id: str, event_type: DagsterEventType | None = None) -> list:
    if event_type is None:
        return list(instance.all_logs(run_id))
    return [r.event_log_entry for r in instance.get_records_for_run(run_id, of_type=event_type, limit=1000).records]


def account(instance: dg.DagsterInstance, run_id: str) -> tuple[int, str]:
    """The account of a finished (or unfinished) run; status 0 only for a run that succeeded."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return 1, f"run {run_id}: not in the instance ({instance.root_directory})"
    record = instance.get_run_record_by_id(run_id)
    logs = _records(instance, run_id)
    stats = {s.step_key: s for s in instance.get_run_step_stats(run_id)}
    last_message: dict[str, str] = {}
    failure: dict[str, str] = {}
    materialized: list[str] = []
    run_failure = ""
    for entry in logs:
        event = entry.dagster_event
        if event is None:
            if entry.step_key and entry.level >= 20 and entry.user_message:  # INFO and above
                last_message[entry.step_key] = entry.user_message
        elif event.event_type == DagsterEventType.STEP_FAILURE and event.step_key:
            data = event.step_failure_data
            user = data.user_failure_data.description if data and data.user_failure_data else None
            failure[event.step_key] = user or (data.error.message if data and data.error else event.message or "")
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.step_materialization_data.materialization
            materialized.append(f"{mat.asset_key.to_user_string()}" + (f" ({mat.description})" if mat.description else ""))
        elif event.event_type == DagsterEventType.RUN_FAILURE:
            run_failure = event.message or ""
    steps = _plan_order(instance, run) or sorted(stats, key=lambda k: stats[k].start_time or 0)
    width = max((len(s) for s in steps), default=10)
    status = run.status.value
    lines = [f"{run.job_name} run {run_id[:8]}: {status}"
             + (f" in {_seconds(record.start_time, record.end_time)}" if record and record.end_time else "")
             + (f"  ({', '.join(f'{k}={v}' for k, v in sorted(run.tags.items()) if k in ('ops/environment', 'ops/version'))})"
                if any(k in run.tags for k in ('ops/environment', 'ops/version')) else "")]
    for key in steps:
        stat = stats.get(key)
        if stat is None or stat.status is None:
            outcome = "not run" if run.is_finished else "waiting"
        else:
            outcome = OUTCOME.get(stat.status.value, stat.status.value.lower())
        took = _seconds(stat.start_time, stat.end_time) if stat else ""
        note = failure.get(key) or (last_message.get(key, "") if stat is not None else "")
        lines.append(f"  {outcome:<10} {key:<{width}}  {took:>9}  {_first_line(note)}".rstrip())
        if stat is not None and stat.attempts and stat.attempts > 1:
            lines[-1] += f"  [{stat.attempts} attempts]"
        if key in failure:  # the rest of the failure's explanation, a few lines of it
            more = [line.rstrip() for line in failure[key].strip().splitlines()[1:] if line.strip()]
            lines += [f"      {_first_line(line, 150)}" for line in more[:FAILURE_LINES]]
            if len(more) > FAILURE_LINES:
                lines.append(f"      ... ({len(more) - FAILURE_LINES} more lines in the log)")
    if run_failure and not failure:
        lines.append(f"  {_first_line(run_failure, 160)}")
    lines += [f"  materialized {m}" for m in materialized]
    return (0 if run.status == dg.DagsterRunStatus.SUCCESS else 1), "\n".join(lines)


def find_launched_run(instance: dg.DagsterInstance, job: str, pid: int, since: float) -> str | None:
    """The run of `job` that the process `pid` started after `since` (its RUN_START event carries the pid)."""
    from datetime import datetime, timezone

    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job,
                                                   created_after=datetime.fromtimestamp(since - 1, tz=timezone.utc)))
    for run in runs:  # newest first
        starts = _records(instance, run.run_id, DagsterEventType.RUN_START)
        if any(e.dagster_event.pid == pid for e in starts):
            return run.run_id
    return None


def default_log_path(job: str) -> Path:
    return paths.state_dir() / "logs" / f"{job}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"


def dg_command(job: str, config: str) -> list[str]:
    dg_bin = Path(sys.executable).parent / "dg"
    return [str(dg_bin) if dg_bin.exists() else (shutil.which("dg") or "dg"), "launch", "--job", job, "--config", config]


def launch(job: str, config: str, log_path: Path | None = None, verbose: bool = False) -> int:
    """Run `dg launch` with its output in a log file (and on the terminal when verbose), then print the account."""
    log_path = log_path or default_log_path(job)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = dg_command(job, config)
    # dg wants the project's venv activated; this interpreter's is the one
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    print(f"{job}: dg launch --job {job} --config {config}")
    print(f"  full log: {log_path}" + ("" if verbose else "  (tail -f it to follow the run)"), flush=True)
    since = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=paths.project_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                log.write(chunk)
                log.flush()
                if verbose:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
        except KeyboardInterrupt:  # the terminal's Ctrl-C reached dg too; let it finish its interrupt handling
            pass
        code = proc.wait()
    if verbose:
        print()
    with dg.DagsterInstance.get() as instance:
        run_id = find_launched_run(instance, job, proc.pid, since)
        if run_id is None:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            print(f"{job}: no run was started (dg exited with {code}); the end of {log_path}:")
            print("\n".join(f"  {line}" for line in tail))
            return code or 1
        status, text = account(instance, run_id)
    print(text)
    return status or code


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops_pipeline.platform.run_report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_launch = sub.add_parser("launch", help="dg launch a job, its log in a file, then the account of its run")
    p_launch.add_argument("job")
    p_launch.add_argument("config")
    p_launch.add_argument("--verbose", action="store_true", help="the whole log on the terminal too")
    p_launch.add_argument("--log", type=Path, help="log file (default: <state>/logs/<job>-<time>.log)")
    p_show = sub.add_parser("show", help="the account of a run (default: the newest)")
    p_show.add_argument("run_id", nargs="?")
    args = parser.parse_args(argv)
    if args.command == "launch":
        return launch(args.job, args.config, args.log, args.verbose)
    with dg.DagsterInstance.get() as instance:
        run_id = args.run_id
        if not run_id:
            runs = instance.get_runs(limit=1)
            if not runs:
                print("no run in the instance")
                return 1
            run_id = runs[0].run_id
        status, text = account(instance, run_id)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
