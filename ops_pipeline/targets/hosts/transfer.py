"""A release bundle shipped to a host once, checked file by file on arrival, never rebuilt per host.

The bundle (the folder `build_image` made) travels as one tar stream over the SSH connection into a fresh folder
beside the host's release folders, with a `SHA256SUMS` manifest in the format of coreutils' `sha256sum`; the host
checks every file with `sha256sum --check --strict` (no Python needed there) and only then is the folder moved into
place (`mv`, atomic on one file system). A host that already holds the same artifact and still passes the check is
not sent anything. Symlinks travel as symlinks; a file's executable bit is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ops_pipeline.targets.base import Artifact
from ops_pipeline.targets.hosts.ssh import SshError, SshHost

MANIFEST = "SHA256SUMS"
RECORD = "release.json"


def manifest(root: Path) -> str:
    """`sha256sum` lines for every regular file under root (sorted, relative paths)."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            rel = p.relative_to(root).as_posix()
            if "\n" in rel or "\\" in rel:
                raise ValueError(f"{rel!r}: a file name sha256sum cannot check")
            lines.append(f"{h.hexdigest()}  ./{rel}\n")
    return "".join(lines)


@dataclass
class Shipment:
    host: str
    folder: str
    sent_bytes: int
    files: int
    seconds: float
    reused: bool
    repaired: bool = False

    def summary(self) -> str:
        if self.reused:
            return f"{self.host}: {self.folder} already holds it (every file checked) in {self.seconds:.2f} s"
        again = " (the copy there was damaged: replaced)" if self.repaired else ""
        return (f"{self.host}{again}: {self.files} files, {self.sent_bytes / 1e6:.1f} MB sent and checked in "
                f"{self.seconds:.2f} s -> {self.folder}")


class _Counting:
    """A writable file object that counts what passes through it."""

    def __init__(self, inner) -> None:
        self.inner, self.count = inner, 0

    def write(self, data: bytes) -> int:
        self.inner.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()


def ship_bundle(ssh: SshHost, artifact: Artifact, version: str, releases: str, record: str,
                sums: str | None = None) -> Shipment:
    """Put `artifact` (a bundle) at `<releases>/<version>` on the host, verified. `record` is the JSON written as
    release.json beside it (who built it, its content hash); `sums` the manifest when the caller has it already."""
    src = Path(artifact.ref)
    if artifact.kind != "bundle" or not src.is_dir():
        raise SshError(f"{ssh.where}: artifact {artifact.id} is not a bundle folder here ({artifact.ref})")
    t0 = time.monotonic()
    dest = f"{releases.rstrip('/')}/{version}"
    repaired = False
    recorded = ssh.run(["cat", f"{dest}/{RECORD}"])
    if recorded.ok:
        try:
            held = json.loads(recorded.stdout).get("artifact_id")
        except (ValueError, AttributeError):
            held = None
        if held is not None and held != artifact.id:
            raise SshError(f"{ssh.where}: {dest} already holds another artifact ({held}); versions are immutable")
        verified = ssh.run(["sh", "-c", f"cd {shlex.quote(dest)} && sha256sum --check --strict --quiet {MANIFEST}"],
                           timeout_s=600)
        if held == artifact.id and verified.ok:
            return Shipment(ssh.host.label, dest, 0, 0, time.monotonic() - t0, reused=True)
        repaired = True  # same version, but a file differs or is missing: sent again and replaced whole
    sums = sums if sums is not None else manifest(src)
    incoming = f"{releases.rstrip('/')}/.incoming-{version}-{uuid.uuid4().hex[:8]}"
    receive = (f"set -e; mkdir -p {shlex.quote(incoming)}; tar -x -f - -C {shlex.quote(incoming)}; "
               f"cd {shlex.quote(incoming)}; sha256sum --check --strict --quiet {MANIFEST}")
    files = sums.count("\n")
    try:
        sent = _send_tar(ssh, receive, src, {MANIFEST: sums.encode(), RECORD: record.encode()})
        placed = ssh.run(["sh", "-c", f"set -e; rm -rf {shlex.quote(dest)}; mv {shlex.quote(incoming)} {shlex.quote(dest)}"])
        if not placed.ok:
            raise SshError(f"{ssh.where}: could not move the checked bundle into {dest}: {placed.stderr.strip()[:300]}")
    except SshError:
        try:  # nothing half-received is left beside the release folders
            ssh.run(["rm", "-rf", incoming])
        except SshError:
            pass
        raise
    return Shipment(ssh.host.label, dest, sent, files, time.monotonic() - t0, reused=False, repaired=repaired)


def _send_tar(ssh: SshHost, command: str, src: Path, extra: dict[str, bytes]) -> int:
    """Stream `src` (and the `extra` files) as a tar archive to `command`'s stdin on the host; its bytes sent."""
    if ssh.client is None:
        raise SshError(f"{ssh.where}: not connected")
    channel = ssh.client.get_transport().open_session()
    try:
        channel.exec_command(command)
        out = _Counting(channel.makefile("wb"))
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.add(str(src), arcname=".", recursive=True)
            for name, data in extra.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        out.flush()
        channel.shutdown_write()
        status = channel.recv_exit_status()
        err = (channel.makefile("rb").read() + channel.makefile_stderr("rb").read()).decode(errors="replace")
    except OSError as exc:
        raise SshError(f"{ssh.where}: the connection failed while sending the bundle: {exc}") from None
    finally:
        channel.close()
    if status != 0:
        bad = [line for line in err.splitlines() if "FAILED" in line or "No such file" in line][:5]
        raise SshError(f"{ssh.where}: the bundle did not arrive intact (exit {status}): "
                       + ("; ".join(bad) or err.strip()[-400:]))
    return out.count
