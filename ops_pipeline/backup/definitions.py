"""The backup domain: backup, restore drill and restore jobs, and their schedules."""

import dagster as dg

from ops_pipeline.backup.jobs import backup, restore_database_job, restore_drill_job, restore_point_in_time_job
from ops_pipeline.backup.schedules import build_schedules
from ops_pipeline.platform.settings import settings

defs = dg.Definitions(jobs=[backup, restore_drill_job, restore_database_job, restore_point_in_time_job], schedules=build_schedules(settings()))
