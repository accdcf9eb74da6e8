"""The release domain: the release, rollback and plan (dry run) jobs and the sensors that roll a bad release back."""

import dagster as dg

from ops_pipeline.release.jobs import approve_release, check_hosts_job, plan, release, rollback
from ops_pipeline.release.sensors import health_watch, rollback_on_release_failure, run_liveness

defs = dg.Definitions(jobs=[release, rollback, plan, approve_release, check_hosts_job], sensors=[health_watch, rollback_on_release_failure, run_liveness])
