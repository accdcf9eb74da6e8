"""The code location's settings: every `OPS_*` variable, parsed once (pydantic-settings), each error naming its variable.

`settings()` parses the environment the first time it is called and keeps the result for the life of the process:
the resources (definitions.py), the schedules and the health watch all read this one object. Every problem is reported
at once, e.g. `OPS_HEALTH_PROBES_PER_TICK: must be >= 1 (got '0')`.

Not here on purpose: `OPS_STATE_DIR` and `OPS_PROJECT_ROOT` (paths.py reads them on each call, so one process can
work on several state folders, as the tests do), secrets (`EnvVar`s resolved inside the run, never parsed at load) and
the variables a release gives the app (`OPS_PORT`, `OPS_SLOT`, ...).
"""

from __future__ import annotations

import functools
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ops_pipeline.platform.spec import ENV_NAME


class SettingsError(ValueError):
    """One or more `OPS_*` variables are invalid; the message names each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPS_", extra="ignore", frozen=True)

    # backup store (resources: BackupStore)
    backup_store: Literal["local", "s3"] = "local"
    backup_dir: str = ""
    backup_bucket: str = ""
    backup_prefix: str = "backups"
    s3_endpoint_url: str = ""
    s3_max_attempts: int = Field(3, ge=1, le=20)
    backup_compression: str = Field("zstd-dump", pattern=r"^(zstd-dump|zstd-([1-9]|1[0-9]))$")
    backup_zstd_threads: int = Field(2, ge=0, le=64)
    backup_s3_sse: Literal["", "AES256", "aws:kms"] = ""
    backup_s3_sse_kms_key_id: str = ""
    # references (env:NAME / file:/path) to the dump encryption keys, never the keys; previous: comma-separated
    backup_cipher_key_from: str = Field("", pattern=r"^(|env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$")
    backup_previous_keys_from: str = Field("", pattern=r"^(|(env:[A-Za-z_][A-Za-z0-9_]*|file:/[^,]+)(,(env:[A-Za-z_][A-Za-z0-9_]*|file:/[^,]+))*)$")
    # runtimes and tools
    pm2_bin: str = ""
    pg_bin: str = ""
    redis_server: str = ""
    k8s_api_server: str = ""
    registry_username: str = ""
    slack_channel: str = ""
    # schedules: nightly backup, weekly restore drill
    backup_cron: str = "0 2 * * *"
    drill_cron: str = "0 4 * * 0"
    timezone: str = "UTC"
    backup_environment: str = "local"
    backup_production: bool = False
    # health watch (release/sensors.py)
    health_failure_threshold: int = Field(3, ge=1)
    health_probes_per_tick: int = Field(5, ge=1)
    health_probe_interval_s: float = Field(1.0, ge=0.05, allow_inf_nan=False)
    health_probe_timeout_s: float = Field(2.0, ge=0.1, allow_inf_nan=False)
    health_max_parallel: int = Field(64, ge=1)

    @field_validator("backup_cron", "drill_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string

        value = value.strip()
        if not is_valid_cron_string(value):
            raise ValueError(f"{value!r} is not a valid cron expression (e.g. '0 2 * * *')")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        value = value.strip()
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
        return value

    @field_validator("backup_environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid environment name (lower-case letters, digits, '-')")
        return value


def load_settings() -> Settings:
    """Parse the environment now. Raises `SettingsError` naming every bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "OPS_" + "_".join(str(p) for p in err["loc"]).upper()
            message = err["msg"].removeprefix("Value error, ")
            got = repr(err.get("input"))
            if name.endswith(("KEYS_FROM", "KEY_FROM")):  # a key pasted in place of its reference
                got, message = "a value that is not shown", "must be env:NAME or file:/absolute/path (a reference, not the key)"
            problems.append(f"{name}: {message}" + ("" if got in message else f" (got {got})"))
        raise SettingsError(problems) from None


@functools.cache
def settings() -> Settings:
    """The settings of this process, parsed on first use."""
    return load_settings()
