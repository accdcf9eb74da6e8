"""The release domain: the release and rollback jobs and the sensors that roll a bad release back."""

import dagster as dg

from ops_pipeline.release.jobs import release, rollback
from ops_pipeline.release.sensors import health_watch, rollback_on_release_failure, run_liveness

defs = dg.Definitions(jobs=[release, rollback], sensors=[health_watch, rollback_on_release_failure, run_liveness])
