"""Zero downtime under load (benchmark, not a test).

    .venv/bin/python bench/zero_downtime.py [--rate 900] [--docker] [--broken]

A constant loopback load (bench/loadgen.py: half keep-alive, half fresh connections; GET /items, which reads
the database) runs for the whole of: a release v1 -> v2 on the PM2 target, a rollback v2 -> v1, and with
--docker (needs DOCKER_HOST, the registry and base image from scripts/containers) the same on the Docker
Engine target behind nginx. Every non-2xx answer and connection error counts as failed.
Target: 0 failed of at least 10,000 requests in each phase.

--broken: a release of a version whose /health fails from its first second (tests/fixtures/plain-http-app with
PLAIN_HEALTH_STATUS=503), under load on /health, on the PM2 target as it is (each new instance probed on its own
port before nginx gives it traffic) against a baseline in the same run where that check is skipped (the instance
takes public traffic as soon as it listens, as PM2's cluster mode gave it). Target: 0 non-2xx answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workdir import copy_example_app, dagster_home, isolated_state, npm_ci  # noqa: E402

STATE = isolated_state("ops-bench-zd-")

import dagster as dg  # noqa: E402

from bench.loadgen import Load  # noqa: E402
from ops_pipeline.definitions import defs  # noqa: E402
from ops_pipeline.platform.local_stack import LocalStack, free_port  # noqa: E402

MIN_REQUESTS = 10_000


def release_config(app: Path, env: str, version: str, port: int, docker: bool) -> dict:
    cfg: dict = {"environment": env, "version": version, "app": {"path": str(app), "commands": {"lint": "", "test": ""}},
                 "target": {"kind": "pm2", "instances": 2, "port": port}, "gate": {"interval_s": 0.5}}
    if docker:
        cfg["app"]["commands"].update({"install": "", "build": ""})  # the Dockerfile builds
        cfg["target"] = {"kind": "docker", "instances": 3, "port": port, "docker": {
            "image_repository": "127.0.0.1:5000/node-api-bench", "base_image": "localhost/ops-pipeline/node:20"}}
    return {"ops": {"verify_env": {"config": cfg}}}


def remove_docker_environment(env: str) -> None:
    """The environment's containers, nginx, network and host relays (read from the engine by their labels)."""
    from ops_pipeline.platform.prober import HttpProber
    from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
    from ops_pipeline.targets.docker.engine import DockerEngine
    from ops_pipeline.targets.docker.target import DockerTarget

    cfg = ReleaseConfig(environment=env, app={"path": str(ROOT / "examples" / "node-api")},
                        target=release_config(ROOT, env, "-", 0, True)["ops"]["verify_env"]["config"]["target"])
    target = DockerTarget(ReleaseSpec(config=cfg, version="cleanup", app_dir=str(ROOT / "examples" / "node-api")),
                          DockerEngine(base_url=os.environ.get("DOCKER_HOST", "")), HttpProber())
    try:
        print(f"removed {env}: {', '.join(target.stop()) or 'nothing'}", flush=True)
    finally:
        target.close()


def under_load(port: int, rate: float, label: str, action) -> dict:
    t0 = time.monotonic()
    with Load(port, rate=rate) as load:
        ok = action()
        # keep the load on until the phase has seen enough requests
        while time.monotonic() - t0 < MIN_REQUESTS / rate + 1:
            time.sleep(0.2)
    r = load.result
    print(f"  {label}: {r.requests} requests, {r.failed} failed, {time.monotonic() - t0:.1f} s", flush=True)
    return {"phase": label, "ok_run": ok, "requests": r.requests, "2xx": r.ok, "non_2xx": r.non_2xx, "errors": r.errors,
            "stale": r.stale_keepalive, "resent_ok": r.resent_ok, "seconds": r.seconds, "rate": r.rate, "versions": r.versions, "samples": r.samples}


def stop_front_proxy(env: str) -> None:
    """The environment's nginx (PM2 and Docker targets), which outlives the PM2 daemon."""
    pidfile = STATE / "envs" / env / "nginx" / "nginx.pid"
    try:
        os.kill(int(pidfile.read_text()), 15)
    except (OSError, ValueError):
        pass


def broken_release(instance, release, rate: float, skip_own_check: bool) -> dict:
    """v1 of the plain app, then v2 answering 503 on /health, under load; returns the v2 phase's row."""
    from ops_pipeline.platform.prober import HealthWait
    from ops_pipeline.targets.pm2.target import Pm2Target

    app = STATE / f"plain-{int(skip_own_check)}"
    shutil.copytree(ROOT / "tests" / "fixtures" / "plain-http-app", app)
    env, port = f"zd-broken-{'unchecked' if skip_own_check else 'checked'}", free_port()

    def config(version: str, health: str) -> dict:
        return {"ops": {"verify_env": {"config": {
            "environment": env, "version": version, "gate": {"interval_s": 0.5, "deadline_s": 10},
            "app": {"name": "plain", "path": str(app), "start": "node server.js", "health_version": "off",
                    "required_env": [], "secret_env": [], "jwt_secret_env": "", "node_env_var": "",
                    "migrations_table": "", "env": {"PLAIN_HEALTH_STATUS": health}, "redis": {"enabled": False},
                    "commands": {"test": "", "migrate": "true"}},
            "target": {"kind": "pm2", "instances": 2, "port": port, "pm2": {"listen_timeout_s": 6}}}}}}

    assert release.execute_in_process(run_config=config("v1", "200"), instance=instance).success
    original = Pm2Target._wait_instance_healthy
    if skip_own_check:
        Pm2Target._wait_instance_healthy = lambda self, *a, **k: (time.sleep(0.5), HealthWait(True, []))[1]
    try:
        label = f"PM2 broken v2, {'own check skipped' if skip_own_check else 'own check (ours)'}"
        with Load(port, path="/health", rate=rate) as load:
            ok = release.execute_in_process(run_config=config("v2", "503"), instance=instance, raise_on_error=False).success
            time.sleep(2)
    finally:
        Pm2Target._wait_instance_healthy = original
        subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "kill"], capture_output=True,
                       env={**os.environ, "PM2_HOME": str(STATE / "envs" / env / "pm2")})
        stop_front_proxy(env)
    r = load.result
    print(f"  {label}: {r.requests} requests, {r.non_2xx} non-2xx, {r.errors} errors (release succeeded: {ok})", flush=True)
    return {"phase": label, "ok_run": True, "requests": r.requests, "2xx": r.ok, "non_2xx": r.non_2xx,
            "errors": r.errors, "stale": r.stale_keepalive, "resent_ok": r.resent_ok, "seconds": r.seconds,
            "rate": r.rate, "versions": r.versions, "samples": r.samples, "broken": True, "baseline": skip_own_check}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=900, help="requests per second")
    parser.add_argument("--docker", action="store_true", help="also the Docker Engine target (needs DOCKER_HOST)")
    parser.add_argument("--broken", action="store_true", help="only the broken-version release, against its baseline")
    args = parser.parse_args()
    home = dagster_home(STATE)
    app = copy_example_app(STATE / "app")
    stack = LocalStack()
    rows: list[dict] = []
    envs = []
    try:
        stack.ensure_running()
        npm_ci(app)
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            release = defs.get_job_def("release")
            rollback = defs.get_job_def("rollback")
            if args.broken:
                rows.append(broken_release(instance, release, min(args.rate, 200), skip_own_check=True))
                rows.append(broken_release(instance, release, min(args.rate, 200), skip_own_check=False))
            targets = [] if args.broken else [("PM2", False)] + ([("Docker", True)] if args.docker else [])
            for name, docker in targets:
                env, port = f"zd-{name.lower()}", free_port()
                envs.append(env)
                print(f"{name}: releasing v1 (no load yet)...", flush=True)
                assert release.execute_in_process(run_config=release_config(app, env, "v1", port, docker), instance=instance).success

                def do_release(env=env, port=port, docker=docker):
                    return release.execute_in_process(run_config=release_config(app, env, "v2", port, docker),
                                                      instance=instance).success

                def do_rollback(env=env):
                    return rollback.execute_in_process(
                        run_config={"ops": {"plan_rollback": {"config": {"environment": env, "reason": "bench"}}}},
                        instance=instance).success

                rows.append(under_load(port, args.rate, f"{name} release v1->v2", do_release))
                rows.append(under_load(port, args.rate, f"{name} rollback v2->v1", do_rollback))
    finally:
        for env in envs:
            if env.endswith("docker"):
                remove_docker_environment(env)
            subprocess.run([str(ROOT / "tools/node_modules/.bin/pm2"), "kill"], capture_output=True,
                           env={**os.environ, "PM2_HOME": str(STATE / "envs" / env / "pm2")})
            stop_front_proxy(env)
        stack.stop()
        shutil.rmtree(STATE, ignore_errors=True)

    print()
    print(f"{'phase':<34}{'requests':>10}{'2xx':>10}{'non-2xx':>9}{'conn err':>10}{'stale k-a':>10}{'resent ok':>10}"
          f"{'req/s':>8}  versions seen")
    all_ok = True
    for r in rows:
        vers = ", ".join(f"{k}:{v}" for k, v in sorted(r["versions"].items()))
        print(f"{r['phase']:<34}{r['requests']:>10}{r['2xx']:>10}{r['non_2xx']:>9}{r['errors']:>10}{r['stale']:>10}"
              f"{r['resent_ok']:>10}{r['rate']:>8.0f}  {vers}")
        if r["samples"]:
            print(f"{'':<34}first failures: {r['samples'][:3]}")
        if r.get("broken"):
            all_ok &= r["baseline"] or r["non_2xx"] + r["errors"] == 0
            continue
        all_ok &= r["ok_run"] and r["non_2xx"] + r["errors"] == 0 and r["requests"] >= MIN_REQUESTS
    print("stale k-a: connection errors on a reused keep-alive connection closed by the server before any byte of the\n"
          "answer (counted in conn err); resent ok: those a browser-like client resent once and got 2xx for.")
    broken = [r for r in rows if r.get("broken")]
    if len(broken) == 2:
        base, ours = broken
        print(f"\nbroken version: {base['non_2xx']} non-2xx of {base['requests']} with the own check skipped (baseline), "
              f"{ours['non_2xx']} of {ours['requests']} with it ({'no failed answer' if not ours['non_2xx'] else 'ratio ' + str(round(base['non_2xx'] / ours['non_2xx'], 1)) + 'x fewer'})")
    print(f"\ntarget: 0 failed of >= {MIN_REQUESTS} requests per phase (broken version: 0 non-2xx): {'met' if all_ok else 'NOT met'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
