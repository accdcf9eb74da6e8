"""The OCI image path and the Docker Engine target, for real: Podman's Docker-compatible API, a registry on
127.0.0.1:5000, nginx on the host, the example app built from its own Dockerfile."""

from __future__ import annotations

import contextlib
import re
import time

import httpx
import pytest

import docker
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
from ops_pipeline.targets.docker.engine import DockerEngine
from tests import app_variants
from tests.containers.conftest import BASE_IMAGE, REPOSITORY, SteadyLoad, docker_run_config, docker_target_config

pytestmark = [pytest.mark.containers, pytest.mark.xdist_group("engine")]


def public_versions(port: int, n: int = 15) -> set[str]:
    versions = set()
    for _ in range(n):
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, headers={"Connection": "close"})
        assert r.status_code == 200, r.text
        versions.add(r.json()["version"])
    return versions


def engine_replicas(client, env: str) -> list[dict]:
    """The environment's containers as the engine reports them (labels, state, image)."""
    out = []
    for c in client.containers.list(all=True, filters={"label": f"ops.environment={env}"}):
        out.append({"name": c.name, "version": c.labels.get("ops.version"), "slot": c.labels.get("ops.slot"),
                    "status": c.attrs["State"]["Status"], "health": (c.attrs["State"].get("Health") or {}).get("Status"),
                    "image": c.attrs.get("Image")})
    return sorted(out, key=lambda r: r["slot"] or "")


def failure_of(result) -> tuple[str, str]:
    ev = result.get_step_failure_events()[0]
    return ev.step_key, ev.step_failure_data.error.message


def step_output(result, step: str):
    return result.output_for_node(step)


def step_metadata(result, step: str) -> dict:
    for e in result.all_events:
        if e.event_type_value == "STEP_OUTPUT" and e.step_key == step:
            return {k: v.value for k, v in e.event_specific_data.metadata.items()}
    return {}


def spec_for(app_dir, env: str, version: str) -> ReleaseSpec:
    cfg = ReleaseConfig(environment=env, version=version, app={"path": str(app_dir)},
                        target={**docker_target_config(), "instances": 1})
    return ReleaseSpec(config=cfg, version=version, app_dir=str(app_dir), commit="", dirty=False)


def assert_secrets_are_files_not_environment(client, d) -> None:
    """`docker inspect` shows no secret: each running container reads DATABASE_URL, REDIS_URL and JWT_SECRET from
    files (0400, owned by the image's user `node`, mounted read-only), one folder per container and no other."""
    import os
    import stat

    target = d.target()
    try:
        root = target.secrets_root
    finally:
        target.close()
    running = client.containers.list(filters={"label": f"ops.environment={d.env}"})
    assert sorted(p.name for p in root.iterdir()) == sorted(c.name for c in running)
    for c in running:
        env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
        assert {"DATABASE_URL", "REDIS_URL", "JWT_SECRET"}.isdisjoint(env), sorted(env)
        secrets = {}
        for name in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET"):
            assert env[f"{name}_FILE"] == f"/run/secrets/ops/{name}"
            path = root / c.name / name
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o400 and (st.st_uid, st.st_gid) == (1000, 1000), (path, st)
            secrets[name] = path.read_text()
        assert secrets["DATABASE_URL"].startswith("postgresql://") and len(secrets["JWT_SECRET"]) >= 32
        inspected = str(c.attrs)
        assert not [n for n, v in secrets.items() if v in inspected or v.split("@")[0] in inspected]
        mounts = [(m.get("Destination"), m.get("RW")) for m in c.attrs.get("Mounts", [])]
        assert ("/run/secrets/ops", False) in mounts, mounts


def test_image_build_push_and_pull_by_digest(container_engine, container_variant, services):
    client = container_engine.client
    engine = DockerEngine(base_url=container_engine.docker_host)

    def unique_build(app):  # a build context no earlier run has built (only the last layer differs)
        df = app / "Dockerfile"
        df.write_text(df.read_text() + f'\nLABEL org.example.test-build="{time.time_ns()}"\n')

    app = container_variant("image", unique_build)
    logs: list[str] = []
    art = engine.build_release_image(spec_for(app, "t-image", "v-img-1"), logs.append)

    assert art.kind == "image" and art.image_id.startswith("sha256:")
    assert art.ref == f"{REPOSITORY}:nogit"
    assert art.digest_ref.startswith(f"{REPOSITORY}@sha256:") and art.content_hash == art.digest_ref.split("@")[1]
    assert art.size_bytes > 10_000_000 and art.built_s > 0
    text = "\n".join(logs)
    assert "STEP" in text or "Step" in text, text  # the build output reached the log
    assert f"BASE_IMAGE={BASE_IMAGE}" in text
    image = client.images.get(art.image_id)
    assert {f"{REPOSITORY}:nogit", f"{REPOSITORY}:v-img-1"} <= set(image.tags)
    assert not art.reused
    # the same build context again: not rebuilt, same image, same digest
    again: list[str] = []
    art_again = engine.build_release_image(spec_for(app, "t-image", "v-img-1b"), again.append)
    assert art_again.reused and art_again.image_id == art.image_id and art_again.digest_ref == art.digest_ref
    assert "not rebuilt" in "\n".join(again)
    image.reload()
    # the registry holds the manifest under the recorded digest
    digest = art.digest_ref.split("@")[1]
    r = httpx.head(f"http://{container_engine.registry}/v2/node-api/manifests/v-img-1", timeout=10,
                   headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                      "application/vnd.oci.image.manifest.v1+json"})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest

    # gone locally (every tag, then the image; its parent layers stay as build cache), pulled back by digest alone
    for tag in image.tags:
        client.images.remove(tag, noprune=True)
    with contextlib.suppress(docker.errors.NotFound):  # usually gone with its last tag
        client.images.remove(art.image_id, noprune=True)
    assert not [i for i in client.images.list() if i.id == art.image_id]
    t0 = time.monotonic()
    pulled = client.images.pull(REPOSITORY, tag=digest)
    pull_s = time.monotonic() - t0
    assert pulled.id == art.image_id

    port = free_port()
    c = client.containers.run(
        art.digest_ref, detach=True, network_mode="host", labels={"ops.test": "pull-by-digest"},
        environment={**services.app_env(), "PORT": str(port), "APP_VERSION": "v-img-1"})
    try:
        body, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
                if resp.status_code == 200:
                    body = resp.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert body and body["version"] == "v-img-1", c.logs(tail=20).decode()
    finally:
        c.remove(force=True)
    print(f"\nimage {art.id}: {art.size_bytes / 1e6:.0f} MB, built+pushed in {art.built_s:.1f} s, "
          f"pulled by digest in {pull_s:.1f} s")

    # one-off containers of the image (the migration path): output streamed, failures raise CommandError
    from ops_pipeline.platform.commands import CommandError
    from ops_pipeline.platform.redaction import Redactor

    out: list[str] = []
    secret = "s3cr3t-value-for-redaction"
    engine.run_once(art, "echo hello from $WHO; echo token=$TOKEN", {"WHO": "the image", "TOKEN": secret},
                    log=out.append, redactor=Redactor([secret]), timeout_s=60)
    assert "hello from the image" in "\n".join(out) and secret not in "\n".join(out) and "token=***" in "\n".join(out)
    with pytest.raises(CommandError, match="exited with status 3"):
        engine.run_once(art, "echo about to fail; exit 3", {}, log=out.append, redactor=None, timeout_s=60)
    with contextlib.suppress(docker.errors.APIError):  # this test's one-of-a-kind image (its layers stay as cache)
        client.images.remove(art.image_id, noprune=True)


def test_build_failure_names_the_failing_dockerfile_step(container_engine, container_variant, docker_release):
    def failing_step(app):
        df = app / "Dockerfile"
        text = df.read_text()
        assert "WORKDIR /app\n" in text
        df.write_text(text.replace("WORKDIR /app\n", "WORKDIR /app\nRUN echo 'checking the release' && exit 7\n", 1))

    app = container_variant("bad-dockerfile", failing_step)
    d = docker_release
    r = d.release.execute_in_process(run_config=docker_run_config(app, d.env, version="v1", port=d.port, instances=1),
                                     instance=d.instance, raise_on_error=False)
    assert not r.success
    step, message = failure_of(r)
    assert step == "build_image"
    assert "image build failed at stage 1/2, step 3/" in message, message
    assert "RUN echo 'checking the release' && exit 7" in message
    assert "exit status 7" in message or "non-zero code: 7" in message
    assert engine_replicas(container_engine.client, d.env) == []


def test_release_then_rollback_with_three_replicas_under_load(container_engine, container_app, container_variant,
                                                             shared_docker_environment, instance, tmp_path):
    client = container_engine.client
    d = shared_docker_environment
    d.instance = instance
    assert engine_replicas(client, d.env) == []
    t0 = time.monotonic()
    r1 = d.release.execute_in_process(run_config=docker_run_config(container_app, d.env, version="v1", port=d.port),
                                      instance=d.instance)
    assert r1.success
    art1 = step_output(r1, "build_image")
    md = step_metadata(r1, "build_image")
    assert md["digest_ref"] == art1.digest_ref and md["image_id"] == art1.image_id and md["size_bytes"] > 0
    assert public_versions(d.port) == {"v1"}
    v1 = engine_replicas(client, d.env)
    assert [(c["version"], c["status"], c["health"]) for c in v1] == [("v1", "running", "healthy")] * 3
    assert {c["image"] for c in v1} == {art1.image_id}
    assert_secrets_are_files_not_environment(client, d)
    t1 = time.monotonic()

    # v2 is another build (its Dockerfile gained a label): a different image, rolled out while requests keep coming
    def relabel(app):
        df = app / "Dockerfile"
        df.write_text(df.read_text() + '\nLABEL org.example.release-note="v2"\n')

    app2 = container_variant("v2", relabel)
    with SteadyLoad(d.port, tmp_path) as load2:
        r2 = d.release.execute_in_process(run_config=docker_run_config(app2, d.env, version="v2", port=d.port),
                                          instance=d.instance)
        time.sleep(0.5)
    assert r2.success
    art2 = step_output(r2, "build_image")
    assert art2.image_id != art1.image_id
    print(f"\nrelease v1 -> v2 under load: {load2.summary()}")
    assert load2.result["failed"] == 0, load2.result["failures"]
    assert set(load2.result["versions"]) == {"v1", "v2"}, load2.result["versions"]
    v2 = engine_replicas(client, d.env)
    assert [(c["version"], c["status"], c["health"]) for c in v2] == [("v2", "running", "healthy")] * 3
    assert {c["image"] for c in v2} == {art2.image_id}
    order = step_metadata(r2, "rolling_deploy")["order"]
    assert [s.split()[0] for s in order] == ["started", "healthy", "removed"] * 3, order
    # one graceful reload per replica: the new container joins the upstream as an old one leaves it
    reloads = [e.user_message for e in d.instance.all_logs(r2.run_id) if "nginx reloaded" in (e.user_message or "")]
    assert len(reloads) == 3, reloads
    assert public_versions(d.port) == {"v2"}
    t2 = time.monotonic()

    with SteadyLoad(d.port, tmp_path) as load3:
        rb = d.rollback.execute_in_process(
            run_config={"ops": {"plan_rollback": {"config": {"environment": d.env}}}}, instance=d.instance)
        time.sleep(0.5)
    assert rb.success
    print(f"rollback v2 -> v1 under load: {load3.summary()}")
    assert load3.result["failed"] == 0, load3.result["failures"]
    assert set(load3.result["versions"]) == {"v1", "v2"}, load3.result["versions"]
    back = engine_replicas(client, d.env)
    assert [(c["version"], c["status"], c["health"]) for c in back] == [("v1", "running", "healthy")] * 3
    assert {c["image"] for c in back} == {art1.image_id}  # the very image v1 was released with (by digest)
    assert public_versions(d.port) == {"v1"}
    assert_secrets_are_files_not_environment(client, d)
    target = d.target()
    try:
        assert target.serving_versions() == {"v1"}
        conf = (target.nginx.conf).read_text()  # the generated load balancer config names the three v1 replicas
    finally:
        target.close()
    assert "upstream app_servers {" in conf and "least_conn;" in conf and "proxy_http_version 1.1;" in conf
    assert sorted(re.findall(r"server 127\.0\.0\.1:\d+ .*# (\S+) (\S+)", conf)) == sorted((c["name"], "v1") for c in back)
    print(f"timings: release v1 {t1 - t0:.1f} s, release v2 {t2 - t1:.1f} s, rollback {time.monotonic() - t2:.1f} s")


def test_never_healthy_version_leaves_old_replicas_serving(container_engine, container_app, container_variant,
                                                           shared_docker_environment, instance, tmp_path):
    client = container_engine.client
    d = shared_docker_environment
    before = engine_replicas(client, d.env)
    if [(c["version"], c["health"]) for c in before] != [("v1", "healthy")] * 3:
        # run alone (or after a failure): start from three v1 replicas of its own
        target = d.target()
        try:
            target.stop()
        finally:
            target.close()
        assert d.release.execute_in_process(run_config=docker_run_config(container_app, d.env, version="v1",
                                                                         port=d.port), instance=instance).success
        before = engine_replicas(client, d.env)
    assert [(c["version"], c["health"]) for c in before] == [("v1", "healthy")] * 3

    bad = container_variant("bad-health", app_variants.health_always_503)
    t0 = time.monotonic()
    with SteadyLoad(d.port, tmp_path) as load:
        # target.docker.start_timeout_s bounds the wait for the new container (the gate's deadline otherwise)
        cfg = docker_run_config(bad, d.env, version="v3-bad", port=d.port,
                                target=docker_target_config(start_timeout_s=12))
        r = d.release.execute_in_process(run_config=cfg, instance=instance, raise_on_error=False)
    assert not r.success
    step, message = failure_of(r)
    assert step == "rolling_deploy"
    assert "never became healthy" in message and "HTTP 503" in message and "still serving v1" in message, message
    # whichever comes first stops the wait: the 12 s bound, or the engine's HEALTHCHECK turning unhealthy (its own
    # schedule: 3 failures can land before 12 s on a busy host)
    assert "not healthy within 12 s" in message or "HEALTHCHECK reports unhealthy" in message, message
    assert "last log lines of" in message
    print(f"\nnever-healthy v2 stopped after {time.monotonic() - t0:.1f} s; load meanwhile: {load.summary()}")
    assert load.result["failed"] == 0, load.result["failures"]
    after = engine_replicas(client, d.env)
    assert after == before  # the same three v1 containers, untouched; no v2 container left behind
    assert public_versions(d.port) == {"v1"}


def test_loopback_urls_are_rewritten_to_the_network_gateway():
    from ops_pipeline.targets.docker.target import loopback_to_gateway

    env, endpoints, names = loopback_to_gateway({
        "DATABASE_URL": "postgresql://app:pw%2Fx@127.0.0.1:5433/app?sslmode=disable",
        "REDIS_URL": "redis://:secret@localhost:6380/0",
        "CACHE_URL": "redis://cache.internal:6379/1",
        "UPSTREAM": "http://127.0.0.1/api",
        "JWT_SECRET": "not-a-url",
    }, "10.89.3.1")
    assert env["DATABASE_URL"] == "postgresql://app:pw%2Fx@10.89.3.1:5433/app?sslmode=disable"
    assert env["REDIS_URL"] == "redis://:secret@10.89.3.1:6380/0"
    assert env["CACHE_URL"] == "redis://cache.internal:6379/1" and env["JWT_SECRET"] == "not-a-url"
    assert env["UPSTREAM"] == "http://10.89.3.1:80/api"
    assert endpoints == [("127.0.0.1", 5433), ("127.0.0.1", 6380), ("127.0.0.1", 80)]
    assert names == ["DATABASE_URL", "REDIS_URL", "UPSTREAM"]


def test_nginx_keeps_idle_keepalive_connections_through_reloads_where_it_can(tmp_path):
    """keepalive_min_timeout exists from nginx 1.27.4 on; older versions (Debian 12: 1.22) reject it."""
    from ops_pipeline.targets.nginx import HostNginx

    lb = HostNginx(tmp_path, "127.0.0.1", 8080, 30, "test")
    assert lb.version >= (1, 18)  # read from the real `nginx -v`
    for version, expected in (((1, 22, 1), False), ((1, 27, 3), False), ((1, 27, 4), True), ((1, 29, 0), True)):
        lb._version = version
        assert ("keepalive_min_timeout 1s;" in lb.render([(1234, "app-0 v1")])) is expected, version


def test_build_step_lines_of_podman_and_docker_are_recognised():
    from ops_pipeline.targets.docker.engine import _STEP, image_tag, repository_registry

    m = _STEP.match("[1/2] STEP 4/8: RUN npm ci --no-audit --no-fund")
    assert (m["stage"], m["n"], m["m"], m["what"]) == ("1/2", "4", "8", "RUN npm ci --no-audit --no-fund")
    m = _STEP.match("Step 5/17 : RUN npm ci")
    assert (m["stage"], m["n"], m["what"]) == (None, "5", "RUN npm ci")
    assert image_tag("v1.2+build.7") == "v1.2_build.7" and image_tag("-x") == "_-x"
    assert repository_registry("127.0.0.1:5000/node-api") == "127.0.0.1:5000"
    assert repository_registry("localhost/node-api") == "" and repository_registry("node-api") == ""
