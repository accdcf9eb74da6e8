"""What a release needs from each host, checked over SSH before anything changes: the host answers with its pinned
key, the user can log in, node (and pm2 for the PM2 target) run, the disk has room and the clock agrees with ours.

All hosts are checked at once (one thread each, bounded by the SSH timeout); one report per host, and one problem
list naming every host that is not ready, so that a release stops before its first side effect.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from ops_pipeline.platform import paths
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import DeployTargetKind, HostConfig, TargetConfig
from ops_pipeline.targets.hosts.ssh import SshError, SshHost

MIN_FREE_MB = 512
MAX_CLOCK_SKEW_S = 5.0
COMMAND_TIMEOUT_S = 30.0  # one probe command (pm2 starts node: seconds on a busy host)

# Each probe is one command, its argv as data; all are run in one SSH connection.
PROBES: dict[str, list[str]] = {
    "node": ["node", "--version"],
    # `pm2 --version` starts a PM2 daemon when none runs: its package.json is read instead (nothing left running)
    "pm2": ["sh", "-c", 'cat "$(dirname "$(readlink -f "$(command -v pm2)")")/../package.json"'],
    "disk": ["df", "-Pk", "/"],
    "clock": ["date", "+%s.%N"],
}


@dataclass
class HostReport:
    host: str
    address: str
    roles: list[str]
    reachable: bool = False
    key: str = ""
    connect_ms: float | None = None
    node: str = ""
    pm2: str = ""
    free_mb: int | None = None
    clock_skew_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.reachable and not self.problems

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "problems"} | {"problems": "; ".join(self.problems)}


def check_host(host: HostConfig, target: TargetConfig, redactor: Redactor | None = None) -> HostReport:
    report = HostReport(host=host.label, address=f"{host.address}:{host.port}", roles=list(host.roles))
    ssh = SshHost(host, paths.resolve(target.known_hosts), target.ssh_timeout_s, redactor)
    try:
        with ssh:
            report.reachable, report.key, report.connect_ms = True, ssh.key_fingerprint, round(ssh.connect_s * 1000, 1)
            out = {name: ssh.run(argv, timeout_s=COMMAND_TIMEOUT_S) for name, argv in PROBES.items()}
            now = time.time()
    except SshError as exc:
        report.problems.append(str(exc))
        return report
    where = f"host {host.label}"
    if out["node"].ok:
        report.node = out["node"].stdout.strip()
    else:
        report.problems.append(f"{where}: node is not installed or not on the SSH user's PATH "
                               f"({(out['node'].stderr or out['node'].stdout).strip()[:200]})")
    try:
        report.pm2 = str(json.loads(out["pm2"].stdout)["version"]) if out["pm2"].ok else ""
    except (ValueError, KeyError, TypeError):
        report.pm2 = ""
    if not report.pm2 and target.kind == DeployTargetKind.pm2:
        report.problems.append(f"{where}: pm2 is not installed or not on the SSH user's PATH (npm install -g pm2)")
    try:
        report.free_mb = int(out["disk"].stdout.splitlines()[-1].split()[3]) // 1024
        if report.free_mb < MIN_FREE_MB:
            report.problems.append(f"{where}: {report.free_mb} MB free on /, at least {MIN_FREE_MB} MB needed")
    except (IndexError, ValueError):
        report.problems.append(f"{where}: cannot read free disk space from `df -Pk /`: {out['disk'].stderr.strip()[:200]}")
    try:
        report.clock_skew_s = round(float(out["clock"].stdout.strip()) - now, 2)
        if abs(report.clock_skew_s) > MAX_CLOCK_SKEW_S:
            report.problems.append(f"{where}: its clock is {report.clock_skew_s:+.1f} s off ours (at most "
                                   f"{MAX_CLOCK_SKEW_S:g} s: logs and backups would not line up; is NTP running?)")
    except ValueError:
        report.problems.append(f"{where}: cannot read its clock (`date +%s.%N`)")
    return report


def check_hosts(target: TargetConfig, redactor: Redactor | None = None) -> list[HostReport]:
    """Every host of the target, checked concurrently, in the spec's order."""
    if not target.hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(target.hosts))) as pool:
        return list(pool.map(lambda h: check_host(h, target, redactor), target.hosts))
