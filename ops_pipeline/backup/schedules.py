"""Nightly backups and the weekly restore drill.

Settings (platform/settings.py: parsed once, when the code location loads, each error naming its variable):
OPS_BACKUP_CRON (default `0 2 * * *`), OPS_DRILL_CRON (default `0 4 * * 0`), OPS_TIMEZONE (default UTC;
in a zone with daylight saving, a 02:00 schedule runs at 03:00 on the spring-forward day),
OPS_BACKUP_ENVIRONMENT (default `local`), OPS_BACKUP_PRODUCTION (default false).
"""


import dagster as dg

from ops_pipeline.backup.jobs import backup, restore_drill_job
from ops_pipeline.platform.settings import Settings


def backup_run_config(environment: str, production: bool, trigger: str) -> dict:
    target = {"environment": environment, "production": production, "embedded_services": not production, "trigger": trigger}
    return {"ops": {"backup_target": {"config": target}}}


def build_schedules(s: Settings) -> list[dg.ScheduleDefinition]:
    tz, env, production = s.timezone, s.backup_environment, s.backup_production
    nightly = dg.ScheduleDefinition(
        name="nightly_backup",
        job=backup,
        cron_schedule=s.backup_cron,
        execution_timezone=tz,
        run_config=backup_run_config(env, production, "nightly"),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        tags={"ops/environment": env, "ops/trigger": "nightly"},
        description=f"Nightly verified backup of the '{env}' database, then retention (7 daily / 4 weekly / 6 monthly, floor 3).",
    )
    drill_config = backup_run_config(env, production, "manual")
    drill_config = {"ops": {"backup_target": drill_config["ops"]["backup_target"]}}
    drill = dg.ScheduleDefinition(
        name="weekly_restore_drill",
        job=restore_drill_job,
        cron_schedule=s.drill_cron,
        execution_timezone=tz,
        run_config=drill_config,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        tags={"ops/environment": env, "ops/trigger": "drill"},
        description=f"Weekly restore drill: the newest '{env}' backup is restored into a scratch database and checked.",
    )
    return [nightly, drill]
