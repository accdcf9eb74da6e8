"""Announcements of failed releases and rollbacks (per failed op, inside the run)."""

import dagster as dg


@dg.failure_hook(required_resource_keys={"notifier"}, name="announce_failure")
def announce_failure(context: dg.HookContext) -> None:
    """A failed release or rollback step is announced with its reason (already free of secrets)."""
    tags = context.instance.get_run_by_id(context.run_id).tags if context.instance else {}
    env = tags.get("ops/environment", "?")
    version = tags.get("ops/version", "?")
    exc = context.op_exception
    reason = (getattr(exc, "description", None) or str(exc) or type(exc).__name__).splitlines()[0][:300] if exc else "unknown"
    context.resources.notifier.announce(
        context.log, f":x: {context.job_name} of {env} {version} failed at {context.op.name}: {reason}", level="error")
