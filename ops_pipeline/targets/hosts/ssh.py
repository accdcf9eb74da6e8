"""One host reached over SSH (paramiko), its host key verified against the environment's pinned known_hosts.

Trust is never given on first contact: the client loads only `target.known_hosts` (not ~/.ssh/known_hosts, not
the system file) and refuses a host whose key is not in it, naming the key's fingerprint so that an operator
can compare it out of band and pin it; a key that differs from the pinned one is refused as a possible
man-in-the-middle. Commands are argv lists, quoted with `shlex.join` in one place (`run`).
"""

from __future__ import annotations

import base64
import hashlib
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import paramiko

from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import HostConfig


class SshError(RuntimeError):
    """The host cannot be used: unreachable, refused or failed authentication. The message names the host."""


class HostKeyRefused(SshError):
    pass


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint (as `ssh-keygen -lf` and `ssh` print it)."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, keeping the key that was presented for the error message."""

    def __init__(self) -> None:
        self.presented: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key) -> None:
        self.presented = key
        raise paramiko.SSHException(f"host key for {hostname} is not pinned")


@dataclass
class Result:
    argv: list[str]
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class SshHost:
    """A connection to one host. Use as a context manager; `connect()` raises SshError with the reason."""

    def __init__(self, host: HostConfig, known_hosts: Path, timeout_s: float = 10.0, redactor: Redactor | None = None):
        self.host = host
        self.known_hosts = known_hosts
        self.timeout_s = timeout_s
        self.redactor = redactor or Redactor()
        self.client: paramiko.SSHClient | None = None
        self.key_fingerprint = ""
        self.connect_s = 0.0

    @property
    def where(self) -> str:
        h = self.host
        named = f"{h.name} ({h.address}:{h.port})" if h.name else f"{h.address}:{h.port}"
        return f"host {named}"

    def _pin_hint(self) -> str:
        port = f"-p {self.host.port} " if self.host.port != 22 else ""
        return (f"compare it with the host's own `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub`, then pin it: "
                f"ssh-keyscan {port}{self.host.address} >> {self.known_hosts}")

    def connect(self) -> SshHost:
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(self.known_hosts))
        except OSError as exc:
            raise SshError(f"target.known_hosts: cannot read {self.known_hosts}: {exc.strerror or exc}") from None
        policy = _RefuseUnknown()
        client.set_missing_host_key_policy(policy)
        h = self.host
        t0 = time.monotonic()
        try:
            client.connect(h.address, port=h.port, username=h.user, key_filename=h.key_file or None,
                           allow_agent=not h.key_file, look_for_keys=False, timeout=self.timeout_s,
                           banner_timeout=self.timeout_s, auth_timeout=self.timeout_s, channel_timeout=self.timeout_s)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyRefused(
                f"{self.where}: HOST KEY MISMATCH: it presented {fingerprint(exc.key)}, but {self.known_hosts} pins "
                f"{fingerprint(exc.expected_key)}. Refused: this is a man-in-the-middle or a reinstalled host; if the "
                f"host was reinstalled, replace its line in {self.known_hosts} after checking the new key") from None
        except paramiko.AuthenticationException as exc:
            client.close()
            how = f"the key {h.key_file}" if h.key_file else "the SSH agent's keys"
            raise SshError(f"{self.where}: authentication as {h.user!r} with {how} failed ({exc})") from None
        except paramiko.SSHException as exc:
            client.close()
            if policy.presented is not None:
                raise HostKeyRefused(
                    f"{self.where}: unknown host key {fingerprint(policy.presented)}: it is not pinned in "
                    f"{self.known_hosts}, and a key is never trusted on first contact. If it is the right host, "
                    f"{self._pin_hint()}") from None
            raise SshError(f"{self.where}: SSH failed: {exc}") from None
        except TimeoutError:
            client.close()
            raise SshError(f"{self.where}: unreachable: no answer within {self.timeout_s:g} s") from None
        except paramiko.ssh_exception.NoValidConnectionsError as exc:  # every address refused or unreachable
            client.close()
            reasons = sorted({e.strerror or str(e) for e in exc.errors.values()})
            raise SshError(f"{self.where}: unreachable: {'; '.join(reasons)}") from None
        except OSError as exc:  # no route, name not resolved
            client.close()
            raise SshError(f"{self.where}: unreachable: {exc.strerror or exc}") from None
        self.connect_s = time.monotonic() - t0
        self.client = client
        self.key_fingerprint = fingerprint(client.get_transport().get_remote_server_key())
        return self

    def run(self, argv: list[str], timeout_s: float = 60.0, stdin: bytes | None = None) -> Result:
        """Run one command; its exit status, stdout and stderr (redacted). Raises SshError when the host stops
        answering."""
        if self.client is None:
            raise SshError(f"{self.where}: not connected")
        command = shlex.join(argv)
        try:
            chan_in, chan_out, chan_err = self.client.exec_command(command, timeout=timeout_s)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            status = chan_out.channel.recv_exit_status()
        except TimeoutError:
            raise SshError(f"{self.where}: `{argv[0]}` did not finish within {timeout_s:g} s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"{self.where}: the connection failed while running `{argv[0]}`: {exc}") from None
        return Result(argv, status, self.redactor(out), self.redactor(err))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()
