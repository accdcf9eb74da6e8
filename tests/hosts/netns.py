"""Test hosts: network namespaces made by the test run, each with its own address and a real OpenSSH `sshd`.

Each host is a namespace `ops<tag>h<n>` joined to this machine by a veth pair on its own /24 of 10.213.0.0/16
(10.213.X.1 here, 10.213.X.2 in the namespace; X chosen among the subnets no interface uses). Its `sshd` (Debian's
openssh-server) listens only on the namespace's address, with its own host key, and accepts one client key. The
namespaces share this machine's file system: node and PM2 are the ones installed here. Traffic goes only to these
addresses. Everything is removed by `stop()` (sshd's process group, then the namespace, which takes the veth pair).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
ROOT = Path(__file__).resolve().parents[2]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def can_make_hosts() -> str:
    """Empty when namespaces and sshd can be used here; else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not Path(SSHD).exists():
        return "sshd is not installed (apt-get install openssh-server)"
    if not shutil.which("ip"):
        return "iproute2 is not installed"
    return ""


def used_subnets() -> set[int]:
    out = sh("ip", "-4", "-o", "addr", "show").stdout
    return {int(word.split(".")[2]) for word in out.split() if word.startswith("10.213.")}


@dataclass
class SshTestHost:
    name: str
    netns: str
    address: str
    gateway: str
    folder: Path
    veth: str
    sshd: subprocess.Popen | None = None

    @property
    def host_key_pub(self) -> str:
        return (self.folder / "ssh_host_ed25519_key.pub").read_text().strip()

    def known_hosts_line(self) -> str:
        kind, key = self.host_key_pub.split()[:2]
        return f"{self.address} {kind} {key}"

    def sshd_running(self) -> bool:
        return self.sshd is not None and self.sshd.poll() is None

    def stop_sshd(self) -> None:
        if self.sshd_running():
            os.killpg(self.sshd.pid, signal.SIGTERM)
            self.sshd.wait(10)


class SshTestHosts:
    """`count` hosts with sshd, one client key, and a known_hosts file pinning all of them."""

    def __init__(self, base: Path, count: int, path_env: str | None = None) -> None:
        self.base = base
        self.tag = os.urandom(2).hex()
        self.count = count
        self.hosts: list[SshTestHost] = []
        self.client_key = base / "client_ed25519"
        self.known_hosts = base / "known_hosts"
        self.path_env = path_env or f"{ROOT / 'tools' / 'node_modules' / '.bin'}:/usr/local/bin:/usr/bin:/bin"

    def start(self) -> SshTestHosts:
        self.base.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops-pipeline-tests", "-f", str(self.client_key))
        free = sorted(set(range(1, 255)) - used_subnets())
        for n, subnet in enumerate(random.sample(free, self.count)):
            self.hosts.append(self._make(n, subnet))
        self.known_hosts.write_text("".join(h.known_hosts_line() + "\n" for h in self.hosts))
        for h in self.hosts:
            self.start_sshd(h)
        return self

    def _make(self, n: int, subnet: int) -> SshTestHost:
        netns, veth = f"ops{self.tag}h{n}", f"oh{self.tag}{n}"
        folder = self.base / f"host{n}"
        folder.mkdir()
        host = SshTestHost(f"app{n + 1}", netns, f"10.213.{subnet}.2", f"10.213.{subnet}.1", folder, veth)
        sh("ip", "netns", "add", netns)
        try:
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "n")
            sh("ip", "link", "set", veth + "n", "netns", netns)
            sh("ip", "addr", "add", f"{host.gateway}/24", "dev", veth)
            sh("ip", "link", "set", veth, "up")
            for argv in (["ip", "addr", "add", f"{host.address}/24", "dev", veth + "n"],
                         ["ip", "link", "set", veth + "n", "up"], ["ip", "link", "set", "lo", "up"],
                         ["ip", "route", "add", "default", "via", host.gateway]):
                sh("ip", "netns", "exec", netns, *argv)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f",
               str(folder / "ssh_host_ed25519_key"))
        except RuntimeError:
            sh("ip", "netns", "del", netns, check=False)
            sh("ip", "link", "del", veth, check=False)
            raise
        return host

    def sshd_config(self, host: SshTestHost) -> Path:
        conf = host.folder / "sshd_config"
        conf.write_text(f"""ListenAddress {host.address}
Port 22
HostKey {host.folder / 'ssh_host_ed25519_key'}
PidFile {host.folder / 'sshd.pid'}
AuthorizedKeysFile {self.base / 'authorized_keys'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
SetEnv PATH={self.path_env}
LogLevel VERBOSE
""")
        return conf

    def start_sshd(self, host: SshTestHost, timeout_s: float = 15) -> None:
        (self.base / "authorized_keys").write_text(Path(str(self.client_key) + ".pub").read_text())
        log = open(host.folder / "sshd.log", "ab")  # noqa: SIM115 - kept open by the child
        host.sshd = subprocess.Popen(["ip", "netns", "exec", host.netns, SSHD, "-D", "-e", "-f",
                                      str(self.sshd_config(host))], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if host.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {host.name} exited: {(host.folder / 'sshd.log').read_text()[-800:]}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((host.address, 22)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"sshd of {host.name} did not listen on {host.address}:22 within {timeout_s} s")

    def spec_hosts(self, **extra) -> list[dict]:
        """target.hosts entries for these hosts (root, the client key; the first one also runs migrations)."""
        return [{"address": h.address, "name": h.name, "user": "root", "key_file": str(self.client_key),
                 "roles": ["web", "migrate"] if n == 0 else ["web"], **extra} for n, h in enumerate(self.hosts)]

    def stop(self) -> None:
        for h in self.hosts:
            try:
                h.stop_sshd()
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(h.sshd.pid, signal.SIGKILL)
            sh("ip", "netns", "del", h.netns, check=False)
            sh("ip", "link", "del", h.veth, check=False)
