"""The Kubernetes target, tested WITHOUT a cluster.

No cluster can run on these machines. Every `test_fake_apiserver_*` test drives the real `kubernetes` client (no
mocks) over HTTP against `tests/fake_k8s_apiserver.py`: an in-process server speaking the Kubernetes REST protocol,
seeded from examples/node-api/k8s/deployment.yaml, with a simulated Deployment controller (RollingUpdate, maxSurge 1,
maxUnavailable 0, ProgressDeadlineExceeded). What that server does not simulate is listed in its docstring.
The `test_rollout_status_*` tests check the ported `kubectl rollout status` rules on hand-made Deployment objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
from ops_pipeline.targets.base import Artifact, RolloutError
from ops_pipeline.targets.kubernetes.client import KubernetesResource
from ops_pipeline.targets.kubernetes.target import (
    CHANGE_CAUSE,
    VERSION_ANNOTATION,
    KubernetesTarget,
    RolloutStatus,
    rollout_status,
)
from tests.fake_k8s_apiserver import FakeKubeApiServer

NAMESPACE = "shop"
TOKEN = "fake-apiserver-bearer-token-7f3a"
SEED_IMAGE = "ghcr.io/your-org/api:latest"
SEED_VERSION = "1.0.0"
APP_DIR = Path(__file__).resolve().parents[1] / "examples" / "node-api"
SECRETS = {
    "DATABASE_URL": "postgresql://app:db-pass-9c1e77@db.internal:5432/app",
    "REDIS_URL": "redis://:redis-pass-41aa@cache.internal:6379/0",
    "JWT_SECRET": "jwt-secret-value-0d6b2f5e",
    "NODE_ENV": "production",
}


@pytest.fixture
def apiserver() -> Iterator[FakeKubeApiServer]:
    server = FakeKubeApiServer(NAMESPACE, token=TOKEN, progress_deadline_seconds=2).start()
    yield server
    server.stop()


def release_spec(server: FakeKubeApiServer, version: str, progress_deadline_s: float = 30.0) -> ReleaseSpec:
    config = ReleaseConfig(environment="staging", version=version, target={
        "kind": "kubernetes",
        "instances": 3,
        "kubernetes": {"namespace": NAMESPACE, "deployment": "api", "container": "api", "api_server": server.url,
                       "image_repository": "registry.example/api", "progress_deadline_s": progress_deadline_s},
    })
    return ReleaseSpec(config=config, version=version, app_dir=str(APP_DIR))


def k8s_target(server: FakeKubeApiServer, version: str, progress_deadline_s: float = 30.0) -> KubernetesTarget:
    # The resource points elsewhere: the spec's api_server must win.
    resource = KubernetesResource(api_server="http://127.0.0.1:9", token=TOKEN)
    target = KubernetesTarget(release_spec(server, version, progress_deadline_s), resource, HttpProber())
    target.poll_interval_s = 0.05
    return target


def image_artifact(tag: str, digest: str = "") -> Artifact:
    return Artifact(kind="image", id=f"registry.example/api:{tag}", ref=f"registry.example/api:{tag}", commit="3f2a9c1",
                    dirty=False, content_hash=digest or "sha256:" + "0" * 64,
                    digest_ref=f"registry.example/api@{digest}" if digest else "")


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def container(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "api")


# ---- against the fake API server -------------------------------------------------------------------
def test_fake_apiserver_rollout_completes_and_every_pod_serves_the_new_version(apiserver: FakeKubeApiServer) -> None:
    target = k8s_target(apiserver, "v2")
    before = target.serving()
    assert [(i.version, i.status) for i in before] == [(SEED_VERSION, "running")] * 3
    digest = "sha256:" + "ab" * 32
    logs: list[str] = []

    report = target.rollout(image_artifact("v2", digest), "v2", SECRETS, logs.append)

    dep = apiserver.deployment()
    api = container(dep)
    assert api["image"] == f"registry.example/api@{digest}"  # the digest reference wins over the tag
    assert dep["spec"]["template"]["metadata"]["annotations"][VERSION_ANNOTATION] == "v2"
    assert "release v2" in dep["metadata"]["annotations"][CHANGE_CAUSE]
    env = {e["name"]: e for e in api["env"]}
    assert env["APP_VERSION"]["value"] == "v2"
    # Strategic merge kept the rest of the container: the secrets still come from the Secret.
    assert env["JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "api-secrets", "key": "jwt-secret"}
    assert api["readinessProbe"]["httpGet"]["path"] == "/health"
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"

    serving = target.serving()
    assert len(serving) == 3
    assert {(i.version, i.status, i.extra["image"], i.extra["revision"]) for i in serving} == {
        ("v2", "running", f"registry.example/api@{digest}", 2)}
    assert not {i.name for i in serving} & {i.name for i in before}
    assert all(i.probe_url == "" for i in serving)
    pods = {p["metadata"]["name"]: p for p in apiserver.pod_list()}
    assert all(pods[i.name]["metadata"]["annotations"][VERSION_ANNOTATION] == "v2" for i in serving)

    assert report.previous_versions == [SEED_VERSION]
    assert report.instances == [i.name for i in serving]
    actions = [s.action for s in report.steps]
    assert actions[0] == "started" and actions[-1] == "healthy" and "failed" not in actions
    assert actions.count("removed") >= 1  # old pods went one by one; a poll may see several go at once
    assert report.steps[-2].detail == "3/3 updated, 3 available, 0 old"
    assert report.steps[-1].detail == 'deployment "api" successfully rolled out'
    assert any("successfully rolled out" in line for line in logs)

    # The real client spoke REST to the server: a strategic merge PATCH, bearer token, label selectors.
    patches = apiserver.bodies("PATCH")
    assert [(r.path, r.content_type) for r in patches] == [
        (f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/api", "application/strategic-merge-patch+json")]
    assert {r.authorization for r in apiserver.requests} == {f"Bearer {TOKEN}"}
    assert any(r.path.endswith("/replicasets") and r.query == "labelSelector=app%3Dapi" for r in apiserver.requests)


def test_fake_apiserver_never_ready_image_fails_with_progress_deadline_then_undo_restores_old_pods(
        apiserver: FakeKubeApiServer) -> None:
    target = k8s_target(apiserver, "v3")
    before = target.serving()
    bad_ref = "registry.example/api:v3"
    apiserver.never_ready(bad_ref)
    logs: list[str] = []
    started = time.monotonic()

    with pytest.raises(RolloutError) as failure:
        target.rollout(image_artifact("v3"), "v3", SECRETS, logs.append)

    elapsed = time.monotonic() - started
    bad_rs = next(rs for rs in apiserver.replica_sets() if container(rs)["image"] == bad_ref)
    message = str(failure.value)
    assert f'ReplicaSet "{bad_rs["metadata"]["name"]}" has timed out progressing.' in message
    assert "rolled back to revision 1" in message
    assert "3 ready pod(s) serving 1.0.0" in message
    assert 1.0 < elapsed < 15, elapsed  # the fake's progressDeadlineSeconds is 2 (second-precision timestamps)

    # The previous template is back: old image, no version annotation, change-cause of revision 1 (none).
    dep = apiserver.deployment()
    assert container(dep)["image"] == SEED_IMAGE
    assert VERSION_ANNOTATION not in (dep["spec"]["template"]["metadata"].get("annotations") or {})
    assert CHANGE_CAUSE not in dep["metadata"]["annotations"]
    # Like a real controller: revision 1's ReplicaSet is adopted again as revision 3, no new ReplicaSet.
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    assert len(apiserver.replica_sets()) == 2
    assert bad_rs["spec"]["replicas"] == 0 and bad_rs["status"]["readyReplicas"] == 0  # scaled away, never ready

    # The old pods were never replaced (maxUnavailable 0): the same pods serve, and the error says so.
    after = target.serving()
    assert [(i.name, i.version, i.status) for i in after] == [(i.name, SEED_VERSION, "running") for i in before]
    assert [i.name for i in failure.value.serving] == [i.name for i in before]
    actions = [s.action for s in failure.value.report.steps]
    assert actions[0] == "started" and actions[-2:] == ["failed", "aborted"]
    assert "removed" not in actions
    assert any("rolling back" in line for line in logs)

    # The restore was the JSON patch `kubectl rollout undo` sends.
    undo = apiserver.bodies("PATCH")[-1]
    assert undo.content_type == "application/json-patch+json"
    assert [op["path"] for op in json.loads(undo.body)] == ["/spec/template", "/metadata/annotations"]


def test_fake_apiserver_patch_bodies_never_carry_app_env_secrets(apiserver: FakeKubeApiServer) -> None:
    target = k8s_target(apiserver, "v4")
    target.rollout(image_artifact("v4"), "v4", SECRETS, lambda _: None)
    assert target.undo(lambda _: None) == 1  # an explicit undo after a good rollout
    wait_until(lambda: container(apiserver.deployment())["image"] == SEED_IMAGE
               and {i.version for i in target.serving()} == {SEED_VERSION})

    bodies = [r.body for r in apiserver.requests if r.method in ("PATCH", "PUT", "POST")]
    assert len(bodies) == 2
    for value in [*SECRETS.values(), "db-pass-9c1e77", "redis-pass-41aa"]:
        if value != "production":
            assert all(value not in body for body in bodies), f"a secret reached the API server: {value[:6]}..."
    sent = json.loads(bodies[0])
    assert sent["spec"]["template"]["spec"]["containers"] == [
        {"name": "api", "image": "registry.example/api:v4", "env": [{"name": "APP_VERSION", "value": "v4"}]}]


def test_fake_apiserver_unobserved_spec_change_times_out_then_undo_restores_the_template(
        apiserver: FakeKubeApiServer) -> None:
    """The controller never observes the change (generation > observedGeneration): waiting until our own deadline."""
    target = k8s_target(apiserver, "v5", progress_deadline_s=1.0)
    before = target.serving()
    apiserver.pause_controller()

    with pytest.raises(RolloutError) as failure:
        target.rollout(image_artifact("v5"), "v5", SECRETS, lambda _: None)

    message = str(failure.value)
    assert "not complete after 1 s (target.kubernetes.progress_deadline_s)" in message
    assert "Waiting for deployment spec update to be observed..." in message
    assert "rolled back to revision 1" in message  # the unobserved template counts as newer than every revision
    dep = apiserver.deployment()
    assert container(dep)["image"] == SEED_IMAGE
    assert dep["metadata"]["generation"] == 3 and dep["status"]["observedGeneration"] == 1

    apiserver.pause_controller(False)
    wait_until(lambda: apiserver.deployment()["status"]["observedGeneration"] == 3)
    assert len(apiserver.replica_sets()) == 1  # the bad template never got a ReplicaSet
    assert [i.name for i in target.serving()] == [i.name for i in before]


def test_fake_apiserver_rejects_a_client_without_the_bearer_token(apiserver: FakeKubeApiServer) -> None:
    target = KubernetesTarget(release_spec(apiserver, "v6"), KubernetesResource(), HttpProber())
    with pytest.raises(ApiException) as denied:
        target.serving()
    assert denied.value.status == 401


def test_fake_apiserver_undo_without_history_says_so(apiserver: FakeKubeApiServer) -> None:
    from ops_pipeline.targets.kubernetes.target import UndoError

    with pytest.raises(UndoError, match="no earlier revision to roll back to"):
        k8s_target(apiserver, "v7").undo(lambda _: None)


def test_spec_api_server_overrides_the_resource() -> None:
    release = ReleaseConfig(target={"kind": "kubernetes", "kubernetes": {"api_server": "https://k8s.example:6443"}})
    spec = release.target.kubernetes
    api = KubernetesResource(api_server="https://other.example", token="t0ken-abc", verify_ssl=False).api_client(spec)
    assert api.configuration.host == "https://k8s.example:6443"
    assert api.configuration.verify_ssl is False
    assert api.configuration.auth_settings()["BearerToken"]["value"] == "Bearer t0ken-abc"


# ---- the kubectl rollout status rules, on hand-made Deployments -------------------------------------
def deployment(*, generation: int = 2, observed: int | None = 2, spec_replicas: int | None = 3, replicas: int = 3,
               updated: int = 3, available: int = 3, progressing: tuple[str, str, str] | None = None) -> client.V1Deployment:
    status: dict | None = None
    if observed is not None:
        status = {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                  "availableReplicas": available, "readyReplicas": available}
        if progressing:
            status["conditions"] = [{"type": "Progressing", "status": progressing[0], "reason": progressing[1],
                                     "message": progressing[2]}]
    spec: dict = {"selector": {"matchLabels": {"app": "api"}}, "template": {"metadata": {"labels": {"app": "api"}}}}
    if spec_replicas is not None:
        spec["replicas"] = spec_replicas
    metadata = {"name": "api", "generation": generation}
    return client.V1Deployment.from_dict({"metadata": metadata, "spec": spec, "status": status})


NOT_OBSERVED = RolloutStatus("waiting", "Waiting for deployment spec update to be observed...")
WAITING = 'Waiting for deployment "api" rollout to finish: '
TIMED_OUT = ("False", "ProgressDeadlineExceeded", 'ReplicaSet "api-7d9f8c6b5" has timed out progressing.')


@pytest.mark.parametrize(("dep", "expected"), [
    pytest.param(deployment(generation=3, observed=2), NOT_OBSERVED, id="generation-not-observed"),
    pytest.param(deployment(generation=1, observed=None), NOT_OBSERVED, id="no-status-yet"),
    pytest.param(deployment(generation=3, observed=2, progressing=TIMED_OUT), NOT_OBSERVED,
                 id="old-deadline-condition-but-generation-not-observed"),
    pytest.param(deployment(updated=1, replicas=4, progressing=TIMED_OUT), RolloutStatus("failed", TIMED_OUT[2]),
                 id="progress-deadline-exceeded"),
    pytest.param(deployment(updated=1, replicas=4, progressing=("True", "ReplicaSetUpdated", 'ReplicaSet "x" is progressing.')),
                 RolloutStatus("waiting", WAITING + "1 out of 3 new replicas have been updated..."),
                 id="updated-below-spec-replicas"),
    pytest.param(deployment(replicas=4, updated=3),
                 RolloutStatus("waiting", WAITING + "1 old replicas are pending termination..."),
                 id="old-replicas-pending-termination"),
    pytest.param(deployment(available=2),
                 RolloutStatus("waiting", WAITING + "2 of 3 updated replicas are available..."),
                 id="updated-not-all-available"),
    pytest.param(deployment(progressing=("True", "NewReplicaSetAvailable", 'ReplicaSet "x" has successfully progressed.')),
                 RolloutStatus("done", 'deployment "api" successfully rolled out'), id="done"),
    pytest.param(deployment(spec_replicas=None, replicas=0, updated=0, available=0),
                 RolloutStatus("done", 'deployment "api" successfully rolled out'), id="spec-replicas-unset-skips-that-check"),
])
def test_rollout_status_follows_kubectl(dep: client.V1Deployment, expected: RolloutStatus) -> None:
    assert rollout_status(dep) == expected


def test_label_selector_from_match_labels_and_expressions() -> None:
    from ops_pipeline.targets.kubernetes.target import _selector

    dep = client.V1Deployment.from_dict({"spec": {"template": {}, "selector": {
        "matchLabels": {"app": "api"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "edge"]},
                             {"key": "canary", "operator": "DoesNotExist"}]}}})
    assert _selector(dep) == "app=api,tier in (web,edge),!canary"
