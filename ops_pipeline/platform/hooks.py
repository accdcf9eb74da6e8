"""Announcements of failed releases and rollbacks (per failed op, inside the run)."""

import dagster as dg


@dg.failure_hook(required_resource_keys={"notifier"}, name="announce_failure")
def announce_failure(context: dg.HookContext) -> None:
    """A failed release or rollback step is announced with its reason (already free of secrets)."""
    run = context.instance.get_run_by_id(context.run_id) if context.instance else None
    tags = run.tags if run else {}
    # A release that failed before verify_env tagged the run: the environment is still in its run config.
    configured = {}
    for op_config in ((run.run_config or {}).get("ops", {}) if run else {}).values():
        if isinstance(op_config, dict) and isinstance(op_config.get("config"), dict):
            configured = op_config["config"]
            break
    env = tags.get("ops/environment") or configured.get("environment") or "(environment not given)"
    version = tags.get("ops/version") or configured.get("version") or configured.get("target_version") or "(version not decided)"
    exc = context.op_exception
    text = (getattr(exc, "description", None) or str(exc) or type(exc).__name__) if exc else "unknown"
    reason = " ".join(line.strip() for line in text.splitlines()[:4])[:500]
    context.resources.notifier.announce(
        context.log, f":x: {context.job_name} of {env} {version} failed at {context.op.name}: {reason}", level="error")
