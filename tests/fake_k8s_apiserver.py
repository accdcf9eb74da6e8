"""A fake Kubernetes API server on loopback: the real REST protocol, a simulated Deployment controller.

No cluster can run on the test machines, so the Kubernetes target is tested against this server with the real
`kubernetes` client. It speaks the JSON REST protocol of the paths the target uses:

    GET   /version
    GET   /apis/apps/v1/namespaces/{ns}/deployments[/{name}]
    PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}   strategic-merge, merge and JSON patch
    PUT   /apis/apps/v1/namespaces/{ns}/deployments/{name}   (resourceVersion checked: 409 on conflict)
    GET   /apis/apps/v1/namespaces/{ns}/replicasets?labelSelector=...
    GET   /api/v1/namespaces/{ns}/pods?labelSelector=...

and a background tick (every `tick_s`) plays the Deployment and ReplicaSet controllers for the RollingUpdate
strategy, ported from kube-controller-manager (pkg/controller/deployment: rolling.go, sync.go, progress.go):
a pod-template change creates a ReplicaSet (revision + 1, pod-template-hash label) or adopts the existing one
whose template matches (a rollback: it gets the next revision), scales it up by at most maxSurge, scales old
ones down only while availability stays >= replicas - maxUnavailable, and writes observedGeneration, the
replica counts and the Progressing / Available conditions (ProgressDeadlineExceeded after
progressDeadlineSeconds without progress, with the controller's message). Pods get Ready `ready_after_s`
after creation, except pods of images marked with `never_ready()`.

Not simulated: watches, admission / most validation, the Recreate strategy, paused Deployments,
minReadySeconds, graceful pod termination (deleted pods vanish at once), revisionHistoryLimit cleanup,
label selectors other than `k=v` / `k!=v`, strategic-merge directives (`$patch`, `$setElementOrder`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

SEED_DEPLOYMENT = Path(__file__).resolve().parents[1] / "examples" / "node-api" / "k8s" / "deployment.yaml"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
HASH_LABEL = "pod-template-hash"
# Deployment annotations the controller does not copy onto its ReplicaSets.
NOT_COPIED = {"kubectl.kubernetes.io/last-applied-configuration", REVISION, REVISION_HISTORY,
              "deployment.kubernetes.io/desired-replicas", "deployment.kubernetes.io/max-replicas"}
# patchMergeKey of the list fields a pod template has (strategic merge); other lists are replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for generated name suffixes


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    content_type: str
    authorization: str
    body: str


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def _suffix(n: int, seed: str | None = None) -> str:
    if seed is None:
        return "".join(random.choice(SAFE_ALPHABET) for _ in range(n))
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(SAFE_ALPHABET[b % len(SAFE_ALPHABET)] for b in digest[:n])


# ---- patches ---------------------------------------------------------------------------------------
def strategic_merge(current: Any, patch: Any) -> Any:
    """Strategic merge patch: maps merge recursively (null deletes), lists of MERGE_KEYS merge by their key."""
    if not isinstance(patch, dict) or not isinstance(current, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(current)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list) and isinstance(out.get(key), list):
            merge_key = MERGE_KEYS[key]
            merged = out[key]
            for item in value:
                idx = next((i for i, old in enumerate(merged) if old.get(merge_key) == item.get(merge_key)), None)
                if idx is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[idx] = strategic_merge(merged[idx], item)
        else:
            out[key] = strategic_merge(out.get(key), value)
    return out


def merge_patch(current: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): maps merge, null deletes, lists are replaced."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(current) if isinstance(current, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(current: dict, ops: list) -> dict:
    """JSON patch (RFC 6902): add, replace, remove, test."""
    doc = copy.deepcopy(current)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = doc
        try:
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            last = parts[-1]
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if op["op"] == "add":
                    parent.insert(index, copy.deepcopy(op["value"]))
                elif op["op"] == "replace":
                    parent[index] = copy.deepcopy(op["value"])
                elif op["op"] == "remove":
                    del parent[index]
                elif op["op"] == "test" and parent[index] != op["value"]:
                    raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
            else:
                if op["op"] in ("replace", "remove", "test") and last not in parent:
                    raise ApiError(422, "Invalid", f"{op['op']} operation does not apply: doc is missing path: {op['path']}")
                if op["op"] in ("add", "replace"):
                    parent[last] = copy.deepcopy(op["value"])
                elif op["op"] == "remove":
                    del parent[last]
                elif op["op"] == "test" and parent[last] != op["value"]:
                    raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the JSON patch could not be applied at {op.get('path')}: {exc}") from exc
    return doc


def matches_selector(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        else:
            raise ApiError(400, "BadRequest", f"unsupported label selector term {term!r} (the fake knows k=v and k!=v)")
    return True


def _template_without_hash(template: dict) -> dict:
    t = copy.deepcopy(template)
    t.get("metadata", {}).get("labels", {}).pop(HASH_LABEL, None)
    return t


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = int(value[:-1]) * total / 100
        return int(-(-exact // 1)) if round_up else int(exact)
    return int(value)


def _revision(obj: dict) -> int:
    try:
        return int(obj["metadata"].get("annotations", {}).get(REVISION, "0"))
    except ValueError:
        return 0


# ---- the server ------------------------------------------------------------------------------------
class FakeKubeApiServer:
    """One namespace, Deployments seeded from YAML, their ReplicaSets and pods. Use `start()` / `stop()`."""

    def __init__(self, namespace: str = "default", *, seed: Path = SEED_DEPLOYMENT, token: str = "",
                 progress_deadline_seconds: int | None = None, tick_s: float = 0.05, ready_after_s: float = 0.15) -> None:
        self.namespace = namespace
        self.token = token
        self.tick_s = tick_s
        self.ready_after_s = ready_after_s
        self.lock = threading.RLock()
        self.requests: list[RecordedRequest] = []
        self.deployments: dict[str, dict] = {}
        self.replicasets: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self._ready_at: dict[str, float] = {}  # pod name -> when its readiness probe starts passing
        self._never_ready: set[str] = set()
        self._controller_paused = False
        self._rv = 0
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        for doc in yaml.safe_load_all(seed.read_text()):
            if doc and doc.get("kind") == "Deployment":
                if progress_deadline_seconds is not None:
                    doc["spec"]["progressDeadlineSeconds"] = progress_deadline_seconds
                self._seed(doc)

    # ---- lifecycle & test hooks -------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeKubeApiServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._threads = [threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True),
                         threading.Thread(target=self._run_controller, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
        for t in self._threads:
            t.join(5)

    def never_ready(self, image: str) -> None:
        """Pods of `image` run but never pass their readiness probe."""
        with self.lock:
            self._never_ready.add(image)

    def pause_controller(self, paused: bool = True) -> None:
        """Stop (or resume) the controllers: spec changes stay unobserved."""
        with self.lock:
            self._controller_paused = paused

    def deployment(self, name: str = "api") -> dict:
        with self.lock:
            return copy.deepcopy(self.deployments[name])

    def replica_sets(self) -> list[dict]:
        with self.lock:
            return sorted(copy.deepcopy(list(self.replicasets.values())), key=_revision)

    def pod_list(self) -> list[dict]:
        with self.lock:
            return copy.deepcopy(list(self.pods.values()))

    def bodies(self, method: str = "PATCH") -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.requests if r.method == method]

    # ---- objects ----------------------------------------------------------------------------------
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _meta(self, name: str, **extra: Any) -> dict:
        return {"name": name, "namespace": self.namespace, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                "resourceVersion": self._next_rv(), **extra}

    def _seed(self, doc: dict) -> None:
        meta = doc.setdefault("metadata", {})
        doc["metadata"] = {**self._meta(meta["name"], generation=1), "labels": meta.get("labels", {}),
                           "annotations": meta.get("annotations", {})}
        spec = doc["spec"]
        spec.setdefault("replicas", 1)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
        doc["status"] = {}
        self.deployments[doc["metadata"]["name"]] = doc
        # An already rolled-out Deployment: revision 1 with every pod ready.
        self._sync(doc, instant_ready=True)
        while self._sync(doc, instant_ready=True):
            pass

    def _new_pod(self, rs: dict, instant_ready: bool) -> None:
        template = rs["spec"]["template"]
        name = f"{rs['metadata']['name']}-{_suffix(5)}"
        while name in self.pods:
            name = f"{rs['metadata']['name']}-{_suffix(5)}"
        owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs["metadata"]["name"],
                 "uid": rs["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        meta = self._meta(name, generateName=rs["metadata"]["name"] + "-", ownerReferences=[owner],
                          labels=copy.deepcopy(template["metadata"].get("labels", {})))
        if template["metadata"].get("annotations"):
            meta["annotations"] = copy.deepcopy(template["metadata"]["annotations"])
        spec = {**copy.deepcopy(template["spec"]), "nodeName": "fake-node-1"}
        self.pods[name] = {"metadata": meta, "spec": spec, "status": {}}
        self._ready_at[name] = 0.0 if instant_ready else time.monotonic() + self.ready_after_s
        self._update_pod_status(self.pods[name])

    def _update_pod_status(self, pod: dict) -> None:
        images = [c["image"] for c in pod["spec"]["containers"]]
        ready = time.monotonic() >= self._ready_at[pod["metadata"]["name"]] and not (set(images) & self._never_ready)
        old = pod["status"]
        if old and any(c["type"] == "Ready" and c["status"] == ("True" if ready else "False") for c in old["conditions"]):
            return
        started = old.get("startTime", _now())
        pod["status"] = {
            "phase": "Running", "podIP": f"10.244.0.{len(self.pods) % 250 + 2}", "hostIP": "10.0.0.1", "startTime": started,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": _now()}],
            "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": ready, "restartCount": 0,
                                   "started": True, "state": {"running": {"startedAt": started}}}
                                  for c in pod["spec"]["containers"]],
        }
        pod["metadata"]["resourceVersion"] = self._next_rv()

    def _pods_of(self, rs: dict) -> list[dict]:
        uid = rs["metadata"]["uid"]
        return [p for p in self.pods.values() if any(o["uid"] == uid for o in p["metadata"]["ownerReferences"])]

    def _owned_replicasets(self, dep: dict) -> list[dict]:
        uid = dep["metadata"]["uid"]
        # self.replicasets keeps creation order, the order the controller walks them in.
        return [rs for rs in self.replicasets.values() if any(o["uid"] == uid for o in rs["metadata"]["ownerReferences"])]

    # ---- ReplicaSet controller ----------------------------------------------------------------------
    def _sync_replicaset(self, rs: dict, instant_ready: bool = False) -> None:
        pods = self._pods_of(rs)
        want = rs["spec"]["replicas"]
        for _ in range(want - len(pods)):
            self._new_pod(rs, instant_ready)
        if len(pods) > want:  # delete not-ready pods first, then the newest
            pods.sort(key=lambda p: (p["status"]["conditions"][0]["status"] == "True", -int(p["metadata"]["resourceVersion"])))
            for pod in pods[: len(pods) - want]:
                del self.pods[pod["metadata"]["name"]]
                del self._ready_at[pod["metadata"]["name"]]
        pods = self._pods_of(rs)
        ready = sum(1 for p in pods if p["status"]["conditions"][0]["status"] == "True")
        status = {"replicas": len(pods), "fullyLabeledReplicas": len(pods), "readyReplicas": ready,
                  "availableReplicas": ready, "observedGeneration": rs["metadata"]["generation"]}
        if status != rs["status"]:
            rs["status"] = status
            rs["metadata"]["resourceVersion"] = self._next_rv()

    def _scale(self, rs: dict, replicas: int) -> None:
        if rs["spec"]["replicas"] != replicas:
            rs["spec"]["replicas"] = replicas
            rs["metadata"]["generation"] += 1
            rs["metadata"]["resourceVersion"] = self._next_rv()

    # ---- Deployment controller (RollingUpdate) ------------------------------------------------------
    def _run_controller(self) -> None:
        while not self._stop.wait(self.tick_s):
            with self.lock:
                if self._controller_paused:
                    continue
                for pod in self.pods.values():
                    self._update_pod_status(pod)
                for dep in self.deployments.values():
                    self._sync(dep)

    def _new_replicaset(self, dep: dict, all_rss: list[dict]) -> dict:
        """getNewReplicaSet: the ReplicaSet whose template matches the Deployment's, created if missing."""
        template = _template_without_hash(dep["spec"]["template"])
        new_revision = max((_revision(rs) for rs in all_rss), default=0)
        existing = next((rs for rs in all_rss if _template_without_hash(rs["spec"]["template"]) == template), None)
        dep_annotations = {k: v for k, v in dep["metadata"].get("annotations", {}).items() if k not in NOT_COPIED}
        if existing is not None:
            if _revision(existing) < new_revision or not existing["metadata"]["annotations"].get(REVISION):
                old = existing["metadata"]["annotations"].get(REVISION)
                existing["metadata"]["annotations"].update(dep_annotations)
                existing["metadata"]["annotations"][REVISION] = str(new_revision + 1)
                if old:
                    existing["metadata"]["annotations"][REVISION_HISTORY] = old
                existing["metadata"]["resourceVersion"] = self._next_rv()
            self._set_deployment_revision(dep, existing)
            if self._condition(dep["status"], "Progressing") is None:
                self._set_condition(dep["status"], "Progressing", "True", "FoundNewReplicaSet",
                                    f'Found new replica set "{existing["metadata"]["name"]}"')
            return existing
        pod_hash = _suffix(10, json.dumps(template, sort_keys=True))
        name = f"{dep['metadata']['name']}-{pod_hash}"
        rs_template = copy.deepcopy(dep["spec"]["template"])
        rs_template["metadata"].setdefault("labels", {})[HASH_LABEL] = pod_hash
        selector = copy.deepcopy(dep["spec"]["selector"])
        selector.setdefault("matchLabels", {})[HASH_LABEL] = pod_hash
        owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"],
                 "uid": dep["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        annotations = {**dep_annotations, REVISION: str(new_revision + 1),
                       "deployment.kubernetes.io/desired-replicas": str(dep["spec"]["replicas"]),
                       "deployment.kubernetes.io/max-replicas": str(dep["spec"]["replicas"] + self._max_surge(dep))}
        rs = {"metadata": self._meta(name, generation=1, labels=copy.deepcopy(rs_template["metadata"]["labels"]),
                                     annotations=annotations, ownerReferences=[owner]),
              "spec": {"replicas": 0, "selector": selector, "template": rs_template}, "status": {"replicas": 0}}
        self.replicasets[name] = rs
        self._set_deployment_revision(dep, rs)
        self._set_condition(dep["status"], "Progressing", "True", "NewReplicaSetCreated", f'Created new replica set "{name}"')
        return rs

    def _set_deployment_revision(self, dep: dict, rs: dict) -> None:
        annotations = dep["metadata"].setdefault("annotations", {})
        if annotations.get(REVISION) != rs["metadata"]["annotations"][REVISION]:
            annotations[REVISION] = rs["metadata"]["annotations"][REVISION]
            dep["metadata"]["resourceVersion"] = self._next_rv()

    def _max_surge(self, dep: dict) -> int:
        rolling = dep["spec"]["strategy"].get("rollingUpdate", {})
        return _int_or_percent(rolling.get("maxSurge", "25%"), dep["spec"]["replicas"], round_up=True)

    def _max_unavailable(self, dep: dict) -> int:
        rolling = dep["spec"]["strategy"].get("rollingUpdate", {})
        unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), dep["spec"]["replicas"], round_up=False)
        return 1 if unavailable == 0 and self._max_surge(dep) == 0 else unavailable

    def _sync(self, dep: dict, instant_ready: bool = False) -> bool:
        """One pass of rolloutRolling + syncRolloutStatus. Returns whether any ReplicaSet was scaled."""
        all_rss = self._owned_replicasets(dep)
        new_rs = self._new_replicaset(dep, all_rss)
        old_rss = [rs for rs in self._owned_replicasets(dep) if rs is not new_rs]
        for rs in self._owned_replicasets(dep):
            self._sync_replicaset(rs, instant_ready)
        replicas = dep["spec"]["replicas"]
        scaled = False
        # reconcileNewReplicaSet: scale up, at most replicas + maxSurge pods in all.
        if new_rs["spec"]["replicas"] > replicas:
            self._scale(new_rs, replicas)
            scaled = True
        elif new_rs["spec"]["replicas"] < replicas:
            total = sum(rs["spec"]["replicas"] for rs in [*old_rss, new_rs])
            room = replicas + self._max_surge(dep) - total
            if room > 0:
                self._scale(new_rs, new_rs["spec"]["replicas"] + min(room, replicas - new_rs["spec"]["replicas"]))
                scaled = True
        # reconcileOldReplicaSets: scale down, never below replicas - maxUnavailable available pods.
        if not scaled and sum(rs["spec"]["replicas"] for rs in old_rss):
            min_available = replicas - self._max_unavailable(dep)
            all_pods = sum(rs["spec"]["replicas"] for rs in [*old_rss, new_rs])
            new_unavailable = new_rs["spec"]["replicas"] - new_rs["status"].get("availableReplicas", 0)
            budget = all_pods - min_available - new_unavailable
            if budget > 0:
                for rs in old_rss:  # cleanupUnhealthyReplicas
                    unhealthy = rs["spec"]["replicas"] - rs["status"].get("availableReplicas", 0)
                    if unhealthy > 0 and budget > 0:
                        down = min(budget, unhealthy)
                        self._scale(rs, rs["spec"]["replicas"] - down)
                        budget -= down
                        scaled = True
                available = sum(rs["status"].get("availableReplicas", 0) for rs in [*old_rss, new_rs])
                excess = available - min_available  # scaleDownOldReplicaSetsForRollingUpdate
                for rs in old_rss:
                    down = min(rs["spec"]["replicas"], excess)
                    if down > 0:
                        self._scale(rs, rs["spec"]["replicas"] - down)
                        excess -= down
                        scaled = True
        for rs in self._owned_replicasets(dep):
            self._sync_replicaset(rs, instant_ready)
        self._sync_status(dep, new_rs)
        return scaled

    def _sync_status(self, dep: dict, new_rs: dict) -> None:
        """calculateStatus + syncRolloutStatus."""
        all_rss = self._owned_replicasets(dep)
        replicas = dep["spec"]["replicas"]
        old = dep["status"]
        available = sum(rs["status"].get("availableReplicas", 0) for rs in all_rss)
        status = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": sum(rs["status"].get("replicas", 0) for rs in all_rss),
            "updatedReplicas": new_rs["status"].get("replicas", 0),
            "readyReplicas": sum(rs["status"].get("readyReplicas", 0) for rs in all_rss),
            "availableReplicas": available,
            "unavailableReplicas": max(replicas - available, 0),
            "conditions": copy.deepcopy(old.get("conditions", [])),
        }
        if available >= replicas - self._max_unavailable(dep):
            self._set_condition(status, "Available", "True", "MinimumReplicasAvailable",
                                "Deployment has minimum availability.")
        else:
            self._set_condition(status, "Available", "False", "MinimumReplicasUnavailable",
                                "Deployment does not have minimum availability.")
        rs_name = new_rs["metadata"]["name"]
        current = self._condition(old, "Progressing")
        was_complete = current is not None and current["reason"] == "NewReplicaSetAvailable"
        old_pods_now = status["replicas"] - status["updatedReplicas"]
        old_pods_before = old.get("replicas", 0) - old.get("updatedReplicas", 0)
        if was_complete and old_pods_now == 0:
            pass  # a resync of a finished rollout: no progress to estimate
        elif status["updatedReplicas"] == status["replicas"] == status["availableReplicas"] == replicas:
            self._set_condition(status, "Progressing", "True", "NewReplicaSetAvailable",
                                f'ReplicaSet "{rs_name}" has successfully progressed.')
        elif (status["updatedReplicas"] > old.get("updatedReplicas", 0) or old_pods_now < old_pods_before
              or status["readyReplicas"] > old.get("readyReplicas", 0)
              or status["availableReplicas"] > old.get("availableReplicas", 0)):
            # Progress: a fresh ReplicaSetUpdated condition (new lastUpdateTime), same lastTransitionTime if it was True.
            status["conditions"] = [c for c in status["conditions"] if c["type"] != "Progressing"]
            self._set_condition(status, "Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')
            if current is not None and current["status"] == "True":
                self._condition(status, "Progressing")["lastTransitionTime"] = current["lastTransitionTime"]
        else:
            cond = self._condition(status, "Progressing")
            deadline = dep["spec"]["progressDeadlineSeconds"]
            if cond is not None and cond["reason"] not in ("NewReplicaSetAvailable", "ProgressDeadlineExceeded") \
                    and _parse_time(cond["lastUpdateTime"]) + deadline < time.time():
                self._set_condition(status, "Progressing", "False", "ProgressDeadlineExceeded",
                                    f'ReplicaSet "{rs_name}" has timed out progressing.')
        if status != old:
            dep["status"] = status
            dep["metadata"]["resourceVersion"] = self._next_rv()

    @staticmethod
    def _condition(status: dict, kind: str) -> dict | None:
        return next((c for c in status.get("conditions", []) if c["type"] == kind), None)

    def _set_condition(self, status: dict, kind: str, value: str, reason: str, message: str) -> None:
        """SetDeploymentCondition: no-op when status and reason are unchanged; keeps lastTransitionTime on the same status."""
        current = self._condition(status, kind)
        if current and current["status"] == value and current["reason"] == reason:
            return
        now = _now()
        cond = {"type": kind, "status": value, "lastUpdateTime": now, "lastTransitionTime": now, "reason": reason,
                "message": message}
        if current and current["status"] == value:
            cond["lastTransitionTime"] = current["lastTransitionTime"]
        status["conditions"] = [c for c in status.get("conditions", []) if c["type"] != kind] + [cond]

    # ---- REST -------------------------------------------------------------------------------------
    def _write_deployment(self, name: str, new: dict) -> dict:
        current = self.deployments[name]
        spec = new.get("spec") or {}
        labels = spec.get("template", {}).get("metadata", {}).get("labels") or {}
        selector = spec.get("selector", {}).get("matchLabels", {})
        if spec.get("selector") != current["spec"]["selector"]:
            raise ApiError(422, "Invalid", f'Deployment.apps "{name}" is invalid: spec.selector: field is immutable')
        if any(labels.get(k) != v for k, v in selector.items()):
            raise ApiError(422, "Invalid", f'Deployment.apps "{name}" is invalid: spec.template.metadata.labels: '
                                           "Invalid value: `selector` does not match template `labels`")
        for c in spec.get("template", {}).get("spec", {}).get("containers") or [{}]:
            if not c.get("name") or not c.get("image"):
                raise ApiError(422, "Invalid", f'Deployment.apps "{name}" is invalid: spec.template.spec.containers: '
                                               "Required value: every container needs a name and an image")
        stored = {k: copy.deepcopy(v) for k, v in new.items() if k not in ("kind", "apiVersion")}
        # Immutable or server-owned: identity, generation and status (a subresource).
        keep = {k: current["metadata"][k] for k in ("name", "namespace", "uid", "creationTimestamp", "generation")}
        stored["metadata"] = {**stored.get("metadata", {}), **keep}
        stored["status"] = current["status"]
        if stored["spec"] != current["spec"]:
            stored["metadata"]["generation"] = current["metadata"]["generation"] + 1
        stored["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if stored != current:
            stored["metadata"]["resourceVersion"] = self._next_rv()
        self.deployments[name] = stored
        return stored

    def handle(self, method: str, path: str, query: dict[str, list[str]], content_type: str, body: bytes) -> tuple[int, dict]:
        selector = query.get("labelSelector", [""])[0]
        not_found = ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")
        with self.lock:
            if path == "/version" and method == "GET":
                return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake", "platform": "linux/amd64"}
            if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path):
                if method != "GET":
                    raise not_found
                pods = self.pods.values() if m[1] == self.namespace else []
                items = [p for p in pods if matches_selector(p["metadata"]["labels"], selector)]
                return 200, self._list("PodList", "v1", items)
            m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/(deployments|replicasets)(?:/([^/]+))?", path)
            if not m:
                raise not_found
            namespace, resource, name = m[1], m[2], m[3]
            objects = self.deployments if resource == "deployments" else self.replicasets
            if namespace != self.namespace:
                objects = {}
            if name is None:
                if method != "GET":
                    raise not_found
                kind = "DeploymentList" if resource == "deployments" else "ReplicaSetList"
                items = [o for o in objects.values() if matches_selector(o["metadata"].get("labels", {}), selector)]
                return 200, self._list(kind, "apps/v1", items)
            if name not in objects:
                raise ApiError(404, "NotFound", f'{resource}.apps "{name}" not found')
            kind = "Deployment" if resource == "deployments" else "ReplicaSet"
            current = objects[name]
            if method == "GET":
                return 200, {"kind": kind, "apiVersion": "apps/v1", **copy.deepcopy(current)}
            if resource != "deployments" or method not in ("PATCH", "PUT"):
                raise ApiError(405, "MethodNotAllowed", f"{method} {path} is not supported by the fake API server")
            try:
                payload = json.loads(body or b"null")
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"the request body is not JSON: {exc}") from exc
            if method == "PUT":
                rv = (payload.get("metadata") or {}).get("resourceVersion")
                if rv and rv != current["metadata"]["resourceVersion"]:
                    raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on deployments.apps "{name}": '
                                   "the object has been modified; please apply your changes to the latest version and try again")
                new = payload
            elif content_type == "application/strategic-merge-patch+json":
                new = strategic_merge(current, payload)
            elif content_type == "application/merge-patch+json":
                new = merge_patch(current, payload)
            elif content_type == "application/json-patch+json":
                if not isinstance(payload, list):
                    raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
                new = json_patch(current, payload)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")
            return 200, {"kind": "Deployment", "apiVersion": "apps/v1", **copy.deepcopy(self._write_deployment(name, new))}

    def _list(self, kind: str, api_version: str, items: list[dict]) -> dict:
        return {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(self._rv)},
                "items": copy.deepcopy(sorted(items, key=lambda o: o["metadata"]["name"]))}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                auth = self.headers.get("Authorization") or ""
                with server.lock:
                    server.requests.append(RecordedRequest(self.command, url.path, url.query, content_type, auth,
                                                           body.decode("utf-8", "replace")))
                try:
                    if server.token and auth != f"Bearer {server.token}":
                        raise ApiError(401, "Unauthorized", "Unauthorized")
                    code, payload = server.handle(self.command, url.path, parse_qs(url.query), content_type, body)
                except ApiError as exc:
                    code, payload = exc.code, exc.status()
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        return Handler
