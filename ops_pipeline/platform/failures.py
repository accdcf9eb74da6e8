"""One module per stage of a release (and of backups and rollbacks)."""

import dagster as dg


def failure(description: str, metadata: dict | None = None) -> dg.Failure:
    """A step's deterministic failure: explained in `description` (already free of secrets), never retried. Retries
    are only for transient errors, which the ops that have them raise themselves (`allow_retries=True`)."""
    return dg.Failure(description=description, metadata=metadata, allow_retries=False)
