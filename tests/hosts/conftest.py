"""Three test hosts (network namespaces with a real sshd each), made once per test module."""

from __future__ import annotations

import pytest

from tests.hosts.netns import SshTestHosts, can_make_hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = can_make_hosts()
    if reason:
        pytest.fail(f"test hosts cannot be made here: {reason}")
    made = SshTestHosts(tmp_path_factory.mktemp("hosts"), 3)
    try:
        yield made.start()
    finally:
        made.stop()


def target(hosts: SshTestHosts, **extra) -> dict:
    return {"hosts": hosts.spec_hosts(), "known_hosts": str(hosts.known_hosts), "ssh_timeout_s": 3, **extra}
