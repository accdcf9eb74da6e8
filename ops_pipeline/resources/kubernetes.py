"""Kubernetes API (the official client): Deployment rollouts."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class KubernetesResource(dg.ConfigurableResource):
    """A Kubernetes API server."""

    api_server: str = Field("", description="API server URL (empty: kubeconfig / in-cluster).")

    def target(self, spec, redactor=None):
        raise RuntimeError("the kubernetes target is not available yet")
