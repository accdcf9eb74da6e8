"""Docker Engine API (the docker SDK, honouring DOCKER_HOST): OCI image build/push/pull, one-off containers.

(Over 400 lines: the build context, the build, the registry push and pull are one system's API.)

The Docker target (target.py) runs its containers through this resource; this module knows nothing of the target,
so imports run one way: targets/resource.py and docker/target.py -> docker/engine.py -> base.py.

Works against Docker and against Podman's Docker-compatible service (`podman system service`, see
scripts/containers/README.md). Everything goes through the Engine API; no `docker` CLI is needed.

Image build (`build_release_image`): the app's own Dockerfile, built with the low-level streaming
`/build` call so that the build output reaches the run's log while it runs (in batches). The current
build step ("STEP n/m: ..." from Podman/Buildah, "Step n/m : ..." from Docker) is tracked, so a failure
names the step that failed. The image is tagged `<repository>:<commit>[-dirty]` and
`<repository>:<version>`, pushed when the target says so, and the registry's digest is recorded:
`digest_ref` (`repository@sha256:...`) is what the Docker target runs, so a rollback runs exactly the
bytes that were released, whatever happened to the tags since. Like release bundles, the same content is
never built twice: the image carries the hash of its build context (files after .dockerignore, build
arguments, base image id) as a label, and a build whose context hash already has an image reuses it.

Why this module is a little over 400 lines: it is one resource, whose build, push, pull and one-off runs share
the client, the streamed log batching and the error handling.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path

import dagster as dg
from pydantic import Field

from ops_pipeline.platform.commands import CommandError
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.targets.base import Artifact, LogFn

_STEP = re.compile(r"^(?:\[(?P<stage>\d+/\d+)\]\s+)?(?:STEP|Step)\s+(?P<n>\d+)/(?P<m>\d+)\s*:\s*(?P<what>.*)$")
_DIGEST = re.compile(r"digest:\s*(sha256:[0-9a-f]{64})")
_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")


LABEL_BUILD_CONTEXT = "ops.build-context"


class ImageBuildError(RuntimeError):
    pass


def build_context_hash(app_dir: Path, buildargs: dict | None, base_image_id: str) -> str:
    """sha256 of what a build consumes: every file of the build context (.dockerignore applied: path, mode, bytes),
    the build arguments and the base image's id. An image labelled with it is that build's result."""
    from docker.utils.build import exclude_paths

    patterns: list[str] = []
    ignore = app_dir / ".dockerignore"
    if ignore.exists():
        patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    h = hashlib.sha256()
    for rel in sorted(exclude_paths(str(app_dir), patterns)):
        p = app_dir / rel
        if p.is_symlink():
            h.update(f"L {rel} -> {os.readlink(p)}\n".encode())
        elif p.is_dir():
            h.update(f"D {rel}\n".encode())
        elif p.is_file():
            st = p.stat()
            h.update(f"F {rel} {st.st_mode & 0o777:o} {st.st_size}\n".encode())
            h.update(p.read_bytes())
    h.update(json.dumps({"buildargs": buildargs or {}, "base": base_image_id}, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def _base_image_id(client, app_dir: Path, base_image: str) -> str:
    """The local id of the image the build starts FROM (BASE_IMAGE, else the Dockerfile's ARG default), or its name."""
    ref = base_image
    if not ref:
        m = re.search(r"^\s*ARG\s+BASE_IMAGE=(\S+)", (app_dir / "Dockerfile").read_text(), re.MULTILINE)
        ref = m.group(1) if m else ""
    if not ref:
        return ""
    try:
        return client.images.get(ref).id
    except Exception:  # noqa: BLE001 - not local: the name stands in (the build will tell)
        return ref


def image_tag(value: str) -> str:
    """A valid image tag from a version or commit ([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})."""
    tag = _TAG_BAD.sub("_", value or "untagged")
    if not re.match(r"^[A-Za-z0-9_]", tag):
        tag = "_" + tag
    return tag[:128]


def repository_registry(repository: str) -> str:
    """The registry host of a repository reference ("" for Docker Hub-style or local-only names)."""
    first = repository.split("/", 1)[0] if "/" in repository else ""
    if first and ("." in first or ":" in first) and first != "localhost":
        return first
    return ""


class _LogBatcher:
    """Collects stream lines and hands them to `log` in batches (one Dagster event per batch, not per line)."""

    def __init__(self, log: LogFn, redactor: Redactor, prefix: str, max_lines: int = 25, max_wait_s: float = 1.0) -> None:
        self.log, self.redactor, self.prefix = log, redactor, prefix
        self.max_lines, self.max_wait_s = max_lines, max_wait_s
        self.lines: list[str] = []
        self.partial = ""
        self.since = time.monotonic()
        self.tail: deque[str] = deque(maxlen=30)

    def feed(self, text: str) -> list[str]:
        text = self.partial + text
        *complete, self.partial = text.split("\n")
        out = []
        for line in complete:
            line = self.redactor(line.rstrip("\r"))
            if not line.strip():
                continue
            self.lines.append(line)
            self.tail.append(line)
            out.append(line)
        if len(self.lines) >= self.max_lines or (self.lines and time.monotonic() - self.since >= self.max_wait_s):
            self.flush()
        return out

    def flush(self) -> None:
        if self.partial.strip():
            line = self.redactor(self.partial)
            self.lines.append(line)
            self.tail.append(line)
            self.partial = ""
        if self.lines:
            self.log(f"{self.prefix}\n" + "\n".join(self.lines))
        self.lines = []
        self.since = time.monotonic()


class DockerEngine(dg.ConfigurableResource):
    """A Docker Engine API endpoint (Docker, or Podman's Docker-compatible service)."""

    base_url: str = Field("", description="Engine API URL (empty: DOCKER_HOST, then the default socket).")
    registry_username: str = Field("", description="Registry user for pushes/pulls (empty: anonymous).")
    registry_password: str = Field("", description="Registry password; set it with dg.EnvVar, never inline.")
    timeout_s: float = Field(600.0, description="Engine API read timeout (a build step silent for longer fails).")

    # ---- connection ---------------------------------------------------------------------------
    def client(self):
        import docker

        if self.base_url:
            return docker.DockerClient(base_url=self.base_url, version="auto", timeout=int(self.timeout_s))
        return docker.from_env(version="auto", timeout=int(self.timeout_s))

    def redactor(self, base: Redactor | None = None) -> Redactor:
        red = base or Redactor()
        red.add(self.registry_password)
        return red

    def auth_config(self) -> dict | None:
        if self.registry_username or self.registry_password:
            return {"username": self.registry_username, "password": self.registry_password}
        return None

    # ---- build + push -------------------------------------------------------------------------
    def build_release_image(self, spec, log: LogFn, redactor: Redactor | None = None) -> Artifact:
        """Build the app's Dockerfile, tag `<commit>[-dirty]` + `<version>`, push if configured; the Artifact."""
        import docker

        red = self.redactor(redactor)
        cfg = spec.target.docker
        app = spec.app
        app_dir = Path(spec.app_dir)
        if not (app_dir / "Dockerfile").is_file():
            raise ImageBuildError(f"no Dockerfile in {app_dir}: a container target builds the app's own Dockerfile")
        repository = cfg.image_repository or f"localhost/{app.name}"
        commit = spec.commit or "nogit"
        commit_tag = image_tag(f"{commit}{'-dirty' if spec.dirty else ''}")
        version_tag = image_tag(spec.version)
        buildargs = {"BASE_IMAGE": cfg.base_image} if cfg.base_image else {}
        # The release version reaches the image build when the Dockerfile asks for it (ARG <version_env>); only then
        # does it make the image differ from one version to the next.
        if re.search(rf"^\s*ARG\s+{re.escape(app.version_env)}\b", (app_dir / "Dockerfile").read_text(), re.MULTILINE):
            buildargs[app.version_env] = spec.version
        buildargs = buildargs or None
        started = time.monotonic()
        build_started_wall = time.time()
        client = self.client()
        try:
            context = build_context_hash(app_dir, buildargs, _base_image_id(client, app_dir, cfg.base_image))
            # (each label is one more build step on Podman/Buildah: two are enough, the tags say the rest)
            labels = {"ops.app": app.name, LABEL_BUILD_CONTEXT: context}
            existing = self._image_with_context(client, context)
            if existing is not None:
                log(f"an image of this exact build context (sources, Dockerfile, build args, base image) exists: "
                    f"{existing.id[:19]}; not rebuilt")
                image_id = existing.id
                existing.tag(repository, commit_tag)
                return self._finish(client, spec, repository, commit_tag, version_tag, image_id, started, True, log, red)
            log(f"building {repository}:{commit_tag} from {app_dir}/Dockerfile on {self._engine_name(client)}"
                + (f" (BASE_IMAGE={cfg.base_image})" if cfg.base_image else " (the Dockerfile's default base image)"))
            batch = _LogBatcher(log, red, "build output:")
            step = ""
            image_id = ""
            error = ""
            try:
                stream = client.api.build(path=str(app_dir), tag=f"{repository}:{commit_tag}", buildargs=buildargs,
                                          labels=labels, decode=True, rm=True, forcerm=True, pull=False,
                                          timeout=int(max(self.timeout_s, app.commands.timeout_s)))
                for chunk in stream:
                    if not isinstance(chunk, dict):
                        continue
                    if "stream" in chunk:
                        for line in batch.feed(chunk["stream"]):
                            m = _STEP.match(line.strip())
                            if m:
                                stage = f"stage {m['stage']}, " if m["stage"] else ""
                                step = f"{stage}step {m['n']}/{m['m']}: {m['what'].strip()}"
                    aux = chunk.get("aux")
                    if isinstance(aux, dict) and aux.get("ID"):
                        image_id = aux["ID"]
                    if chunk.get("error") or chunk.get("errorDetail"):
                        error = chunk.get("error") or (chunk.get("errorDetail") or {}).get("message", "")
                        break
            except docker.errors.APIError as exc:
                error = str(exc)
            except docker.errors.DockerException as exc:
                raise ImageBuildError(f"cannot reach the Docker Engine API ({self._where()}): {red(str(exc))}") from None
            batch.flush()
            if error:
                tail = "\n".join(list(batch.tail)[-12:])
                raise ImageBuildError(red(
                    f"image build failed at {step or 'the first step'}: {error.strip()}\n"
                    f"(Dockerfile {app_dir / 'Dockerfile'}; last build output:)\n{tail}"))
            image = client.images.get(image_id or f"{repository}:{commit_tag}")
            reused = _created_before(image.attrs.get("Created") or "", build_started_wall)
            return self._finish(client, spec, repository, commit_tag, version_tag, image.id, started, reused, log, red)
        except docker.errors.DockerException as exc:
            raise ImageBuildError(red(f"image build of {repository}:{commit_tag} failed: {exc}")) from None
        finally:
            client.close()

    def _image_with_context(self, client, context: str):
        try:
            found = client.images.list(filters={"label": f"{LABEL_BUILD_CONTEXT}={context}"})
        except Exception:  # noqa: BLE001 - no reuse then
            return None
        found = [i for i in found if i.labels.get(LABEL_BUILD_CONTEXT) == context]
        return max(found, key=lambda i: i.attrs.get("Created") or "") if found else None

    def _finish(self, client, spec, repository: str, commit_tag: str, version_tag: str, image_id: str, started: float,
                reused: bool, log: LogFn, red: Redactor) -> Artifact:
        """Tag with the version, push (both tags) when configured, and describe the result as an Artifact."""
        cfg = spec.target.docker
        image = client.images.get(image_id)
        image.tag(repository, version_tag)
        built_s = round(time.monotonic() - started, 2)
        log(f"{'reused' if reused else 'built'} {repository}:{commit_tag} and :{version_tag} -> {image_id[:19]} "
            f"({(image.attrs.get('Size') or 0) / 1e6:.1f} MB) in {built_s:.1f} s")
        digest = ""
        if cfg.push and repository_registry(repository):
            push_started = time.monotonic()
            digest = self._push(client, repository, commit_tag, log, red)
            other = self._push(client, repository, version_tag, log, red)
            if other and other != digest:
                log(f"note: :{version_tag} was pushed as {other} (commit tag {digest})")
            log(f"pushed {repository}@{digest} in {time.monotonic() - push_started:.1f} s")
        elif cfg.push:
            log(f"not pushing: {repository} names no registry (set target.docker.image_repository, "
                "e.g. 127.0.0.1:5000/<app>); the image stays in the engine's local storage")
        return Artifact(
            kind="image",
            id=f"{spec.app.name}-{commit_tag}-{image_id.split(':')[-1][:12]}",
            ref=f"{repository}:{commit_tag}",
            commit=spec.commit or "nogit",
            dirty=spec.dirty,
            content_hash=digest or image_id,
            size_bytes=int(image.attrs.get("Size") or 0),
            image_id=image_id,
            digest_ref=f"{repository}@{digest}" if digest else "",
            built_s=round(time.monotonic() - started, 2),
            reused=reused,
        )

    def _push(self, client, repository: str, tag: str, log: LogFn, red: Redactor) -> str:
        import docker

        digest, error, statuses = "", "", deque(maxlen=10)
        try:
            for chunk in client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=self.auth_config()):
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error") or chunk.get("errorDetail"):
                    error = chunk.get("error") or (chunk.get("errorDetail") or {}).get("message", "")
                    break
                aux = chunk.get("aux")
                if isinstance(aux, dict) and aux.get("Digest"):
                    digest = aux["Digest"]
                status = chunk.get("status") or ""
                if status:
                    statuses.append(status)
                    m = _DIGEST.search(status)
                    if m:
                        digest = digest or m.group(1)
        except docker.errors.APIError as exc:
            error = str(exc)
        if error:
            raise ImageBuildError(red(f"push of {repository}:{tag} failed: {error.strip()}"))
        if not digest:
            raise ImageBuildError(red(f"push of {repository}:{tag} reported no digest; last status: {' | '.join(statuses)}"))
        return digest

    # ---- images and one-off containers ----------------------------------------------------------
    def ensure_image(self, client, artifact: Artifact, log: LogFn, red: Redactor | None = None) -> str:
        """The reference to run (digest reference when pushed, else the image id), pulled if it is missing."""
        import docker

        ref = artifact.digest_ref or artifact.image_id or artifact.ref
        try:
            client.images.get(ref)
            return ref
        except docker.errors.ImageNotFound:
            pass
        if not artifact.digest_ref:
            raise ImageBuildError(f"image {artifact.image_id or artifact.ref} of {artifact.id} is not in the engine "
                                  "and was never pushed (pruned?)")
        started = time.monotonic()
        repo, _, digest = artifact.digest_ref.partition("@")
        try:
            client.api.pull(repo, tag=digest, auth_config=self.auth_config())
        except docker.errors.APIError as exc:
            raise ImageBuildError((red or Redactor())(f"pull of {artifact.digest_ref} failed: {exc}")) from None
        log(f"pulled {artifact.digest_ref} in {time.monotonic() - started:.1f} s")
        return ref

    def run_once(self, artifact: Artifact, command: str, env: dict[str, str], *, log: LogFn, redactor: Redactor | None,
                 timeout_s: float) -> float:
        """Run `command` (sh -c) in a one-off container of the artifact's image; output streamed; its duration.

        The container uses the host's network namespace: a one-off job (the migration) then reaches exactly
        the endpoints the orchestrator reached when it verified the environment (DATABASE_URL on 127.0.0.1
        included), with no relay. Raises CommandError on a non-zero exit or the timeout."""
        import docker

        red = self.redactor(redactor)
        client = self.client()
        container = None
        started = time.monotonic()
        try:
            try:
                ref = self.ensure_image(client, artifact, log, red)
            except ImageBuildError as exc:
                raise CommandError(str(exc)) from None
            # npm's update check would make the one-off job call the npm registry (and wait for it) on every run
            run_env = {"NPM_CONFIG_UPDATE_NOTIFIER": "false", **env}
            container = client.containers.create(
                ref, command=[command], entrypoint=["/bin/sh", "-c"], environment=run_env, network_mode="host",
                labels={"ops.role": "one-off", "ops.artifact": artifact.id}, detach=True)
            container.start()
            batch = _LogBatcher(log, red, f"`{command}` in {artifact.id}:", max_lines=20)

            def follow() -> None:
                try:
                    for chunk in container.logs(stream=True, follow=True):
                        batch.feed(chunk.decode(errors="replace"))
                except Exception:  # noqa: BLE001, S110 - the stream ends with the container (or times out); wait() decides
                    pass

            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            try:
                result = container.wait(timeout=timeout_s)
                code = int(result.get("StatusCode", 1))
            except Exception:  # noqa: BLE001 - requests' ReadTimeout / ConnectionError: the deadline passed
                container.kill()
                reader.join(timeout=5)
                batch.flush()
                raise CommandError(red(f"`{command}` in {artifact.id} did not finish within {timeout_s:.0f} s; killed.\n"
                                       + "\n".join(list(batch.tail)[-10:]))) from None
            reader.join(timeout=10)
            batch.flush()
            duration = time.monotonic() - started
            if code != 0:
                raise CommandError(red(f"`{command}` in {artifact.id} exited with status {code} after {duration:.1f} s:\n"
                                       + "\n".join(list(batch.tail)[-15:])))
            log(f"`{command}` in {artifact.id} finished in {duration:.1f} s")
            return duration
        except docker.errors.DockerException as exc:
            raise CommandError(red(f"`{command}` in a one-off container of {artifact.id} failed: {exc}")) from None
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except docker.errors.DockerException:
                    pass
            client.close()

    # ---- helpers --------------------------------------------------------------------------------
    def _where(self) -> str:
        return self.base_url or os.environ.get("DOCKER_HOST") or "the default socket"

    @staticmethod
    def _engine_name(client) -> str:
        try:
            v = client.version()
            name = next((c.get("Name") for c in v.get("Components") or [] if c.get("Name")), "Docker Engine")
            return f"{name} {v.get('Version', '?')} (API {v.get('ApiVersion', '?')})"
        except Exception:  # noqa: BLE001 - informational only
            return "the Docker Engine API"


def _created_before(created: str, wall: float) -> bool:
    """True when an image's Created timestamp (RFC 3339, ns precision) is before `wall` (a fully cached build)."""
    if not created:
        return False
    try:
        s = re.sub(r"\.(\d{6})\d*", r".\1", created.replace("Z", "+00:00"))
        return datetime.fromisoformat(s).timestamp() < wall - 1
    except ValueError:
        return False
