"""Approval: a release whose spec says `approval.required` holds before a step until someone decides.

The release run holds the environment's lock and waits, tagged `ops/approval=waiting` (the runs list in the UI shows
it). Someone launches the `approve_release` job from the Launchpad with the run's id, `promote` or `abort`, and their
name. That job checks the run really is a release waiting for a decision, tags it with the decision, who and when,
and records the decision as an `approvals/<environment>` asset event. The release picks the decision up within a
second: promote continues (who and when go into the release history with the release), abort or no decision within
`approval.timeout_s` fails the release before that step, with nothing done past it.
"""

import time
from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.spec import ReleaseSpec

APPROVAL_TAG = "ops/approval"  # waiting | promoted | aborted | timed out
DECISION_TAG = "ops/approval_decision"  # promote | abort (set by approve_release)
BY_TAG = "ops/approval_by"
AT_TAG = "ops/approval_at"
REMINDER_S = 60.0


def wait_for_approval(context: dg.OpExecutionContext, spec: ReleaseSpec, stage: str, poll_s: float = 0.5) -> None:
    """Hold here, before `stage`, until the run is promoted; abort or timeout fails the step."""
    cfg = spec.config.approval
    if not cfg.required or cfg.before != stage:
        return
    instance, run_id = context.instance, context.run_id
    if instance.get_run_by_id(run_id) is None:
        raise failure("approval.required: this run is not in the instance, so nobody could approve it")
    instance.add_run_tags(run_id, {APPROVAL_TAG: "waiting", "ops/approval_stage": stage})
    how = (f"launch the approve_release job with run_id: {run_id}, decision: promote (or abort) and by: <your name>")
    context.log.info(f"{spec.version} to '{spec.environment}' waits for approval before {stage}: {how} "
                     f"(aborted after {cfg.timeout_s:g} s without a decision)")
    started = time.monotonic()
    reminded = started
    while True:
        tags = instance.get_run_by_id(run_id).tags
        decision, by = tags.get(DECISION_TAG), tags.get(BY_TAG, "?")
        if decision == "promote":
            instance.add_run_tags(run_id, {APPROVAL_TAG: "promoted"})
            context.log.info(f"promoted by {by} at {tags.get(AT_TAG)} after {time.monotonic() - started:.0f} s of waiting")
            return
        if decision == "abort":
            instance.add_run_tags(run_id, {APPROVAL_TAG: "aborted"})
            raise failure(f"release of {spec.version} aborted by {by} at {tags.get(AT_TAG)}, before {stage}: "
                          f"nothing past that step was done")
        waited = time.monotonic() - started
        if waited >= cfg.timeout_s:
            instance.add_run_tags(run_id, {APPROVAL_TAG: "timed out"})
            raise failure(f"no approval within {cfg.timeout_s:g} s: release of {spec.version} aborted before {stage}, "
                          "nothing past that step was done")
        if time.monotonic() - reminded >= REMINDER_S:
            reminded = time.monotonic()
            context.log.info(f"still waiting for approval ({waited:.0f} s): {how}")
        time.sleep(poll_s)


def approval_record(context: dg.OpExecutionContext) -> dict:
    """Who approved this run and when (empty when the release needed no approval): for the release history."""
    run = context.instance.get_run_by_id(context.run_id)  # read now: the decision's tags came after the run started
    tags = run.tags if run is not None else {}
    if tags.get(APPROVAL_TAG) != "promoted":
        return {}
    return {"approved_by": tags.get(BY_TAG, ""), "approved_at": tags.get(AT_TAG, "")}


class ApprovalDecision(dg.Config):
    run_id: str = Field(description="The release run waiting for a decision (its id, from the runs list).")
    decision: str = Field(description="promote or abort.")
    by: str = Field(description="Who decides (recorded with the release).")
    note: str = Field("", description="Why (optional; recorded).")


@dg.op(
    description="Promotes or aborts a release that waits for approval: checks it is a release run waiting for a "
                "decision, tags it with the decision, who and when, and records it as an approvals/<environment> event.",
    tags={"stage": "approval"},
)
def record_approval(context: dg.OpExecutionContext, config: ApprovalDecision) -> dict:
    problems = []
    if config.decision not in ("promote", "abort"):
        problems.append(f"decision: must be promote or abort (got {config.decision!r})")
    if not config.by.strip():
        problems.append("by: say who decides")
    run = context.instance.get_run_by_id(config.run_id) if config.run_id else None
    if run is None:
        problems.append(f"run_id: no run {config.run_id!r}")
    elif run.job_name != "release":
        problems.append(f"run_id: {config.run_id[:8]} is a {run.job_name} run, not a release")
    elif run.status != dg.DagsterRunStatus.STARTED or run.tags.get(APPROVAL_TAG) != "waiting":
        problems.append(f"run_id: release {config.run_id[:8]} is not waiting for approval (status {run.status.value}, "
                        f"approval {run.tags.get(APPROVAL_TAG, 'not required')})")
    elif run.tags.get(DECISION_TAG):
        problems.append(f"run_id: release {config.run_id[:8]} was already decided ({run.tags[DECISION_TAG]} by "
                        f"{run.tags.get(BY_TAG)})")
    if problems:
        raise failure("no decision recorded:\n" + "\n".join(f"  - {p}" for p in problems))
    at = datetime.now(UTC).isoformat(timespec="seconds")
    context.instance.add_run_tags(config.run_id, {DECISION_TAG: config.decision, BY_TAG: config.by.strip(), AT_TAG: at})
    environment = run.tags.get("ops/environment", "?")
    context.log_event(dg.AssetMaterialization(
        asset_key=dg.AssetKey(["approvals", environment]),
        description=f"{config.decision} of {run.tags.get('ops/version', '?')} by {config.by}",
        metadata={"release_run": dg.MetadataValue.dagster_run(config.run_id), "version": run.tags.get("ops/version", ""),
                  "decision": config.decision, "by": config.by.strip(), "at": at, "note": config.note},
    ))
    context.log.info(f"{config.decision} of release {config.run_id[:8]} ({run.tags.get('ops/version')}) by {config.by} "
                     f"recorded; the release picks it up within a second")
    return {"run_id": config.run_id, "decision": config.decision, "by": config.by, "at": at}
