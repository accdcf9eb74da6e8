"""Kubernetes API (the official `kubernetes` client): the connection; the rollout logic is in targets/kubernetes.py."""

from __future__ import annotations

import dagster as dg
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException
from pydantic import Field

from ops_pipeline.platform.spec import KubernetesTargetConfig


class KubernetesResource(dg.ConfigurableResource):
    """A Kubernetes API server, reached with the official client."""

    api_server: str = Field("", description="API server URL (empty: kubeconfig, then in-cluster config).")
    kubeconfig: str = Field("", description="Path to a kubeconfig (empty: default loading rules).")
    token: str = Field("", description="Bearer token; set it with dg.EnvVar, never inline.")
    verify_ssl: bool = Field(True, description="Verify the API server's TLS certificate.")
    context: str = Field("", description="kubeconfig context (empty: the current one).")

    def api_client(self, spec_cfg: KubernetesTargetConfig | None = None) -> client.ApiClient:
        """The spec's api_server / kubeconfig win over the resource's; with neither, kubeconfig then in-cluster."""
        server = (spec_cfg.api_server if spec_cfg else "") or self.api_server
        kubeconfig = (spec_cfg.kubeconfig if spec_cfg else "") or self.kubeconfig
        cfg = client.Configuration()
        if kubeconfig or not server:
            try:
                config.load_kube_config(config_file=kubeconfig or None, context=self.context or None,
                                        client_configuration=cfg)
            except (ConfigException, OSError) as kube_err:
                if kubeconfig:
                    raise
                try:
                    config.load_incluster_config(client_configuration=cfg)
                except ConfigException as cluster_err:
                    raise ConfigException(f"no Kubernetes API configured: set target.kubernetes.api_server or kubeconfig "
                                          f"(kubeconfig: {kube_err}; in-cluster: {cluster_err})") from cluster_err
        if server:
            cfg.host = server
        if self.token:
            cfg.api_key = {"authorization": f"Bearer {self.token}"}  # replaces kubeconfig credentials
            cfg.api_key_prefix = {}
            cfg.refresh_api_key_hook = None
        if not self.verify_ssl:
            cfg.verify_ssl = False
        return client.ApiClient(cfg)

