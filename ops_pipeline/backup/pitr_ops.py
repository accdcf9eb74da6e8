"""The `restore_point_in_time` op: the environment's settings as the other backup ops resolve them, then
archive_ops.restore_point_in_time."""

import dagster as dg

from ops_pipeline.backup import archive_ops
from ops_pipeline.backup.ops import BackupTargetConfig, database_url, target_spec
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.local_stack import LocalStack


@dg.op(
    description=(
        "Point-in-time restore (archive mode): the base backup and the WAL up to the target (latest, a time, or a named "
        "restore point such as a release's) into a NEW data folder and a server of its own, verified (row counts, "
        "pg_amcheck). Only with switch_over and the live data folder typed in confirm_data_dir does it record a restore "
        "point on the live server and swap the data folders (the old one is kept)."
    ),
    tags={"stage": "restore"},
)
def restore_point_in_time(context: dg.OpExecutionContext, config: archive_ops.PitrConfig, backup_store: BackupStore,
                          local_stack: LocalStack) -> dict:
    spec = target_spec(BackupTargetConfig(environment=config.environment, production=config.production,
                                          embedded_services=config.embedded_services,
                                          database_url_env=config.database_url_env), context.instance)
    url, env = database_url(spec, local_stack)
    return archive_ops.restore_point_in_time(context, config, spec, url, env.redactor, backup_store)
