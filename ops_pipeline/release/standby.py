"""The warm standby from the sensors' side: the traffic switch when a bad version is confirmed, and the sweep of a
standby whose window ended.

Why the sensor switches the traffic itself. A rollback run starts 6-7 s after it is requested (the daemon launches a
new Python process that loads the code location), so a switch made inside the run cannot put every request on the
old version within 8 s of the first failing probe. The sensor that confirmed the failure already runs, in a process
that has everything loaded; the switch is one call of the target (`DeployTarget.switch_to_standby`: the standby
answers healthy on its own ports, then one nginx reload routes only to it), about a second. The switch is safe to
make there because it is:

* idempotent: a second switch to the same version changes nothing; the rollback run finds the traffic on the
  standby and only stops the replaced instances and records the rollback (plan_rollback / rollback_deploy);
* guarded twice: never while a run of the environment is in progress (the same check that holds the rollback
  request back, from the run storage), and never while a rollout holds the environment's rollout lock (a file lock
  the target takes for the whole rollout, so a release that has just started is not touched either);
* limited: only to an unexpired standby of the last good version, checked healthy; otherwise nothing is switched,
  the note says why, and the rollback run redeploys as before.

The slow parts (draining and stopping the bad instances, the health gate, the history record) stay in the rollback
run the sensor still requests, visible in the UI like any rollback. A standby whose window ended is stopped by a
small `retire_standby` run (run key per standby generation, so one run per standby), requested by the health watch;
the next release or rollback replaces or discards it at the latest.
"""

from __future__ import annotations

import time

import dagster as dg

from ops_pipeline.platform import history
from ops_pipeline.platform.settings import settings
from ops_pipeline.platform.spec import ReleaseSpec, SpecError
from ops_pipeline.targets.resource import DeployTargets

LEFT_BEHIND_S = 300  # a switch's replaced instances still running after this long: the rollback run did not stop them


def targets_from_settings() -> DeployTargets:
    """The deploy targets as the code location's resources configure them (for a sensor without resources)."""
    from ops_pipeline.targets.pm2.target import Pm2Resource

    return DeployTargets.with_defaults(pm2=Pm2Resource(pm2_bin=settings().pm2_bin))


def switch(spec: ReleaseSpec, good_version: str, targets: DeployTargets, by: str) -> tuple[bool, str]:
    """Switch the traffic of `spec`'s environment to its warm standby of `good_version`, when there is a usable one.
    Returns (switched, note); the note is empty when the environment keeps no standby at all."""
    try:
        target = targets.for_spec(spec)
        standby = target.standby()
        if standby is None or (not standby.instances and not standby.switched):
            return False, ""
        lines: list[str] = []
        result = target.switch_to_standby(good_version, lines.append, retire=False, by=by)
    except Exception as exc:  # noqa: BLE001 - a failed switch never stops the rollback request
        return False, f"; warm standby not used ({type(exc).__name__}: {str(exc)[:200]})"
    if result.ok and result.already:
        return True, f"; traffic already on the warm standby of {good_version}"
    if result.ok:
        return True, (f"; traffic switched to the warm standby of {good_version} in {result.seconds:.1f} s "
                      f"(out of traffic: {', '.join(result.retiring) or 'nothing'})")
    return False, f"; warm standby not used: {result.detail}"


def switch_for_failed_release(instance: dg.DagsterInstance, environment: str, bad_version: str, by: str,
                              active_runs) -> str:
    """The release-failure sensor's switch: to the standby of the last good version, unless a run of the environment
    is in progress. Returns a note for the log ("" when there is nothing to say)."""
    hist = history.load(instance, environment, limit=100)
    good = hist.last_good(exclude={bad_version} if bad_version else None)
    recorded = history.spec_json(good) if good else None
    if not recorded:
        return ""
    running = active_runs(instance, environment)
    if running:
        return f"warm standby not used: run {running[0].run_id[:8]} ({running[0].job_name}) is in progress"
    try:
        spec = ReleaseSpec.from_json(recorded)
    except SpecError:
        return ""
    _, note = switch(spec, good.version, targets_from_settings(), by)
    return note.removeprefix("; ")


def expiry_request(environment: str, spec: ReleaseSpec, targets: DeployTargets) -> dg.RunRequest | None:
    """A retire_standby run for the environment's standby once its window ended (one per standby generation)."""
    standby = targets.for_spec(spec).standby()
    if standby is None:
        return None
    # instances a switch took out of traffic are stopped by the rollback run; if it never did (it died), here
    left_behind = bool(standby.retiring) and time.time() - standby.switched.get("at", time.time()) > LEFT_BEHIND_S
    if not left_behind and not standby.expired():
        return None
    expired = time.strftime("%H:%M:%S", time.gmtime(standby.expires_at))
    return dg.RunRequest(
        job_name="retire_standby",
        run_key=f"standby:{environment}:{standby.generation}" + (":left-behind" if left_behind else ""),
        run_config={"ops": {"stop_standby": {"config": {"environment": environment,
                                                          "generation": standby.generation}}}},
        tags={"ops/environment": environment, "ops/trigger": "health_watch", "ops/standby_version": standby.version,
              "ops/standby_reason": "switched-out instances left running" if left_behind else "window ended",
              "ops/standby_expired_at": f"{expired}Z"},
    )


def expiry_for(environment: str, hist: history.EnvironmentHistory, targets: DeployTargets) -> dg.RunRequest | None:
    serving = hist.serving_version
    record = hist.release_of(serving) if serving else None
    recorded = history.spec_json(record) if record else None
    if not recorded:
        return None
    try:
        return expiry_request(environment, ReleaseSpec.from_json(recorded), targets)
    except SpecError:
        return None
