"""A release bundle reaches each host once, checked there file by file with coreutils' sha256sum (real sshd in a
network namespace; the namespaces share this machine's disk, so each host gets its own releases folder)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ops_pipeline.platform.spec import ReleaseConfig
from ops_pipeline.targets.base import Artifact
from ops_pipeline.targets.hosts.ssh import SshError, SshHost
from ops_pipeline.targets.hosts.transfer import MANIFEST, manifest, ship_bundle
from tests.hosts.conftest import target

pytestmark = pytest.mark.xdist_group("test_hosts")


@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "bundle"
    (root / "dist").mkdir(parents=True)
    (root / "dist" / "server.js").write_text("console.log('v1')\n")
    (root / "node_modules" / "dep").mkdir(parents=True)
    (root / "node_modules" / "dep" / "index.js").write_bytes(os.urandom(300_000))
    (root / "node_modules" / ".bin").mkdir()
    (root / "node_modules" / ".bin" / "tool").symlink_to("../dep/index.js")
    (root / "start.sh").write_text("#!/bin/sh\nexec node dist/server.js\n")
    (root / "start.sh").chmod(0o755)
    return Artifact(kind="bundle", id="node-api-abc-1", ref=str(root), commit="abc", dirty=False,
                    content_hash="sha256:x")


def record(artifact: Artifact) -> str:
    return json.dumps({"version": "v1", "artifact_id": artifact.id, "content_hash": artifact.content_hash})


def test_a_bundle_reaches_every_host_checked_and_is_sent_once(hosts, bundle, tmp_path):
    cfg = ReleaseConfig(target=target(hosts)).target
    shipped = []
    for n, host in enumerate(cfg.hosts):
        releases = str(tmp_path / f"on-{host.label}" / "releases")
        with SshHost(host, hosts.known_hosts) as ssh:
            first = ship_bundle(ssh, bundle, "v1", releases, record(bundle))
            again = ship_bundle(ssh, bundle, "v1", releases, record(bundle))
        shipped.append((first, again))
        dest = tmp_path / f"on-{host.label}" / "releases" / "v1"
        assert (dest / "dist" / "server.js").read_text() == "console.log('v1')\n"
        assert os.readlink(dest / "node_modules" / ".bin" / "tool") == "../dep/index.js"
        assert os.access(dest / "start.sh", os.X_OK)
        assert json.loads((dest / "release.json").read_text())["artifact_id"] == bundle.id
        assert not [p for p in dest.parent.iterdir() if p.name.startswith(".incoming")]
    for first, again in shipped:
        assert not first.reused and first.files == 3 and first.sent_bytes > 300_000
        assert again.reused and again.sent_bytes == 0, again


def test_a_damaged_copy_is_detected_and_replaced_and_another_artifact_is_refused(hosts, bundle, tmp_path):
    host = ReleaseConfig(target=target(hosts)).target.hosts[0]
    releases = tmp_path / "releases"
    with SshHost(host, hosts.known_hosts) as ssh:
        ship_bundle(ssh, bundle, "v1", str(releases), record(bundle))
        (releases / "v1" / "node_modules" / "dep" / "index.js").write_bytes(b"tampered")
        repaired = ship_bundle(ssh, bundle, "v1", str(releases), record(bundle))
        assert repaired.repaired and not repaired.reused and repaired.sent_bytes > 300_000
        assert (releases / "v1" / "node_modules" / "dep" / "index.js").stat().st_size == 300_000
        other = Artifact(**{**bundle.to_json(), "id": "node-api-def-2"})
        with pytest.raises(SshError, match="already holds another artifact .node-api-abc-1.; versions are immutable"):
            ship_bundle(ssh, other, "v1", str(releases), record(other))


def test_a_file_that_arrives_different_fails_the_shipment_and_leaves_nothing(hosts, bundle, tmp_path):
    host = ReleaseConfig(target=target(hosts)).target.hosts[1]
    releases = tmp_path / "releases"
    sums = manifest(bundle.ref).replace("./dist/server.js", "./start.sh", 1)  # a manifest that does not match
    with SshHost(host, hosts.known_hosts) as ssh, pytest.raises(SshError, match="did not arrive intact .*FAILED"):
        ship_bundle(ssh, bundle, "v1", str(releases), record(bundle), sums=sums)
    assert not (releases / "v1").exists()
    assert not list(releases.iterdir())
    assert MANIFEST == "SHA256SUMS" and shutil.which("sha256sum")
