"""Deploy targets. `DeployTargets` holds the runtime systems (PM2, Docker Engine, Kubernetes) and the HTTP prober,
and builds the target a release spec names."""

import dagster as dg
from pydantic import Field

from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import DeployTargetKind, ReleaseSpec
from ops_pipeline.targets.base import DeployTarget
from ops_pipeline.targets.docker.engine import DockerEngine
from ops_pipeline.targets.docker.target import DockerTarget
from ops_pipeline.targets.kubernetes.client import KubernetesResource
from ops_pipeline.targets.kubernetes.target import KubernetesTarget
from ops_pipeline.targets.pm2.target import Pm2Resource, Pm2Target


class DeployTargets(dg.ConfigurableResource):
    """The systems releases run on; the release spec's `target.kind` picks one."""

    pm2: Pm2Resource = Field(description="PM2 on this host.")
    docker: DockerEngine = Field(description="Docker Engine API (DOCKER_HOST).")
    kubernetes: KubernetesResource = Field(description="Kubernetes API.")
    prober: HttpProber = Field(description="HTTP health probes.")

    @classmethod
    def with_defaults(cls, **overrides) -> "DeployTargets":
        parts = {"pm2": Pm2Resource(), "docker": DockerEngine(), "kubernetes": KubernetesResource(), "prober": HttpProber()}
        return cls(**{**parts, **overrides})

    def for_spec(self, spec: ReleaseSpec, redactor: Redactor | None = None) -> DeployTarget:
        """The target `spec.target.kind` names, built like every target: (spec, its system's resource, prober, redactor)."""
        target_class, runtime = TARGETS[spec.target.kind]
        return target_class(spec, getattr(self, runtime), self.prober, redactor)


TARGETS: dict[DeployTargetKind, tuple[type[DeployTarget], str]] = {
    DeployTargetKind.pm2: (Pm2Target, "pm2"),
    DeployTargetKind.docker: (DockerTarget, "docker"),
    DeployTargetKind.kubernetes: (KubernetesTarget, "kubernetes"),
}
