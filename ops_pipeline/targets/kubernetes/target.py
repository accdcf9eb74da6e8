"""Kubernetes target: a release sets a Deployment's image through the official `kubernetes` client.

The cluster does the rolling update (the seed Deployment: RollingUpdate with maxSurge 1 / maxUnavailable 0 and
a readiness probe on /health, so old pods serve until new ones are ready). This target only

- PATCHes the Deployment (strategic merge): the container's image, APP_VERSION, the pod template annotation
  `ops-pipeline/version`, and `kubernetes.io/change-cause` on the Deployment;
- waits by the rules of `kubectl rollout status` (`rollout_status`), at most target.kubernetes.progress_deadline_s;
- when the rollout does not complete, restores the previous revision's pod template like `kubectl rollout undo`.

`app_env` is never written into the Deployment: the seed reads its secrets from the Secret `api-secrets`.
Pods are not reachable from the orchestrator, so instances carry no probe URL.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Literal

from kubernetes import client
from kubernetes.client import ApiException

from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import ReleaseSpec
from ops_pipeline.targets.base import Artifact, DeployTarget, Instance, LogFn, RolloutError, RolloutReport
from ops_pipeline.targets.kubernetes.client import KubernetesResource

VERSION_ANNOTATION = "ops-pipeline/version"
CHANGE_CAUSE = "kubernetes.io/change-cause"
REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Deployment annotations `kubectl rollout undo` keeps rather than copying them from the ReplicaSet.
UNDO_KEEPS = {"kubectl.kubernetes.io/last-applied-configuration", REVISION, "deployment.kubernetes.io/revision-history",
              "deployment.kubernetes.io/desired-replicas", "deployment.kubernetes.io/max-replicas",
              "deprecated.deployment.rollback.to"}


@dataclass(frozen=True)
class RolloutStatus:
    state: Literal["waiting", "done", "failed"]
    message: str


def rollout_status(dep: client.V1Deployment) -> RolloutStatus:
    """kubectl's DeploymentStatusViewer.Status (k8s.io/kubectl/pkg/polymorphichelpers/rollout_status.go), except that
    a rollout past its progress deadline reports the Progressing condition's own message (it names the ReplicaSet)."""
    name = dep.metadata.name if dep.metadata else "?"
    st = dep.status or client.V1DeploymentStatus()
    generation = (dep.metadata.generation if dep.metadata else None) or 0
    if generation > (st.observed_generation or 0):
        return RolloutStatus("waiting", "Waiting for deployment spec update to be observed...")
    cond = next((c for c in st.conditions or [] if c.type == "Progressing"), None)
    if cond is not None and cond.reason == "ProgressDeadlineExceeded":
        return RolloutStatus("failed", cond.message or f'deployment "{name}" exceeded its progress deadline')
    replicas, updated, available = st.replicas or 0, st.updated_replicas or 0, st.available_replicas or 0
    waiting = f'Waiting for deployment "{name}" rollout to finish: '
    if dep.spec.replicas is not None and updated < dep.spec.replicas:
        return RolloutStatus("waiting", f"{waiting}{updated} out of {dep.spec.replicas} new replicas have been updated...")
    if replicas > updated:
        return RolloutStatus("waiting", f"{waiting}{replicas - updated} old replicas are pending termination...")
    if available < updated:
        return RolloutStatus("waiting", f"{waiting}{available} of {updated} updated replicas are available...")
    return RolloutStatus("done", f'deployment "{name}" successfully rolled out')


class UndoError(RuntimeError):
    """The previous revision could not be restored."""


class KubernetesTarget(DeployTarget):
    kind = "kubernetes"
    poll_interval_s = 1.0

    def __init__(self, spec: ReleaseSpec, runtime: KubernetesResource, prober: HttpProber,
                 redactor: Redactor | None = None) -> None:
        """`prober` is unused: the cluster's readiness probes decide when a pod serves."""
        self.spec = spec
        self.cfg = spec.target.kubernetes
        self.api = api = runtime.api_client(self.cfg)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.redactor = (redactor or Redactor()).add(runtime.token)
        self.where = f"deployment {self.cfg.namespace}/{self.cfg.deployment}"

    # ---- reading the cluster --------------------------------------------------------------------
    def _deployment(self) -> client.V1Deployment:
        return self.apps.read_namespaced_deployment(self.cfg.deployment, self.cfg.namespace)

    def _replica_sets(self, dep: client.V1Deployment) -> list[client.V1ReplicaSet]:
        """The ReplicaSets the Deployment controls (selected by its selector, then by owner)."""
        items = self.apps.list_namespaced_replica_set(self.cfg.namespace, label_selector=_selector(dep)).items
        return [rs for rs in items if _controller_uid(rs.metadata) == dep.metadata.uid]

    def serving(self) -> list[Instance]:
        dep = self._deployment()
        owned = {rs.metadata.uid: rs for rs in self._replica_sets(dep)}
        pods = self.core.list_namespaced_pod(self.cfg.namespace, label_selector=_selector(dep)).items
        instances = [self._instance(pod, owned[uid]) for pod in pods if (uid := _controller_uid(pod.metadata)) in owned]
        return sorted(instances, key=lambda i: i.name)

    def _instance(self, pod: client.V1Pod, rs: client.V1ReplicaSet) -> Instance:
        st = pod.status or client.V1PodStatus()
        ready = any(c.type == "Ready" and c.status == "True" for c in st.conditions or [])
        status = (st.phase or "unknown").lower()  # pending, running, succeeded, failed, unknown
        if pod.metadata.deletion_timestamp:
            status = "terminating"
        elif ready:
            status = "running"
        elif status == "running":
            status = "unready"  # running, but not passing its readiness probe: gets no traffic
        container = next((c for c in pod.spec.containers if c.name == self.cfg.container), None)
        env = {e.name: e.value for e in (container.env if container else None) or [] if e.value is not None}
        version = (pod.metadata.annotations or {}).get(VERSION_ANNOTATION) or env.get(self.spec.app.version_env, "?")
        return Instance(
            id=pod.metadata.name, name=pod.metadata.name, version=version, status=status, probe_url="",
            restarts=sum(cs.restart_count for cs in st.container_statuses or []), deploy_id=rs.metadata.name,
            extra={"revision": _revision(rs), "image": container.image if container else "", "pod_ip": st.pod_ip,
                   "node": pod.spec.node_name},
        )

    # ---- releasing ------------------------------------------------------------------------------
    def prepare(self, artifact: Artifact, version: str, log: LogFn) -> str:
        """Nothing to do: the cluster pulls the image itself."""
        return artifact.ref

    def stop(self) -> list[str]:
        """Nothing local to stop: the Deployment is the cluster's, and a teardown never deletes it."""
        return []

    def rollout(self, artifact: Artifact, version: str, app_env: dict[str, str], log: LogFn, *,
                surge_all: bool = False) -> RolloutReport:
        # app_env is deliberately unused: its secrets reach the pods through the Secret `api-secrets`.
        report = RolloutReport(version=version, previous_versions=sorted({i.version for i in self.serving()}))
        if artifact.kind != "image":
            raise RolloutError(f"{self.where}: the kubernetes target deploys images, got a {artifact.kind} ({artifact.id})",
                               report)
        image = artifact.digest_ref or artifact.ref
        started = time.monotonic()
        patch = {
            "metadata": {"annotations": {CHANGE_CAUSE: f"ops-pipeline: release {version} ({image})"}},
            "spec": {"template": {
                "metadata": {"annotations": {VERSION_ANNOTATION: version}},
                "spec": {"containers": [{"name": self.cfg.container, "image": image,
                                         "env": [{"name": self.spec.app.version_env, "value": version}]}]},
            }},
        }
        try:
            self.apps.patch_namespaced_deployment(self.cfg.deployment, self.cfg.namespace, patch,
                                                  _content_type=STRATEGIC_MERGE_PATCH)
        except ApiException as exc:
            raise RolloutError(self.redactor(f"{self.where}: could not set image {image}: {_api_error(exc)}"), report) from exc
        report.add("started", self.where, version, started, f"image {image}")
        log(f"{self.where}: image set to {image} ({version}); waiting for the rollout")
        try:
            status = self._wait(log, report, started)
        except ApiException as exc:
            status = RolloutStatus("failed", f"could not read {self.where}: {_api_error(exc)}")
        if status.state == "done":
            report.add("healthy", self.where, version, started, status.message)
            report.instances = [i.name for i in self.serving()]
            report.finished_at = time.time()
            return report
        report.add("failed", self.where, version, started, status.message)
        log(f"{self.where}: rollout of {version} failed: {status.message}; rolling back")
        try:
            revision = self.undo(log)
            back = self._wait(log)
            rollback = f"rolled back to revision {revision}"
            if back.state != "done":
                rollback += f", not settled: {back.message}"
        except (UndoError, ApiException) as exc:
            rollback = f"ROLLBACK FAILED: {_api_error(exc) if isinstance(exc, ApiException) else exc}"
        report.add("aborted", self.where, version, started, rollback)
        report.finished_at = time.time()
        serving = self.serving()
        versions = ", ".join(sorted({i.version for i in serving if i.status == "running"})) or "nothing"
        raise RolloutError(self.redactor(f"rollout of {version} to {self.where} failed: {status.message} ({rollback}; "
                                         f"{sum(i.status == 'running' for i in serving)} ready pod(s) serving {versions})"),
                           report, serving)

    def _wait(self, log: LogFn, report: RolloutReport | None = None, started: float = 0.0) -> RolloutStatus:
        """Poll until `rollout_status` is done or failed, or progress_deadline_s passes. Steps go to `report`."""
        deadline = time.monotonic() + self.cfg.progress_deadline_s
        last_message, seen = "", None
        while True:
            try:
                dep = self._deployment()
            except ApiException as exc:
                if exc.status not in (429, 500, 502, 503, 504) or time.monotonic() >= deadline:
                    raise
                log(f"{self.where}: API server busy ({_api_error(exc)}); retrying")
                time.sleep(self.poll_interval_s)
                continue
            status = rollout_status(dep)
            if status.message != last_message:
                log(status.message)
                last_message = status.message
            st = dep.status or client.V1DeploymentStatus()
            if report is not None and (dep.metadata.generation or 0) <= (st.observed_generation or 0):
                # New pods started (updatedReplicas up), old pods removed (replicas - updatedReplicas down).
                updated, old = st.updated_replicas or 0, (st.replicas or 0) - (st.updated_replicas or 0)
                before = seen or (0, old)
                detail = f"{updated}/{dep.spec.replicas} updated, {st.available_replicas or 0} available, {old} old"
                if updated > before[0]:
                    report.add("started", self.where, report.version, started, detail)
                if old < before[1]:
                    report.add("removed", self.where, report.version, started, detail)
                seen = (updated, old)
            if status.state != "waiting":
                return status
            if time.monotonic() >= deadline:
                return RolloutStatus("failed", f"not complete after {self.cfg.progress_deadline_s:g} s "
                                               f"(target.kubernetes.progress_deadline_s); last status: {status.message}")
            time.sleep(self.poll_interval_s)

    def undo(self, log: LogFn) -> int:
        """`kubectl rollout undo`: put the previous revision's pod template back. Returns that revision."""
        dep = self._deployment()
        if dep.spec.paused:
            raise UndoError(f"{self.where} is paused; resume it (kubectl rollout resume) before rolling back")
        template = self._template(dep.spec.template)
        history = sorted(((r, rs) for rs in self._replica_sets(dep) if (r := _revision(rs)) is not None), key=lambda h: h[0])
        # The current template's revision: its ReplicaSet's, or newer than all when none was created yet.
        current = next((r for r, rs in history if self._template(rs.spec.template) == template), math.inf)
        older = [(r, rs) for r, rs in history if r < current]
        if not older:
            raise UndoError(f"{self.where}: no earlier revision to roll back to (revisions: {[r for r, _ in history]})")
        revision, rs = older[-1]
        annotations = {k: v for k, v in (dep.metadata.annotations or {}).items() if k in UNDO_KEEPS}
        annotations.update({k: v for k, v in (rs.metadata.annotations or {}).items() if k not in UNDO_KEEPS})
        self.apps.patch_namespaced_deployment(self.cfg.deployment, self.cfg.namespace, [
            {"op": "replace", "path": "/spec/template", "value": self._template(rs.spec.template)},
            {"op": "replace", "path": "/metadata/annotations", "value": annotations},
        ], _content_type=JSON_PATCH)
        log(f"{self.where}: restored the pod template of revision {revision} ({rs.metadata.name})")
        return revision

    def _template(self, template: client.V1PodTemplateSpec) -> dict:
        """A pod template as JSON, without the pod-template-hash label the controller adds to its ReplicaSets."""
        data = self.api.sanitize_for_serialization(template)
        (data.get("metadata") or {}).get("labels", {}).pop(HASH_LABEL, None)
        return data


def _selector(dep: client.V1Deployment) -> str:
    sel = dep.spec.selector
    terms = [f"{k}={v}" for k, v in (sel.match_labels or {}).items()]
    for e in sel.match_expressions or []:
        values = ",".join(e.values or [])
        terms.append({"In": f"{e.key} in ({values})", "NotIn": f"{e.key} notin ({values})",
                      "Exists": e.key, "DoesNotExist": f"!{e.key}"}[e.operator])
    return ",".join(terms)


def _controller_uid(meta: client.V1ObjectMeta) -> str | None:
    return next((o.uid for o in meta.owner_references or [] if o.controller), None)


def _revision(obj: client.V1ReplicaSet) -> int | None:
    try:
        return int((obj.metadata.annotations or {})[REVISION])
    except (KeyError, ValueError):
        return None


def _api_error(exc: ApiException) -> str:
    try:
        message = json.loads(exc.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        message = exc.body or ""
    return f"HTTP {exc.status} {exc.reason}: {message}".strip()
