"""Encryption at rest of the archive repository (pgBackRest aes-256-cbc), real pgBackRest and PostgreSQL 15: what is
stored is unreadable without the key, a wrong key fails clearly, the key is in no stored file and no log line, and
the encrypted repository restores with the key."""

from __future__ import annotations

import secrets
import stat
import subprocess
from pathlib import Path

import psycopg
import pytest

from ops_pipeline.backup import archiving, pitr
from ops_pipeline.backup.common import BackupError
from ops_pipeline.backup.pgbackrest import PgBackRest, Repository
from tests.pitr.conftest import _folder, archiving_server

pytestmark = pytest.mark.xdist_group("pg15")


def test_an_encrypted_repository_is_unreadable_without_its_key_and_restores_with_it():
    key = secrets.token_urlsafe(32)
    with archiving_server(cipher_key=key) as a:
        with psycopg.connect(a.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE secrets_kept (v text)")
            conn.execute("INSERT INTO secrets_kept SELECT 'plain-marker-' || i FROM generate_series(1, 2000) i")
            conn.execute("SELECT pg_switch_wal()")
        a.tool.check()
        repo = Path(a.repo)
        stored = [p for p in repo.rglob("*") if p.is_file()]
        assert stored and a.tool.info()["cipher"] == "aes-256-cbc"
        for p in stored:  # every file, info files included, is OpenSSL-format ciphertext; no byte of the key
            data = p.read_bytes()
            assert data.startswith(b"Salted__"), p
            assert key.encode() not in data and b"plain-marker" not in data
        wal = next(p for p in stored if "archive" in p.parts and p.name.endswith(".zst"))
        assert subprocess.run(["zstd", "-t", str(wal)], check=False, capture_output=True).returncode != 0
        # the key lives in the server's pgBackRest configuration only: 0600, outside the repository, never logged
        conf = a.tool.config_file
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and repo not in conf.parents
        assert key in conf.read_text() and not any(key in line for line in a.lines)

        for wrong in ("", "not-" + key):  # no key, a wrong key: refused, saying so
            other = PgBackRest("test", a.live, Repository(a.repo, cipher_key=wrong), _folder("ops-pitr-wrongkey-"),
                               log=lambda line: None)
            other.write_config()
            with pytest.raises(BackupError) as err:
                other.info()
            print(f"\n{wrong and 'wrong key' or 'no key'}: {err.value}")
            assert "repository key" in str(err.value) and (not wrong or wrong not in str(err.value))

        restored = pitr.restore(a.tool, a.live, a.url, pitr.Target.parse("latest"), log=print)
        try:
            with psycopg.connect(restored.url("postgres")) as conn:
                assert conn.execute("SELECT count(*) FROM secrets_kept").fetchone()[0] == 2000
        finally:
            restored.discard()
        assert not any(key in line for line in a.lines)


def test_key_rotation_is_a_new_repository_with_the_new_key():
    """README: rotate by pointing the environment at a new repository (repo_dir) with the new key; the first
    release or backup creates the stanza and a full backup there; the old repository stays readable with the old key
    until its backups are no longer needed."""
    old_key, new_key = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with archiving_server(cipher_key=old_key) as a:
        new = PgBackRest("test", a.live, Repository(_folder("ops-pitr-newrepo-"), cipher_key=new_key),
                         _folder("ops-pitr-newconf-"), log=lambda line: None)
        new.write_config()
        archiving.enable_archiving(a.url, new, archive_timeout_s=60, log=print)
        new.stanza_create()
        new.check()
        new.backup("full")
        assert new.info()["cipher"] == "aes-256-cbc" and len(new.info()["backup"]) == 1
        assert len(a.tool.info()["backup"]) == 1  # the old repository, old key: still readable
        for p in Path(new.repo.path).rglob("*"):
            if p.is_file():
                assert old_key.encode() not in p.read_bytes() and new_key.encode() not in p.read_bytes()
