"""Archive mode with the backup store in S3: pgBackRest's repository in the same bucket (a moto server on loopback,
over HTTPS with a certificate of its own, verified through AWS_CA_BUNDLE like the store's client), encrypted; a
release's restore point restores from it. pgBackRest speaks HTTPS only: an http endpoint is refused up front."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import dagster as dg
import psycopg
import pytest

from ops_pipeline.backup import archive_ops, pitr
from ops_pipeline.backup.store import BackupStore
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.postgres import ConnInfo
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
from tests.pitr.conftest import _folder, archiving_server

pytestmark = pytest.mark.xdist_group("pg15")


@pytest.fixture
def moto_https():
    """moto on loopback behind Debian's nginx terminating TLS with a certificate made here (werkzeug's own TLS drops
    kept-alive connections, which pgBackRest reuses: "TLS error ... unexpected eof")."""
    root = Path(_folder("ops-pitr-tls-"))
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    os.chmod(cert, 0o644)
    moto_port, port = free_port(), free_port()
    (root / "logs").mkdir()
    (root / "nginx.conf").write_text(f"""
pid {root}/nginx.pid;
error_log {root}/logs/error.log;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    location / {{
      proxy_pass http://127.0.0.1:{moto_port};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffering off;
    }}
  }}
}}
""")
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    nginx = subprocess.run(["/usr/sbin/nginx", "-p", str(root), "-c", str(root / "nginx.conf")], capture_output=True,
                           text=True, check=False)
    try:
        assert nginx.returncode == 0, nginx.stderr
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", moto_port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield f"https://localhost:{port}", str(cert)  # pgBackRest 2.45 matches host names, not addresses
    finally:
        if (root / "nginx.pid").exists():
            os.kill(int((root / "nginx.pid").read_text()), 15)
        os.killpg(moto.pid, 15)
        moto.wait(10)
        time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)


def _spec(env: str, key_ref: str) -> ReleaseSpec:
    cfg = ReleaseConfig(environment=env, version="v3", embedded_services=False,
                        app={"redis": {"enabled": False}, "required_env": [], "secret_env": [], "jwt_secret_env": "",
                             "node_env_var": "", "database": {"backups": "archive", "archive": {"cipher_key_from": key_ref}}})
    return ReleaseSpec(config=cfg, version="v3", app_dir="")


def test_the_archive_repository_in_the_s3_store_encrypted_restores_a_restore_point(moto_https, monkeypatch):
    endpoint, cert = moto_https
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    monkeypatch.setenv("OPS_TEST_ARCHIVE_KEY", secrets.token_urlsafe(32))
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test-secret-key",
                      region_name="us-east-1", verify=cert)
    s3.create_bucket(Bucket="ops-archive")
    store = BackupStore(kind="s3", bucket="ops-archive", s3_endpoint_url=endpoint, aws_access_key_id="test",
                        aws_secret_access_key="test-secret-key")
    with archiving_server(full_backup=False) as a:
        url = ConnInfo.parse(a.url).url("postgres")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
            conn.execute("INSERT INTO accounts SELECT i, 100 FROM generate_series(1, 1000) i")
        lines: list[str] = []
        spec = _spec("s3env", "env:OPS_TEST_ARCHIVE_KEY")
        archive = archive_ops.open_archive(spec, url, Redactor(), store, lines.append)
        point = archive_ops.safety_point(archive, spec, lines.append)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE accounts SET balance = 0")  # the bad migration
            conn.execute("SELECT pg_switch_wal()")

        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="ops-archive")
                for o in page.get("Contents", [])]
        assert any(k.startswith("backups/pgbackrest/archive/s3env/") for k in keys)
        assert any(k.startswith("backups/pgbackrest/backup/s3env/") for k in keys)
        info = s3.get_object(Bucket="ops-archive", Key="backups/pgbackrest/backup/s3env/backup.info")["Body"].read()
        assert info.startswith(b"Salted__")  # encrypted in the bucket too
        assert not any(os.environ["OPS_TEST_ARCHIVE_KEY"] in line or "test-secret-key" in line for line in lines)

        restored = pitr.restore(archive.tool, archive.live, url, pitr.Target.parse("name", point["restore_point"]),
                                log=print, point_lsn=point["lsn"])
        try:
            with psycopg.connect(restored.url("postgres")) as conn:
                assert conn.execute("SELECT count(*), sum(balance) FROM accounts").fetchone() == (1000, 100_000)
        finally:
            restored.discard()


def test_an_http_s3_endpoint_is_refused_before_anything_is_done():
    store = BackupStore(kind="s3", bucket="b", s3_endpoint_url="http://127.0.0.1:9000")
    with pytest.raises(dg.Failure, match="pgBackRest reaches S3 over HTTPS only"):
        archive_ops.repository(_spec("s3env", "").app.database.archive, store, "", Redactor())
