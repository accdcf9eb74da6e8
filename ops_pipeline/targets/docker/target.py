"""Docker Engine target: N replica containers of the app on a user-defined network, behind nginx on the host.

(Over 400 lines: the rollout, its failure paths and the container's environment, secrets and health belong together;
the engine client, the front proxy and the host relays are already in their own modules.)

Everything goes through the Docker Engine API (DOCKER_HOST: Docker, or Podman's Docker-compatible service).

    containers   <app>-<env>-<slot>-<deploy id>, labels ops.app / ops.environment / ops.version / ops.slot /
                 ops.deploy-id / ops.host-port, on the network `ops-<app>-<env>` (or target.docker.network),
                 restart policy on-failure, the app's port published on 127.0.0.1:<free port> only
    nginx        run by this target on the host, its own prefix under <state>/envs/<env>/nginx (or
                 target.docker.nginx_conf_dir): generated nginx.conf listening on target.host:target.port,
                 `upstream app_servers { least_conn; server 127.0.0.1:<published port>; ... }`,
                 `nginx -t` before every `nginx -s reload`, started by the first rollout
    host relays  URL values pointing at the host's loopback are rewritten to the network's gateway, where a relay
                 forwards to the host's loopback (relay.py)
    secrets      the app's secret values (app.secrets, passwords, secret_env) are not container environment variables (which `docker inspect` shows to
                 anyone with engine access): each is a file in <state>/envs/<env>/docker-secrets/<container>/,
                 mode 0400, owned by the image's USER, bind-mounted read-only at /run/secrets/ops, and the app
                 gets NAME_FILE=/run/secrets/ops/NAME (the Docker secrets convention). target.docker.secret_files
                 false passes them as plain variables, for apps that do not read NAME_FILE.

Rolling, one container at a time (a surge of one): start one new container, wait until it is healthy (its
HEALTHCHECK state in the engine *and* our own HTTP probe answering 200 with the new version on its published
port), then in one graceful nginx reload add it to the upstream and take one old container out of it,
drain that old one (the old nginx workers finish their in-flight requests; bounded by target.docker.drain_s), stop it
(SIGTERM: the app finishes what it still has, closes keep-alive sockets, exits) and remove it; repeat. A new
container that never gets healthy is removed, the old ones keep serving, and the error carries the last probe and
the container's last log lines (redacted). State is read back from the engine (labels), never remembered: what
runs, which version, which slot, which published port.

Why this module is over 400 lines: it is one class, the target, whose rollout still decides and calls the engine
in the same code; the front proxy (nginx.py), the host relays (../relay.py) and the engine (engine.py) are
already apart. It shrinks when the rollout becomes a plan built as data and run by one executor (issue 12).
"""

from __future__ import annotations

import io
import ipaddress
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

from ops_pipeline.platform import paths
from ops_pipeline.platform.app_env import secret_names
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.prober import HealthWait, HttpProber
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import ReleaseSpec
from ops_pipeline.targets.base import Artifact, DeployTarget, Instance, LogFn, RolloutError, RolloutReport, rollout_plan
from ops_pipeline.targets.docker.engine import DockerEngine, ImageBuildError, image_tag
from ops_pipeline.targets.nginx import HostNginx, NginxError
from ops_pipeline.targets.procs import established_to
from ops_pipeline.targets.relay import LOOPBACK_HOSTS, HostRelays, loopback_to_gateway

LABEL_APP = "ops.app"
LABEL_ENV = "ops.environment"
LABEL_VERSION = "ops.version"
LABEL_SLOT = "ops.slot"
LABEL_DEPLOY = "ops.deploy-id"
LABEL_PORT = "ops.host-port"
LABEL_ARTIFACT = "ops.artifact"
SECRETS_MOUNT = "/run/secrets/ops"  # where a container finds its secret files (NAME_FILE=/run/secrets/ops/NAME)
IN_SERVICE = ("healthy", "running", "starting")
KEEP_OLD_IMAGES = 3


# ---- the target --------------------------------------------------------------------------------------
class DockerTarget(DeployTarget):
    kind = "docker"

    def __init__(self, spec: ReleaseSpec, engine: DockerEngine, prober: HttpProber, redactor: Redactor | None = None) -> None:
        self.spec = spec
        self.engine = engine
        self.prober = prober
        self.redactor = engine.redactor(redactor)
        cfg = spec.target.docker
        self.cfg = cfg
        self.app = spec.app.name
        self.env = spec.environment
        self.network_name = cfg.network or f"ops-{self.app}-{self.env}"
        self.repository = cfg.image_repository or f"localhost/{self.app}"
        nginx_dir = Path(cfg.nginx_conf_dir) if cfg.nginx_conf_dir else spec.env_dir() / "nginx"
        self.nginx = HostNginx(nginx_dir, spec.target.host, spec.target.port, cfg.drain_s,
                               f"{self.app} in {self.env} (Docker target)")
        self.relays = HostRelays(paths.state_dir() / "docker" / "relays")
        self.secrets_root = spec.env_dir() / "docker-secrets"
        self._client = None
        self._podman: bool | None = None

    # ---- engine ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = self.engine.client()
        return self._client

    def is_podman(self) -> bool:
        if self._podman is None:
            try:
                comps = self.client.version().get("Components") or []
                self._podman = any("podman" in (c.get("Name") or "").lower() for c in comps)
            except Exception:  # noqa: BLE001
                self._podman = False
        return self._podman

    def _containers(self, all_: bool = True) -> list:
        import docker

        out = []
        for c in self.client.containers.list(all=all_, filters={"label": f"{LABEL_APP}={self.app}"}, ignore_removed=True):
            try:
                if c.labels.get(LABEL_ENV) == self.env:
                    out.append(c)
            except docker.errors.NotFound:
                continue
        return out

    @staticmethod
    def _host_port(c) -> int | None:
        label = c.labels.get(LABEL_PORT)
        if label and label.isdigit():
            return int(label)
        for bindings in ((c.attrs.get("NetworkSettings") or {}).get("Ports") or {}).values():
            for b in bindings or []:
                if b.get("HostPort"):
                    return int(b["HostPort"])
        return None

    def _instance(self, c) -> Instance:
        state = c.attrs.get("State") or {}
        health = (state.get("Health") or {}).get("Status") or ""
        status = state.get("Status") or c.status
        if status == "running" and health in ("healthy", "starting", "unhealthy"):
            status = health
        port = self._host_port(c) if (state.get("Status") or c.status) == "running" else None
        return Instance(
            id=c.id[:12],
            name=c.name,
            version=c.labels.get(LABEL_VERSION, "?"),
            status=status,
            probe_url=f"http://127.0.0.1:{port}{self.spec.app.health_path}" if port else "",
            restarts=int(c.attrs.get("RestartCount") or 0),
            deploy_id=c.labels.get(LABEL_DEPLOY, ""),
            extra={"slot": c.labels.get(LABEL_SLOT), "port": port, "image": c.attrs.get("Image", ""),
                   "health": health, "created": c.attrs.get("Created", ""), "artifact": c.labels.get(LABEL_ARTIFACT, "")},
        )

    def serving(self) -> list[Instance]:
        instances = [self._instance(c) for c in self._containers()]
        return sorted(instances, key=lambda i: (str(i.extra.get("slot") or ""), i.extra.get("created") or ""))

    # ---- image ----------------------------------------------------------------------------------
    def prepare(self, artifact: Artifact, version: str, log: LogFn) -> str:
        if artifact.kind != "image":
            raise RolloutError(f"artifact {artifact.id} is a {artifact.kind}, not an image: the Docker target runs images",
                               RolloutReport(version, []))
        try:
            return self.engine.ensure_image(self.client, artifact, log, self.redactor)
        except ImageBuildError as exc:
            raise RolloutError(str(exc), RolloutReport(version, [])) from None

    # ---- network + host services ---------------------------------------------------------------
    def ensure_network(self, log: LogFn) -> str:
        """The user-defined network (created if missing); returns its gateway address."""
        import docker

        try:
            net = self.client.networks.get(self.network_name)
        except docker.errors.NotFound:
            net = self.client.networks.create(self.network_name, driver="bridge",
                                              labels={LABEL_APP: self.app, LABEL_ENV: self.env})
            log(f"created network {self.network_name}")
        net.reload()
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Gateway") and ":" not in cfg["Gateway"]:
                return cfg["Gateway"].split("/")[0]
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            subnet = cfg.get("Subnet") or ""
            if subnet and ":" not in subnet:
                return str(next(ipaddress.ip_network(subnet, strict=False).hosts()))
        raise RolloutError(f"network {self.network_name} has no IPv4 gateway", RolloutReport(self.spec.version, []))

    def container_env(self, app_env: dict[str, str], version: str, gateway: str, log: LogFn) -> dict[str, str]:
        env, endpoints, rewritten = loopback_to_gateway(app_env, gateway)
        # Connections given in parts (host and port in variables of their own) are rewritten the same way.
        for conn in (self.spec.app.database.app_vars, self.spec.app.redis.app_vars):
            host = env.get(conn.host) if conn.host else None
            if host in LOOPBACK_HOSTS or (host or "").startswith("127."):
                port = int(env.get(conn.port) or 0) if conn.port else 0
                if port:
                    env[conn.host] = gateway
                    if (host, port) not in endpoints:
                        endpoints.append(("127.0.0.1" if host == "localhost" else host, port))
                    rewritten.append(conn.host)
        for host, port in endpoints:
            self.relays.ensure(gateway, port, host, port, log)
        if rewritten:
            log(f"{', '.join(rewritten)}: loopback address rewritten to the network gateway {gateway} "
                f"(host relays on {', '.join(f'{gateway}:{p}' for _, p in endpoints)})")
        for name in self.cfg.env_file_vars:
            if name in os.environ and name not in env:
                env[name] = os.environ[name]
        app = self.spec.app
        env[app.version_env] = version
        env[app.port_env] = str(self.cfg.container_port)
        env["SHUTDOWN_TIMEOUT_MS"] = str(int(app.shutdown_timeout_s * 1000))
        return env

    # ---- containers -----------------------------------------------------------------------------
    @staticmethod
    def _user_ids(c) -> tuple[int, int]:
        """uid and gid a (created) container runs as: its USER, resolved through its own /etc/passwd."""
        user = (c.attrs.get("Config") or {}).get("User") or ""
        name, _, group = user.partition(":")
        if not name:
            return 0, 0
        if name.isdigit():
            return int(name), int(group) if group.isdigit() else int(name)
        bits, _ = c.get_archive("/etc/passwd")
        with tarfile.open(fileobj=io.BytesIO(b"".join(bits))) as tar:
            member = tar.extractfile(tar.getmembers()[0])
            passwd = member.read().decode(errors="replace") if member else ""
        for line in passwd.splitlines():
            fields = line.split(":")
            if len(fields) > 3 and fields[0] == name:
                return int(fields[2]), int(group) if group.isdigit() else int(fields[3])
        raise RuntimeError(f"the image's USER {name!r} is not in its /etc/passwd")

    def _write_secrets(self, c, folder: Path, secrets: dict[str, str]) -> None:
        uid, gid = self._user_ids(c)
        for name, value in secrets.items():
            path = folder / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(value)
            os.chown(path, uid, gid)
        os.chown(folder, uid, gid)
        folder.chmod(0o500)

    def _forget_secrets(self) -> None:
        """Secret folders of containers the engine no longer has (removed, or never started) are deleted."""
        if not self.secrets_root.is_dir():
            return
        try:
            names = {c.name for c in self._containers()}
        except Exception:  # noqa: BLE001 - engine unreachable (requests errors too): keep all, the next rollout cleans up
            return
        for folder in self.secrets_root.iterdir():
            if folder.name not in names:
                shutil.rmtree(folder, ignore_errors=True)

    def _start(self, ref: str, slot: int, version: str, deploy_id: str, artifact: Artifact, env: dict[str, str]):
        import docker

        names = [n for n in sorted(secret_names(self.spec.app)) if n in env] if self.cfg.secret_files else []
        secrets = {n: env[n] for n in names}
        environment = {k: v for k, v in env.items() if k not in secrets}
        environment.update({f"{n}_FILE": f"{SECRETS_MOUNT}/{n}" for n in secrets})
        last_exc = None
        for _ in range(3):
            port = free_port()
            name = f"{self.app}-{self.env}-{slot}-{deploy_id[:8]}"
            labels = {LABEL_APP: self.app, LABEL_ENV: self.env, LABEL_VERSION: version, LABEL_SLOT: str(slot),
                      LABEL_DEPLOY: deploy_id, LABEL_PORT: str(port), LABEL_ARTIFACT: artifact.id}
            folder = self.secrets_root / name
            volumes = {}
            if secrets:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True, mode=0o700)
                volumes = {str(folder): {"bind": SECRETS_MOUNT, "mode": "ro"}}
            try:
                c = self.client.containers.create(
                    ref, name=name, detach=True, labels=labels, environment=environment, network=self.network_name,
                    ports={f"{self.cfg.container_port}/tcp": ("127.0.0.1", port)}, volumes=volumes,
                    restart_policy={"Name": "on-failure", "MaximumRetryCount": 3})
                if secrets:
                    self._write_secrets(c, folder, secrets)
                c.start()
                return c, port
            except (docker.errors.APIError, OSError, RuntimeError) as exc:
                last_exc = exc
                try:
                    self.client.containers.get(name).remove(force=True)
                except docker.errors.DockerException:
                    pass
                shutil.rmtree(folder, ignore_errors=True)
                if "address already in use" not in str(exc).lower() and "port is already allocated" not in str(exc).lower():
                    break
        raise RuntimeError(self.redactor(f"could not start a container of {ref}: {last_exc}"))

    def _trigger_healthcheck(self, c) -> None:
        """Podman only (it has no systemd timers here): run the container's own HEALTHCHECK now, through the
        libpod API on the same socket. Docker runs checks on its own schedule; nothing to do there."""
        try:
            api = self.client.api
            api._result(api._get(f"{api.base_url}/v4.0.0/libpod/containers/{c.id}/healthcheck"), json=True)
        except Exception:  # noqa: BLE001, S110 - best effort; the engine's own schedule still applies
            pass

    def _wait_healthy(self, c, port: int, version: str) -> HealthWait:
        hc = (c.attrs.get("Config") or {}).get("Healthcheck") or {}
        has_hc = bool(hc.get("Test")) and hc["Test"][0] != "NONE"
        health_status, exited_since, triggered = "", None, 0.0

        def stop_reason() -> str:
            nonlocal health_status, exited_since
            c.reload()
            state = c.attrs.get("State") or {}
            health = state.get("Health") or {}
            health_status = health.get("Status") or ""
            restarts = int(c.attrs.get("RestartCount") or 0)
            exited_since = (exited_since or time.monotonic()) if state.get("Status") in ("exited", "dead") else None
            if restarts >= 2 or (exited_since and time.monotonic() - exited_since > 3):
                return (f"the container keeps exiting (status {state.get('Status')}, exit code {state.get('ExitCode')}, "
                        f"{restarts} restarts)")
            if health_status == "unhealthy":
                logs = health.get("Log") or []
                out = (logs[-1].get("Output") or "").strip()[:200] if logs else ""
                return (f"its HEALTHCHECK reports unhealthy (failing streak {health.get('FailingStreak')}"
                        + (f", last check output: {out}" if out else "") + ")")
            return ""

        def confirmed() -> bool:
            # Healthy probes are not enough when the image has a HEALTHCHECK: the engine must agree.
            nonlocal triggered
            if not has_hc or health_status == "healthy":
                return True
            if self.is_podman() and time.monotonic() - triggered >= 1.0:
                triggered = time.monotonic()
                self._trigger_healthcheck(c)
            return False

        wait = self.prober.wait_healthy(
            f"http://127.0.0.1:{port}{self.spec.app.health_path}", version=version, successes=2, interval_s=0.25,
            timeout_s=min(self.spec.gate.request_timeout_s, 2.0),
            deadline_s=self.cfg.start_timeout_s or max(30.0, self.spec.gate.deadline_s),
            version_from=self.spec.app.health_version, stop_reason=stop_reason, confirmed=confirmed)
        if not wait.ok and wait.stopped.startswith("not healthy within"):
            wait.stopped += f" (HEALTHCHECK {health_status or 'none'})"
        return wait

    def _log_tail(self, c, lines: int = 20) -> str:
        try:
            text = c.logs(tail=lines).decode(errors="replace")
        except Exception:  # noqa: BLE001
            return ""
        return self.redactor(text.strip())

    def _stop(self, c, log: LogFn) -> None:
        import docker

        try:
            c.stop(timeout=int(self.spec.app.shutdown_timeout_s) + 5)  # SIGTERM: the app drains, then exits
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            log(f"stopping {c.name}: {self.redactor(str(exc))}")
        try:
            c.remove(force=True)
        except docker.errors.DockerException:
            pass

    @staticmethod
    def _upstream(members: dict[str, tuple[int, str]]) -> list[tuple[int, str]]:
        return [(port, f"{name} {version}") for name, (port, version) in members.items()]

    def _retire(self, c, members: dict[str, tuple[int, str]], log: LogFn, *, old_workers: set[int] | None = None) -> str:
        """Out of the upstream (reload), drain (old workers finish, no connection left; <= drain_s), stop, remove.
        `old_workers`: the upstream was already changed by the caller's reload, whose old workers are these."""
        port = members.pop(c.name, (self._host_port(c), ""))[0]
        t0 = time.monotonic()
        if old_workers is None:
            old_workers = self.nginx.apply(self._upstream(members), log)
        drained = self.nginx.wait_gone(old_workers, self.cfg.drain_s)
        while port and established_to(port) and time.monotonic() - t0 < self.cfg.drain_s:
            time.sleep(0.05)
        left = established_to(port) if port else 0
        drain_s = time.monotonic() - t0
        self._stop(c, log)
        detail = (f"drained in {drain_s:.2f} s" if drained and not left
                  else f"drain cut after {drain_s:.1f} s ({left} connection(s) left)")
        log(f"removed {c.name} ({c.labels.get(LABEL_VERSION)}): {detail}, stopped in {time.monotonic() - t0 - drain_s:.1f} s")
        return detail

    # ---- rollout --------------------------------------------------------------------------------
    def rollout(self, artifact: Artifact, version: str, app_env: dict[str, str], log: LogFn, *,
                surge_all: bool = False) -> RolloutReport:
        import docker

        ref = self.prepare(artifact, version, log)
        deploy_id = uuid.uuid4().hex[:12]
        containers = self._containers()
        old = [c for c in containers if (c.attrs.get("State") or {}).get("Status") in ("running", "restarting")]
        for c in containers:
            if c not in old:  # exited / created / dead: serves nothing, would only confuse the gate
                log(f"removing leftover container {c.name} ({(c.attrs.get('State') or {}).get('Status')}, "
                    f"{c.labels.get(LABEL_VERSION, '?')})")
                try:
                    c.remove(force=True)
                except docker.errors.DockerException as exc:
                    log(f"could not remove {c.name}: {self.redactor(str(exc))}")
        self._forget_secrets()
        old.sort(key=lambda c: (c.labels.get(LABEL_SLOT, ""), c.attrs.get("Created", "")))
        report = RolloutReport(version=version, previous_versions=sorted({c.labels.get(LABEL_VERSION, "?") for c in old}))
        started = time.monotonic()
        n = self.spec.target.instances
        members: dict[str, tuple[int, str]] = {}
        for c in old:
            inst = self._instance(c)
            if inst.status in IN_SERVICE and inst.extra.get("port"):
                members[c.name] = (inst.extra["port"], inst.version)
        if not members:
            # Every old container is reported unhealthy by the engine's HEALTHCHECK (e.g. its checks timed out on a busy
            # host) yet still runs: it stays in the upstream until a new one is healthy. An empty upstream is a 502 for
            # every request; an instance its HEALTHCHECK doubts answers most of them.
            for c in old:
                inst = self._instance(c)
                if (c.attrs.get("State") or {}).get("Status") == "running" and inst.extra.get("port"):
                    members[c.name] = (inst.extra["port"], inst.version)
            if members:
                log(f"every serving container is reported {', '.join(sorted({self._instance(c).status for c in old}))}; "
                    "they keep serving until a new one is healthy")
        log(f"rolling out {version} ({ref}) to {n} container(s) on network {self.network_name} (one at a time); "
            f"serving now: {', '.join(f'{c.name}[{self._instance(c).status}]' for c in old) or 'nothing'}")
        new: list = []
        pending = None
        try:
            gateway = self.ensure_network(log)
            env = self.container_env(app_env, version, gateway, log)
            self.nginx.apply(self._upstream(members), log)  # started on the first rollout; matches the engine's state
            victims = {c.name: c for c in old}
            for step in rollout_plan([c.name for c in old], n):
                victim = victims[step.retire] if step.retire else None
                if step.slot is None:  # more old containers than slots (scale down)
                    detail = self._retire(victim, members, log)
                    report.add("removed", victim.name, victim.labels.get(LABEL_VERSION, "?"), started, f"{detail} (scale down)")
                    continue
                pending, port = self._start(ref, step.slot, version, deploy_id, artifact, env)
                report.add("started", pending.name, version, started, f"published on 127.0.0.1:{port}")
                wait = self._wait_healthy(pending, port, version)
                detail = wait.detail()
                if not wait.ok:
                    self._fail(pending, detail, new, members, report, started, version, log)
                report.add("healthy", pending.name, version, started, detail)
                log(f"{pending.name} healthy ({detail})")
                # One graceful reload per step: the new container joins the upstream as an old one leaves it.
                # Capacity never drops (the leaving one finishes its in-flight requests), and each reload is
                # one more moment at which nginx closes idle client keep-alive connections.
                members[pending.name] = (port, version)
                if victim is not None:
                    members.pop(victim.name, None)
                old_workers = self.nginx.apply(self._upstream(members), log)
                new.append(pending)
                pending = None
                if victim is not None:
                    detail = self._retire(victim, members, log, old_workers=old_workers)
                    report.add("removed", victim.name, victim.labels.get(LABEL_VERSION, "?"), started, detail)
        except RolloutError:
            raise
        except (docker.errors.DockerException, NginxError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            if pending is not None:
                try:
                    pending.remove(force=True)
                except docker.errors.DockerException:
                    pass
            report.add("aborted", pending.name if pending is not None else "-", version, started, self.redactor(str(exc))[:300])
            report.finished_at = time.time()
            self._forget_secrets()
            serving = [i for i in self.serving() if i.status in IN_SERVICE]
            raise RolloutError(self.redactor(f"rollout of {version} stopped: {type(exc).__name__}: {exc}; "
                                             f"{len(serving)} container(s) serving {', '.join(sorted({i.version for i in serving})) or 'nothing'}"),
                               report, serving) from None
        report.instances = [c.name for c in new]
        report.finished_at = time.time()
        self._forget_secrets()
        return report

    def _fail(self, c, detail: str, new: list, members: dict, report: RolloutReport, started: float, version: str,
              log: LogFn):
        """A new container never got healthy: remove it (it never joined the upstream), withdraw this rollout's
        other new containers, and stop with the old ones serving."""
        import docker

        tail = self._log_tail(c)
        report.add("failed", c.name, version, started, detail)
        try:
            c.remove(force=True)
        except docker.errors.DockerException:
            pass
        report.add("removed", c.name, version, started, "never healthy: removed")
        for other in new:
            self._retire(other, members, log)
            report.add("removed", other.name, version, started, "new container withdrawn")
        report.finished_at = time.time()
        self._forget_secrets()
        serving = [i for i in self.serving() if i.status in IN_SERVICE]
        raise RolloutError(
            self.redactor(
                f"new container {c.name} never became healthy ({detail}); rollout stopped, {len(serving)} old "
                f"container(s) still serving {', '.join(sorted({i.version for i in serving})) or 'nothing'}"
                + (f"\nlast log lines of {c.name}:\n{tail}" if tail else "")),
            report,
            serving,
        )

    # ---- housekeeping ---------------------------------------------------------------------------
    def prune(self, keep_versions: set[str], log: LogFn) -> list[str]:
        """Remove this environment's stopped containers, and local images of this repository beyond the newest few
        that are neither running anywhere nor tagged with a version in `keep_versions` (their registry copies stay)."""
        import docker

        removed: list[str] = []
        try:
            for c in self._containers():
                if (c.attrs.get("State") or {}).get("Status") not in ("running", "restarting", "paused"):
                    c.remove(force=True)
                    removed.append(f"container {c.name}")
            in_use = {c.attrs.get("Image") for c in self.client.containers.list(all=True, ignore_removed=True)}
            protected_tags = {image_tag(v) for v in keep_versions}
            images = sorted(self.client.images.list(name=self.repository), key=lambda i: i.attrs.get("Created") or "",
                            reverse=True)
            candidates = []
            for image in images:
                tags = [t for t in image.tags if t.rpartition(":")[0] == self.repository]
                if not tags or image.id in in_use or any(t.rpartition(":")[2] in protected_tags for t in tags):
                    continue
                candidates.append((image, tags))
            for image, tags in candidates[KEEP_OLD_IMAGES:]:
                for t in tags:
                    try:
                        self.client.images.remove(t)
                        removed.append(f"image tag {t}")
                    except docker.errors.APIError:
                        break
        except docker.errors.DockerException as exc:
            log(f"prune: {self.redactor(str(exc))}")
        if removed:
            log(f"pruned: {', '.join(removed)} (kept versions {', '.join(sorted(keep_versions))})")
        return removed

    def stop(self) -> list[str]:
        """Remove this environment's containers, its nginx, its network and host relays (tests, teardown)."""
        import docker

        done = []
        for c in self._containers():
            try:
                c.remove(force=True)
                done.append(c.name)
            except docker.errors.DockerException:
                pass
        shutil.rmtree(self.secrets_root, ignore_errors=True)
        if self.nginx.stop():
            done.append("nginx")
        try:
            net = self.client.networks.get(self.network_name)
            gateways = [cfg.get("Gateway") for cfg in (net.attrs.get("IPAM") or {}).get("Config") or [] if cfg.get("Gateway")]
            net.remove()
            done.append(f"network {self.network_name}")
            for gw in gateways:
                done += [f"relay {r}" for r in self.relays.stop(gw.split("/")[0])]
        except docker.errors.DockerException:
            pass
        return done

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
