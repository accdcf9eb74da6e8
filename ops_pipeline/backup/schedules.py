"""Nightly backups and the weekly restore drill.

Settings come from the environment when the code location loads, and are validated then:
OPS_BACKUP_CRON (default `0 2 * * *`), OPS_DRILL_CRON (default `0 4 * * 0`), OPS_TIMEZONE (default UTC;
in a zone with daylight saving, a 02:00 schedule runs at 03:00 on the spring-forward day),
OPS_BACKUP_ENVIRONMENT (default `local`), OPS_BACKUP_PRODUCTION (default false).
"""

import os
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg

from ops_pipeline.backup.jobs import backup, restore_drill_job
from ops_pipeline.platform.spec import ENV_NAME


class ScheduleSettingsError(ValueError):
    pass


def _cron(name: str, default: str) -> str:
    value = os.environ.get(name, default).strip()
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(value):
        raise ScheduleSettingsError(f"{name}: {value!r} is not a valid cron expression (e.g. '0 2 * * *')")
    return value


def _timezone() -> str:
    tz = os.environ.get("OPS_TIMEZONE", "UTC").strip()
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleSettingsError(f"OPS_TIMEZONE: {tz!r} is not a known IANA time zone (e.g. UTC, Europe/Berlin)") from None
    return tz


def _environment() -> tuple[str, bool]:
    env = os.environ.get("OPS_BACKUP_ENVIRONMENT", "local")
    if not ENV_NAME.match(env):
        raise ScheduleSettingsError(f"OPS_BACKUP_ENVIRONMENT: {env!r} is not a valid environment name")
    production = os.environ.get("OPS_BACKUP_PRODUCTION", "false").lower() in ("1", "true", "yes")
    return env, production


def backup_run_config(environment: str, production: bool, trigger: str) -> dict:
    target = {"environment": environment, "production": production, "embedded_services": not production, "trigger": trigger}
    return {"ops": {"backup_target": {"config": target}}}


def build_schedules() -> list[dg.ScheduleDefinition]:
    tz = _timezone()
    env, production = _environment()
    nightly = dg.ScheduleDefinition(
        name="nightly_backup",
        job=backup,
        cron_schedule=_cron("OPS_BACKUP_CRON", "0 2 * * *"),
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
        cron_schedule=_cron("OPS_DRILL_CRON", "0 4 * * 0"),
        execution_timezone=tz,
        run_config=drill_config,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        tags={"ops/environment": env, "ops/trigger": "drill"},
        description=f"Weekly restore drill: the newest '{env}' backup is restored into a scratch database and checked.",
    )
    return [nightly, drill]
