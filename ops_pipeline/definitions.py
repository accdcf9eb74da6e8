"""The one Definitions of ops-pipeline: the release and backup domains' jobs, schedules and sensors, merged, and one
resource per external system.

Resource settings come from the environment of the code location (12-factor); secrets are `EnvVar`s,
so the UI shows the variable's name, never its value:

    OPS_BACKUP_STORE=local|s3   OPS_BACKUP_DIR   OPS_BACKUP_BUCKET   OPS_BACKUP_PREFIX
    OPS_S3_ENDPOINT_URL   AWS_REGION   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (EnvVar)
    OPS_PG_BIN (PostgreSQL client tools)   DOCKER_HOST   OPS_K8S_API_SERVER
    SLACK_BOT_TOKEN (EnvVar) + OPS_SLACK_CHANNEL
"""

import os
import warnings

import dagster as dg

from ops_pipeline.backup import definitions as backup_domain
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.local_stack import LocalStack
from ops_pipeline.platform.notify import Notifier
from ops_pipeline.platform.postgres import PostgresResource
from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.platform.redis import RedisResource
from ops_pipeline.platform.settings import Settings, settings
from ops_pipeline.release import definitions as release_domain
from ops_pipeline.targets.docker.engine import DockerEngine
from ops_pipeline.targets.kubernetes.client import KubernetesResource
from ops_pipeline.targets.pm2.target import Pm2Resource
from ops_pipeline.targets.resource import DeployTargets

# Dagster 1.13 itself passes `owners` when Definitions binds resources to the jobs the sensors target
# (SensorDefinition.with_updated_jobs); the BetaWarning it raises is about its own call, not ours.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=r"Parameter `owners`")


def _env_secret(name: str):
    """An EnvVar when the variable is set (resolved inside the run), else empty."""
    return dg.EnvVar(name) if os.environ.get(name) else ""


def build_resources(s: Settings | None = None) -> dict:
    """One resource per external system, from the settings (default: this process's, parsed once)."""
    s = s or settings()
    docker = DockerEngine(base_url=os.environ.get("DOCKER_HOST", ""), registry_username=s.registry_username,
                          registry_password=_env_secret("OPS_REGISTRY_PASSWORD"))
    return {
        "local_stack": LocalStack(),
        "postgres": PostgresResource(bin_dir=s.pg_bin),
        "redis": RedisResource(),
        "backup_store": BackupStore(
            kind=s.backup_store,
            local_dir=s.backup_dir,
            bucket=s.backup_bucket,
            prefix=s.backup_prefix,
            s3_endpoint_url=s.s3_endpoint_url,
            s3_region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=_env_secret("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=_env_secret("AWS_SECRET_ACCESS_KEY"),
            s3_max_attempts=s.s3_max_attempts,
            compression=s.backup_compression,
            zstd_threads=s.backup_zstd_threads,
            s3_sse=s.backup_s3_sse,
            s3_sse_kms_key_id=s.backup_s3_sse_kms_key_id,
            cipher_key_from=s.backup_cipher_key_from,
            previous_keys_from=[r for r in s.backup_previous_keys_from.split(",") if r],
        ),
        "deploy_targets": DeployTargets(
            pm2=Pm2Resource(pm2_bin=s.pm2_bin),
            docker=docker,
            kubernetes=KubernetesResource(api_server=s.k8s_api_server, token=_env_secret("OPS_K8S_TOKEN")),
            prober=HttpProber(),
        ),
        "docker_engine": docker,
        "notifier": Notifier(slack_token=_env_secret("SLACK_BOT_TOKEN"), slack_channel=s.slack_channel),
    }


# One Definitions per domain (release, backup), merged here with the resources every domain shares.
defs = dg.Definitions.merge(release_domain.defs, backup_domain.defs, dg.Definitions(resources=build_resources()))
