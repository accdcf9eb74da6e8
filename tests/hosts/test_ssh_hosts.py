"""Hosts over SSH, against real OpenSSH servers in network namespaces made by this test (tests/hosts/netns.py).

A host is used only with its key pinned in target.known_hosts: an unknown key or a changed one is refused, naming
the fingerprint exactly as OpenSSH's own `ssh-keygen -lf` prints it; nothing is added to known_hosts. Unreachable
hosts and failed logins are named. A release of a spec with hosts is refused before its first side effect (the
rollout across hosts does not exist yet).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from ops_pipeline.platform import history
from ops_pipeline.platform.spec import ReleaseConfig, validate_release_config
from ops_pipeline.targets.hosts.check import check_hosts
from tests.conftest import make_defs, release_run_config
from tests.hosts.conftest import target
from tests.hosts.netns import sh

pytestmark = pytest.mark.xdist_group("test_hosts")


def openssh_fingerprint(pub: Path) -> str:
    """`ssh-keygen -lf` of a public key: '256 SHA256:... comment (ED25519)' -> 'ssh-ed25519 SHA256:...'."""
    _bits, digest, *_ = sh("ssh-keygen", "-lf", str(pub)).stdout.split()
    return f"{pub.read_text().split()[0]} {digest}"


PM2_VERSION = json.loads((Path(__file__).resolve().parents[2] / "tools/node_modules/pm2/package.json").read_text())["version"]


def daemons_of(pm2_home: Path) -> list[int]:
    """PM2 daemons whose PM2_HOME is pm2_home (the SSH user's default one here)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"God Daemon" in (proc / "cmdline").read_bytes() and \
                    f"PM2_HOME={pm2_home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_check_hosts_job_reports_every_host_ready(hosts, node_app, environment_name):
    result = make_defs().get_job_def("check_hosts").execute_in_process(
        run_config=release_run_config(node_app, environment_name, version="v1", target=target(hosts)))
    assert result.success
    rows = result.output_for_node("verify_hosts")
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert [r["host"] for r in rows] == ["app1", "app2", "app3"]
    for row, host in zip(rows, hosts.hosts, strict=True):
        assert row["reachable"] and not row["problems"], row
        assert row["key"] == openssh_fingerprint(host.folder / "ssh_host_ed25519_key.pub")
        assert row["node"] == node and row["pm2"] == PM2_VERSION, row
        assert row["free_mb"] > 0 and abs(row["clock_skew_s"]) < 2, row
    assert not daemons_of(Path.home() / ".pm2"), "checking a host must not leave a PM2 daemon running on it"
    mat = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    table = mat[0].event_specific_data.metadata["hosts"]
    assert isinstance(table, dg.TableMetadataValue) and len(table.records) == 3


def test_an_unknown_host_key_is_refused_and_never_pinned(hosts, tmp_path):
    pinned = tmp_path / "known_hosts"
    pinned.write_text("".join(h.known_hosts_line() + "\n" for h in hosts.hosts[:2]))
    before = pinned.read_text()
    cfg = ReleaseConfig(target=target(hosts, known_hosts=str(pinned)))
    reports = check_hosts(cfg.target)
    assert [r.ready for r in reports] == [True, True, False]
    problem = reports[2].problems[0]
    assert "host app3" in problem and "unknown host key" in problem and "never trusted on first contact" in problem
    assert openssh_fingerprint(hosts.hosts[2].folder / "ssh_host_ed25519_key.pub") in problem
    assert pinned.read_text() == before  # nothing learned on first contact


def test_a_changed_host_key_is_refused_as_a_mismatch(hosts, tmp_path):
    other = tmp_path / "other_key"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other))
    first = hosts.hosts[0]
    forged = f"{first.address} {' '.join(Path(str(other) + '.pub').read_text().split()[:2])}\n"
    pinned = tmp_path / "known_hosts"
    pinned.write_text(forged + "".join(h.known_hosts_line() + "\n" for h in hosts.hosts[1:]))
    reports = check_hosts(ReleaseConfig(target=target(hosts, known_hosts=str(pinned))).target)
    assert [r.ready for r in reports] == [False, True, True]
    problem = reports[0].problems[0]
    assert "HOST KEY MISMATCH" in problem and "man-in-the-middle" in problem
    assert openssh_fingerprint(first.folder / "ssh_host_ed25519_key.pub") in problem  # what it presented
    assert openssh_fingerprint(Path(str(other) + ".pub")) in problem  # what is pinned


def test_unreachable_hosts_and_a_refused_login_are_named(hosts, tmp_path):
    down = hosts.hosts[1]
    down.stop_sshd()
    try:
        spec_hosts = hosts.spec_hosts()
        nobody = down.address.rsplit(".", 1)[0] + ".77"  # in that host's subnet, no machine answers there
        spec_hosts.append({"address": nobody, "name": "ghost", "user": "root", "key_file": str(hosts.client_key)})
        wrong_key = tmp_path / "wrong_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key))
        spec_hosts[2]["key_file"] = str(wrong_key)
        cfg = ReleaseConfig(target={"hosts": spec_hosts, "known_hosts": str(hosts.known_hosts), "ssh_timeout_s": 2})
        t0 = time.monotonic()
        reports = check_hosts(cfg.target)
        elapsed = time.monotonic() - t0
    finally:
        hosts.start_sshd(down)
    assert [r.ready for r in reports] == [True, False, False, False]
    assert "host app2" in reports[1].problems[0] and "unreachable" in reports[1].problems[0]
    assert "refused" in reports[1].problems[0].lower()
    assert "authentication as 'root' with the key" in reports[2].problems[0] and "failed" in reports[2].problems[0]
    assert "host ghost" in reports[3].problems[0] and "unreachable" in reports[3].problems[0]
    assert elapsed < 8, f"hosts are checked at once, each bounded by the 2 s timeout (took {elapsed:.1f} s)"


def test_the_job_fails_naming_every_host_not_ready(hosts, node_app, environment_name, tmp_path):
    pinned = tmp_path / "known_hosts"
    pinned.write_text(hosts.hosts[0].known_hosts_line() + "\n")
    result = make_defs().get_job_def("check_hosts").execute_in_process(
        run_config=release_run_config(node_app, environment_name, version="v1",
                                      target=target(hosts, known_hosts=str(pinned))), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data
    text = failure.user_failure_data.description
    assert text.startswith("2 of 3 host(s) not ready") and "host app2" in text and "host app3" in text
    assert failure.user_failure_data.metadata["ready"].value == 1


def test_a_release_to_hosts_is_refused_before_anything_happens(hosts, node_app, environment_name):
    from ops_pipeline.platform import paths

    instance = dg.DagsterInstance.ephemeral()
    result = make_defs().get_job_def("release").execute_in_process(
        run_config=release_run_config(node_app, environment_name, version="v1", fast=True, target=target(hosts)),
        instance=instance, raise_on_error=False)
    assert not result.success
    failed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failed == ["verify_env"]
    text = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.user_failure_data.description
    assert "does not deploy to them yet" in text and "Nothing was done" in text
    assert not paths.environment_dir(environment_name).exists()
    assert history.load(instance, environment_name).events == []


@pytest.mark.parametrize("hosts_cfg, extra, field", [
    ([{"address": "10.0.0.1"}], {}, "target.known_hosts: required"),
    ([{"address": "10.0.0.1"}, {"address": "10.0.0.1"}], {"known_hosts": "/etc/hostname"}, "is listed twice"),
    ([{"address": "10.0.0.1", "roles": ["migrate"]}], {"known_hosts": "/etc/hostname"}, "no host has the web role"),
    ([{"address": "10.0.0.1", "roles": ["web", "migrate"]}, {"address": "10.0.0.2", "roles": ["web", "migrate"]}],
     {"known_hosts": "/etc/hostname"}, "the migrate role is on 2 hosts"),
    ([{"address": "10.0.0.1", "roles": ["db"]}], {"known_hosts": "/etc/hostname"}, "target.hosts[0].roles"),
    ([{"address": "10.0.0.1", "key_file": "id_ed25519"}], {"known_hosts": "/etc/hostname"}, "must be an absolute path"),
    ([{"address": "10.0.0.1; rm -rf /"}], {"known_hosts": "/etc/hostname"}, "target.hosts[0].address"),
    ([{"address": "10.0.0.1", "user": "Root Admin"}], {"known_hosts": "/etc/hostname"}, "target.hosts[0].user"),
    ([{"address": "10.0.0.1"}], {"known_hosts": "/nonexistent/known_hosts"}, "is not a file"),
    ([{"address": "10.0.0.1", "name": "a"}, {"address": "10.0.0.2", "name": "a"}], {"known_hosts": "/etc/hostname"},
     "names two hosts"),
])
def test_bad_hosts_are_named_before_anything(hosts_cfg, extra, field):
    problems = validate_release_config(ReleaseConfig(target={"hosts": hosts_cfg, **extra}))
    assert any(field in p for p in problems), problems
