"""Liveness of runs, however they were launched: is the process executing a run still there?

A run started with `dagster job execute` / `dg launch` executes in the CLI process, with no run launcher and no
heartbeat: killed with SIGKILL (or by a reboot) it stays STARTED forever, the UI shows it running, the health watch
waits for it and the daemon's queue (one run per `ops/environment`) keeps the next run QUEUED behind it. Dagster's
own run monitoring (config/dagster.yaml `run_monitoring`) only covers what a run launcher can check: runs that never
start (start_timeout_seconds) and, with a launcher that supports worker health checks (DockerRunLauncher in the
compose deployment), workers that died. The local DefaultRunLauncher has no such check, and CLI runs have no
launcher at all.

What Dagster 1.13 records and this module reads:

* every event a run's process writes carries that process's id (`DagsterEvent.pid`); a run launched by the
  DefaultRunLauncher also writes the engine event "Started process for run (pid: N)" from its run worker. The
  process that executes the run is the one that wrote its RUN_START event.
* no host. The pid is therefore only evidence on the host that wrote it: with the local (SQLite) instance every
  process of the instance is on this host by construction; otherwise a run must carry the tag `ops/host` (see
  `host_tags`) naming this host, or no verdict is given from the pid.

A run is declared **dead** only on conclusive evidence, never on time: its process no longer exists, is a zombie,
or the pid now belongs to a process started after the run (pid reused, e.g. after a reboot). A run that is slow
but whose process lives is alive, whatever its duration. Dead runs are marked failed in the instance (an engine
event with the evidence, then RUN_FAILURE with the explanation), which unblocks the queue and the sensors.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.events import DagsterEventType, EngineEventData, JobFailureData, RunFailureReason

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"
HOST_TAG = "ops/host"
BOOT_TAG = "ops/boot_id"
DEATH_MARK = "ops-pipeline liveness"  # the engine event declaring a run dead starts with this
IN_PROGRESS = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)
# A process started at most this long after the event that recorded its pid is still the run's own process (btime is
# whole seconds, the event's timestamp is the writer's clock).
START_SLACK_S = 2.0

_declare_lock = threading.Lock()


def host_name() -> str:
    return socket.gethostname()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def host_tags() -> dict[str, str]:
    """Run tags that make a run's pid evidence usable on a shared (PostgreSQL) instance: to be added by the run's
    first step (`context.instance.add_run_tags(context.run_id, host_tags())`)."""
    tags = {HOST_TAG: host_name()}
    if boot_id():
        tags[BOOT_TAG] = boot_id()
    return tags


@dataclass
class Verdict:
    state: str  # alive | dead | unknown
    reason: str
    pid: int | None = None
    host: str = ""
    evidence: dict = field(default_factory=dict)

    @property
    def dead(self) -> bool:
        return self.state == DEAD


# ---- the process ---------------------------------------------------------------------------------------------

def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def process_state(pid: int) -> tuple[str, float | None, str]:
    """(state, start time (epoch) or None, description) of `pid` on this host; state: running | gone | zombie."""
    stat_path = f"/proc/{pid}/stat"
    if os.path.isdir("/proc/self"):
        try:
            with open(stat_path) as f:
                stat = f.read()
        except FileNotFoundError:
            return "gone", None, f"no process {pid}"
        except OSError as exc:
            return "running", None, f"process {pid} exists ({exc.strerror})"
        # comm may contain spaces and parentheses: the fields after it start past the last ')'
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        rest = stat[stat.rfind(")") + 2:].split()
        state, start_ticks = rest[0], int(rest[19])
        btime = _boot_time()
        started = btime + start_ticks / os.sysconf("SC_CLK_TCK") if btime is not None else None
        if state in ("Z", "X"):
            return "zombie", started, f"process {pid} ({comm}) has exited (zombie)"
        return "running", started, f"process {pid} ({comm}) is running"
    try:  # no /proc (macOS): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone", None, f"no process {pid}"
    except PermissionError:
        pass
    return "running", None, f"process {pid} exists"


# ---- what the instance recorded ------------------------------------------------------------------------------

def run_process(instance: dg.DagsterInstance, run_id: str) -> tuple[int | None, float | None, str]:
    """(pid, timestamp of the event naming it, how it was found) of the process executing the run. The event was
    written by that process itself, so the process started before it (other events, e.g. the daemon's before a
    launched run's worker exists, say nothing about it)."""
    records = instance.get_records_for_run(
        run_id, of_type={DagsterEventType.RUN_START, DagsterEventType.ENGINE_EVENT}, limit=200, ascending=True).records
    for rec in records:
        ev = rec.event_log_entry.dagster_event
        if ev is None:
            continue
        ts = rec.event_log_entry.timestamp
        if ev.event_type == DagsterEventType.RUN_START and ev.pid:
            return ev.pid, ts, "the RUN_START event's pid"
        if ev.event_type == DagsterEventType.ENGINE_EVENT and (ev.message or "").startswith("Started process for run"):
            md = getattr(ev.event_specific_data, "metadata", {}) or {}
            pid = md.get("pid")
            raw = getattr(pid, "value", getattr(pid, "text", pid))
            try:
                return int(raw), ts, "the engine event 'Started process for run'"
            except (TypeError, ValueError):
                if ev.pid:
                    return ev.pid, ts, "the engine event 'Started process for run'"
    return None, None, "no event of the run names its process"


def last_event(instance: dg.DagsterInstance, run_id: str) -> tuple[float | None, str]:
    recs = instance.get_records_for_run(run_id, limit=1, ascending=False).records
    if not recs:
        return None, ""
    entry = recs[0].event_log_entry
    ev = entry.dagster_event
    what = ev.event_type_value if ev else "log message"
    if entry.step_key:
        what += f" {entry.step_key}"
    return entry.timestamp, what


def unfinished_steps(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Steps the run started and never finished (success, failure, skip): where a dead run died."""
    recs = instance.get_records_for_run(
        run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE,
                         DagsterEventType.STEP_SKIPPED}, limit=1000).records
    started, done = [], set()
    for rec in recs:
        ev = rec.event_log_entry.dagster_event
        if ev is None or not ev.step_key:
            continue
        if ev.event_type == DagsterEventType.STEP_START:
            started.append(ev.step_key)
        else:
            done.add(ev.step_key)
    return [s for s in dict.fromkeys(started) if s not in done]


def _single_host(instance: dg.DagsterInstance) -> bool:
    """The local instance: SQLite storage in DAGSTER_HOME, so every process writing to it is on this host."""
    return "sqlite" in type(instance.run_storage).__name__.lower()


def _launched_with_health_check(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """A run launched by a run launcher that Dagster's run monitoring can ask about its worker (Docker, K8s...)."""
    try:
        launcher = instance.run_launcher
        if not launcher.supports_check_run_worker_health:
            return False
    except Exception:  # noqa: BLE001
        return False
    starting = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_STARTING, limit=1).records
    return bool(starting)


def check_run(instance: dg.DagsterInstance, run: dg.DagsterRun) -> Verdict:
    """Is the process executing `run` alive? DEAD only on conclusive evidence; UNKNOWN when this host cannot tell."""
    if run.status not in IN_PROGRESS:
        return Verdict(ALIVE if not run.is_finished else UNKNOWN,
                       f"status {run.status.value}: {'finished' if run.is_finished else 'not executing yet (Dagster run monitoring start timeout covers it)'}")
    if _launched_with_health_check(instance, run):
        return Verdict(UNKNOWN, f"launched by {type(instance.run_launcher).__name__}: Dagster's run monitoring checks its worker")
    pid, first_ts, how = run_process(instance, run.run_id)
    if pid is None:
        return Verdict(UNKNOWN, how)
    here, tagged = host_name(), run.tags.get(HOST_TAG)
    if tagged and tagged != here:
        return Verdict(UNKNOWN, f"pid {pid} is on host {tagged}, not this one ({here})", pid=pid, host=tagged)
    if not tagged and not _single_host(instance):
        return Verdict(UNKNOWN, f"pid {pid}: the run does not say on which host it executes (tag {HOST_TAG})", pid=pid)
    evidence = {"pid": pid, "host": here, "pid_from": how}
    tagged_boot = run.tags.get(BOOT_TAG)
    if tagged_boot and boot_id() and tagged_boot != boot_id():
        return Verdict(DEAD, f"host {here} has rebooted since the run started (boot id changed)", pid, here, evidence)
    state, started, desc = process_state(pid)
    if started is not None:
        evidence["process_started_at"] = round(started, 2)
    if first_ts is not None:
        evidence["pid_recorded_at"] = round(first_ts, 2)
    if state in ("gone", "zombie"):
        return Verdict(DEAD, desc, pid, here, evidence)
    if started is not None and first_ts is not None and started > first_ts + START_SLACK_S:
        return Verdict(DEAD, f"{desc} but started {started - first_ts:.0f} s after the run recorded its pid: "
                             f"the run's process is gone and its pid was reused", pid, here, evidence)
    return Verdict(ALIVE, desc, pid, here, evidence)


def declare_dead(instance: dg.DagsterInstance, run: dg.DagsterRun, verdict: Verdict, *, detected_by: str,
                 rollback: str = "") -> bool:
    """Mark a dead run failed: an engine event with the evidence, then RUN_FAILURE with the explanation (both shown
    in the run's page). Returns False when the run finished (or was declared dead) in the meantime."""
    assert verdict.dead, verdict
    with _declare_lock:
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in IN_PROGRESS:
            return False
        last_ts, last_what = last_event(instance, run.run_id)
        steps = unfinished_steps(instance, run.run_id)
        now = time.time()
        quiet = f"{now - last_ts:.0f} s after its last event ({last_what})" if last_ts else "with no event recorded"
        message = (f"{DEATH_MARK}: the process executing this run is dead: {verdict.reason} (pid {verdict.pid} on "
                   f"host {verdict.host}). Detected by the {detected_by} sensor at "
                   f"{time.strftime('%H:%M:%S', time.gmtime(now))}Z, {quiet}"
                   + (f"; it died in {', '.join(steps)}" if steps else "")
                   + ". Marked failed so it no longer blocks the health watch, the run queue or the next release."
                   + (f" Rollback requested by {detected_by} ({rollback})." if rollback else ""))
        metadata = {"ops/liveness": "dead", "detected_by": detected_by, "reason": verdict.reason,
                    "steps_in_flight": ", ".join(steps), "rollback": rollback,
                    **{k: str(v) for k, v in verdict.evidence.items()}}
        instance.report_engine_event(message, current, EngineEventData(metadata=metadata))
        instance.report_run_failed(current, message,
                                   JobFailureData(error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION))
        return True


def death_record(instance: dg.DagsterInstance, run_id: str) -> dict | None:
    """The metadata of the engine event that declared `run_id` dead (steps_in_flight, rollback, ...), or None."""
    recs = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=20, ascending=False).records
    for rec in recs:
        ev = rec.event_log_entry.dagster_event
        if ev is not None and (ev.message or "").startswith(DEATH_MARK):
            md = getattr(ev.event_specific_data, "metadata", {}) or {}
            return {k: getattr(v, "value", getattr(v, "text", v)) for k, v in md.items()}
    return None


def sweep(instance: dg.DagsterInstance, *, job_names: set[str] | None = None, detected_by: str = "run_liveness",
          limit: int = 200) -> list[tuple[dg.DagsterRun, Verdict, bool]]:
    """Check every in-progress run (of `job_names`); declare the dead ones. Returns (run, verdict, declared)."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=list(IN_PROGRESS)), limit=limit)
    out = []
    for run in runs:
        if job_names and run.job_name not in job_names:
            continue
        verdict = check_run(instance, run)
        declared = declare_dead(instance, run, verdict, detected_by=detected_by) if verdict.dead else False
        out.append((run, verdict, declared))
    return out


FAILED_RUN_TAG = "ops/failed_run"  # on a rollback requested because this release run failed


def resumed_by(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    """The re-execution of a failed run (Dagster's "re-execute from failure") that is queued, running or succeeded:
    the failed release was resumed, so the rollback its failure requested must stand down."""
    live = [s for s in dg.DagsterRunStatus if s not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED,
                                                         dg.DagsterRunStatus.CANCELING)]
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": run_id}, statuses=live), limit=1)
    return runs[0] if runs else None
