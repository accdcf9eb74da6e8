#!/usr/bin/env python3
"""Docker-SDK half of scripts/containers/smoke-test.sh (run it through that script).

Against DOCKER_HOST (the podman socket), with the Python `docker` package:
  a) build APP_DIR with --build-arg BASE_IMAGE=...    (npm ci reaches the npm registry)
  b) run it with a published 127.0.0.1 port, wait for State.Health.Status == healthy;
     also check a failing healthcheck turns "unhealthy"
  c) user-defined bridge network: two containers resolve each other by name
  d) tag + push to the local registry, remove the image locally, pull it back by
     digest (REGISTRY/name@sha256:...) and run it
Prints one "PASS ..." / "FAIL ..." line per check and timings; exits non-zero on failure.
Everything it creates carries the label ops-pipeline.smoke=1 and is removed at the end.
"""
import argparse
import json
import os
import socket
import sys
import time
import urllib.request

import docker

LABEL = {"ops-pipeline.smoke": "1"}
results = []


def check(name, ok, detail=""):
    results.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'} sdk: {name}{(' - ' + detail) if detail else ''}", flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_health(container, want, timeout):
    """Poll container.attrs['State']['Health']['Status'] until it equals `want`."""
    t0 = time.monotonic()
    seen = []
    while time.monotonic() - t0 < timeout:
        container.reload()
        health = (container.attrs.get("State") or {}).get("Health") or {}
        status = health.get("Status")
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == want:
            return True, time.monotonic() - t0, seen, health
        time.sleep(0.5)
    return False, time.monotonic() - t0, seen, health


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--app-dir", required=True)
    ap.add_argument("--base-image", required=True)
    ap.add_argument("--registry", default="127.0.0.1:5000")
    ap.add_argument("--tag", default="localhost/ops-smoke-app:sdk")
    args = ap.parse_args()

    client = docker.from_env(timeout=600)
    ver = client.version()
    print(f"sdk: docker-py {docker.__version__} -> {ver.get('Components', [{}])[0].get('Name', '?')} "
          f"{ver.get('Version')} (API {client.api.api_version})", flush=True)
    made = {"containers": [], "networks": [], "images": []}
    try:
        # a) build -----------------------------------------------------------------------
        t0 = time.monotonic()
        image, logs = client.images.build(path=args.app_dir, tag=args.tag, nocache=True, rm=True,
                                          buildargs={"BASE_IMAGE": args.base_image}, labels=LABEL)
        build_s = time.monotonic() - t0
        made["images"].append(args.tag)
        out = "".join(x.get("stream", "") for x in logs if isinstance(x, dict))
        check("images.build (multi-stage, npm ci from the registry)",
              "added " in out and image.id, f"{build_s:.1f}s, image {image.short_id}")
        print(f"TIMING sdk_build_nocache_s={build_s:.1f}", flush=True)

        # b) run + healthcheck -----------------------------------------------------------
        port = free_port()
        t0 = time.monotonic()
        c = client.containers.run(args.tag, detach=True, name="ops-smoke-sdk-app", labels=LABEL,
                                  ports={"3000/tcp": ("127.0.0.1", port)})
        made["containers"].append(c)
        hc_cfg = c.attrs["Config"].get("Healthcheck")
        check("container carries the image HEALTHCHECK", hc_cfg and hc_cfg.get("Test"), json.dumps(hc_cfg)[:120])
        ok = False
        for _ in range(40):
            try:
                st, body = http_get(f"http://127.0.0.1:{port}/")
                ok = st == 200
                break
            except OSError:
                time.sleep(0.25)
        check("published port 127.0.0.1:%d answers" % port, ok, body.strip() if ok else "")
        ok, secs, seen, health = wait_health(c, "healthy", 40)
        check("State.Health.Status becomes healthy", ok,
              f"after {secs:.1f}s, states seen {seen}, FailingStreak={health.get('FailingStreak')}")
        print(f"TIMING sdk_run_to_healthy_s={time.monotonic() - t0:.1f}", flush=True)
        check("containers.list(filters={'health': 'healthy'}) finds it",
              any(x.id == c.id for x in client.containers.list(filters={"health": "healthy"})))

        bad = client.containers.run(args.tag, detach=True, name="ops-smoke-sdk-unhealthy", labels=LABEL,
                                    healthcheck={"test": ["CMD-SHELL", "exit 1"], "interval": 1_000_000_000,
                                                 "timeout": 1_000_000_000, "retries": 2})
        made["containers"].append(bad)
        ok, secs, seen, health = wait_health(bad, "unhealthy", 30)
        check("failing healthcheck becomes unhealthy", ok,
              f"after {secs:.1f}s, states {seen}, FailingStreak={health.get('FailingStreak')}")

        # c) user-defined bridge network + DNS -----------------------------------------------
        net = client.networks.create("ops-smoke-net", driver="bridge", labels=LABEL)
        made["networks"].append(net)
        n1 = client.containers.run(args.tag, detach=True, name="ops-smoke-n1", network="ops-smoke-net",
                                   labels=LABEL, environment={"APP_NAME": "n1"})
        n2 = client.containers.run(args.tag, detach=True, name="ops-smoke-n2", network="ops-smoke-net",
                                   labels=LABEL, environment={"APP_NAME": "n2"})
        made["containers"] += [n1, n2]
        net.reload()
        dns_ok = True
        for src, dst in (("ops-smoke-n1", "ops-smoke-n2"), ("ops-smoke-n2", "ops-smoke-n1")):
            cont = client.containers.get(src)
            code, output = (None, b"")
            for _ in range(40):   # the target may still be starting
                code, output = cont.exec_run(["wget", "-q", "-O-", "-T", "3", f"http://{dst}:3000/"])
                if code == 0:
                    break
                time.sleep(0.25)
            txt = output.decode(errors="replace").strip()
            dns_ok &= check(f"{src} reaches http://{dst}:3000/ by name", code == 0 and f'"{dst.split("-")[-1]}"' in txt, txt)
        code, output = n1.exec_run(["nslookup", "ops-smoke-n2"])
        answer = [l.strip() for l in output.decode(errors="replace").splitlines() if l.startswith(("Name:", "Address:"))]
        print("sdk: nslookup ops-smoke-n2 (from n1):", "; ".join(answer), flush=True)

        # d) push, remove, pull by digest, run ------------------------------------------------
        repo = f"{args.registry}/ops-smoke/app"
        image.tag(repo, tag="sdk")
        t0 = time.monotonic()
        push_log = [json.loads(l) for l in client.images.push(repo, tag="sdk").splitlines() if l.strip()]
        push_s = time.monotonic() - t0
        errors = [x for x in push_log if "error" in x or "errorDetail" in x]
        digest = next((x["aux"]["Digest"] for x in push_log if isinstance(x.get("aux"), dict) and "Digest" in x["aux"]), None)
        if not digest:   # ask the registry
            req = urllib.request.Request(f"http://{args.registry}/v2/ops-smoke/app/manifests/sdk", method="HEAD",
                                         headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                                            "application/vnd.oci.image.manifest.v1+json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                digest = r.headers["Docker-Content-Digest"]
        check("push to local registry", not errors and digest, f"{push_s:.1f}s, digest {digest}")
        print(f"TIMING sdk_push_s={push_s:.1f}", flush=True)

        for cont in made["containers"]:
            cont.remove(force=True)
        made["containers"] = []
        client.images.remove(image.id, force=True)
        made["images"] = []
        gone = not any(image.id == i.id for i in client.images.list(all=True))
        check("image removed locally (all its tags)", gone)

        by_digest = f"{repo}@{digest}"
        t0 = time.monotonic()
        pulled = client.images.pull(by_digest)
        pull_s = time.monotonic() - t0
        made["images"].append(pulled.id)
        check("pull by digest", pulled.id == image.id, f"{pull_s:.1f}s, {by_digest} -> {pulled.short_id}")
        print(f"TIMING sdk_pull_by_digest_s={pull_s:.1f}", flush=True)
        port = free_port()
        c2 = client.containers.run(by_digest, detach=True, name="ops-smoke-sdk-pulled", labels=LABEL,
                                   ports={"3000/tcp": ("127.0.0.1", port)})
        made["containers"].append(c2)
        ok, secs, seen, _ = wait_health(c2, "healthy", 40)
        st, body = http_get(f"http://127.0.0.1:{port}/")
        check("container from the digest-pulled image runs and is healthy", ok and st == 200, f"{secs:.1f}s {body.strip()}")
        req = urllib.request.Request(f"http://{args.registry}/v2/ops-smoke/app/manifests/{digest}", method="DELETE")
        with urllib.request.urlopen(req, timeout=10) as r:
            check("registry DELETE of the pushed manifest", r.status == 202, f"HTTP {r.status}")
    finally:
        for cont in made["containers"]:
            try:
                cont.remove(force=True)
            except docker.errors.APIError:
                pass
        for net in made["networks"]:
            try:
                net.remove()
            except docker.errors.APIError:
                pass
        for ref in made["images"]:
            try:
                client.images.remove(ref, force=True)
            except docker.errors.APIError:
                pass

    failed = [n for n, ok in results if not ok]
    print(f"sdk: {len(results) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
