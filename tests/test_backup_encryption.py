"""Encryption at rest of dumps (AES-256-GCM framed chunks between zstd and the store), against a real PostgreSQL:
unreadable without the key, a wrong key named before anything is restored, altered or truncated frames fail
authentication naming the backup, and key rotation keeps old backups readable with the old key as a previous key."""

import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from ops_pipeline import backup as backups
from ops_pipeline.backup import crypt
from ops_pipeline.backup.common import BackupError
from ops_pipeline.backup.store import BackupStore, StoreError
from ops_pipeline.platform.postgres import PostgresResource

PG = PostgresResource()
KEY_A = "a" * 8 + "kR3n9QzX0pLw7VbT2yHc5MfJ8sDg4Ue1"
KEY_B = "b" * 8 + "Zt6YqN1xWc9PvL3mK7rB0sHd2Gf5Je8A"


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("DUMP_KEY_A", KEY_A)
    monkeypatch.setenv("DUMP_KEY_B", KEY_B)


def _store(tmp_path, current="env:DUMP_KEY_A", previous=()) -> BackupStore:
    return BackupStore(local_dir=str(tmp_path / "store"), cipher_key_from=current, previous_keys_from=list(previous))


def _dump_path(store: BackupStore, m: dict) -> Path:
    return Path(store.local_dir) / "backups" / m["scope"] / m["id"] / "dump.pgc.zst"


def _restore_counts(store, m, url):
    target = f"e_{time.time_ns() % 10**8}"
    backups.restore_into(PG, store, m, url, target, log=print)
    try:
        return PG.table_row_counts(url, target)
    finally:
        backups.drop_database(PG, url, target)


def test_encrypted_dump_is_unreadable_without_the_key_and_restores_with_it(scratch_db, tmp_path, keys):
    store = _store(tmp_path)
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    key_id = crypt.Key.from_secret(KEY_A, "test").id
    assert m["encryption"] == {"cipher": "aes-256-gcm", "key_id": key_id} and m["verified"]
    stored = _dump_path(store, m).read_bytes()
    assert KEY_A.encode() not in stored and KEY_A not in str(m)
    assert b"example.com" not in stored and b"customers" not in stored
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompressobj().decompress(stored)
    proc = subprocess.run([PG.binary("pg_restore"), "--list"], input=stored, capture_output=True, check=False)
    assert proc.returncode != 0
    assert _restore_counts(store, m, scratch_db) == m["table_counts"]


def test_wrong_or_missing_key_fails_clearly_before_anything_is_restored(scratch_db, tmp_path, keys, monkeypatch):
    m = backups.take_backup(PG, _store(tmp_path), scratch_db, trigger="manual", environment="test", log=print)
    id_a, id_b = (crypt.Key.from_secret(k, "t").id for k in (KEY_A, KEY_B))
    wrong = _store(tmp_path, "env:DUMP_KEY_B")
    target = f"w_{time.time_ns() % 10**8}"
    with pytest.raises(BackupError, match=f"backup {m['id']} was encrypted with key {id_a}; the configured key is {id_b}"):
        backups.restore_into(PG, wrong, m, scratch_db, target, log=print)
    assert not PG.database_exists(scratch_db, target)
    with pytest.raises(BackupError, match=f"encrypted with key {id_a}"):
        backups.verify_stored(wrong, PG, m["scope"], m["id"], m["sha256"])
    with pytest.raises(BackupError, match="configured key is none"):
        backups.verify_stored(BackupStore(local_dir=wrong.local_dir), PG, m["scope"], m["id"], m["sha256"])
    monkeypatch.delenv("DUMP_KEY_A")
    with pytest.raises(StoreError, match="cipher_key_from: no key in environment variable DUMP_KEY_A"):
        backups.take_backup(PG, _store(tmp_path / "x"), scratch_db, trigger="manual", environment="test", log=print)
    assert not (tmp_path / "x").exists()  # nothing dumped


def test_short_key_and_bad_reference_are_refused_before_the_dump(scratch_db, tmp_path, monkeypatch):
    monkeypatch.setenv("SHORT", "tooshort")
    with pytest.raises(StoreError, match="8 bytes; give a random secret of at least 32") as exc:
        backups.take_backup(PG, _store(tmp_path, "env:SHORT"), scratch_db, trigger="manual", environment="test", log=print)
    assert "tooshort" not in str(exc.value)
    with pytest.raises(StoreError, match="must be env:NAME or file:/absolute/path"):
        _store(tmp_path, "DUMP_KEY_A").keyring()
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate_mid_frame", "cut_at_frame_boundary"])
def test_altered_or_truncated_frames_fail_authentication_naming_the_backup(scratch_db, tmp_path, keys, damage):
    store = _store(tmp_path)
    m = backups.take_backup(PG, store, scratch_db, trigger="manual", environment="test", log=print)
    path = _dump_path(store, m)
    data = bytearray(path.read_bytes())
    header = len(crypt.MAGIC) + 16 + 4
    if damage == "flip":
        data[header + 5 + 100] ^= 0x01
        expected = "is corrupted or altered: encrypted frame 0 fails authentication"
    elif damage == "truncate_mid_frame":
        del data[-10:]
        expected = "is truncated: encrypted frame .* is incomplete"
    else:  # cut exactly at a frame boundary (here: after the header): only the final-frame flag tells
        del data[header:]
        expected = "is truncated: the final encrypted frame is missing"
    path.write_bytes(bytes(data))
    with pytest.raises(BackupError, match=f"backup {m['id']} {expected}"):
        backups.verify_stored(store, PG, m["scope"], m["id"], m["sha256"])


def test_key_rotation_new_backups_use_the_new_key_old_ones_read_with_the_previous_key(scratch_db, tmp_path, keys):
    old = backups.take_backup(PG, _store(tmp_path), scratch_db, trigger="manual", environment="test", log=print)
    rotated = _store(tmp_path, "env:DUMP_KEY_B", ["env:DUMP_KEY_A"])
    new = backups.take_backup(PG, rotated, scratch_db, trigger="manual", environment="test", log=print)
    assert new["encryption"]["key_id"] == crypt.Key.from_secret(KEY_B, "t").id != old["encryption"]["key_id"]
    for m in (old, new):
        backups.verify_stored(rotated, PG, m["scope"], m["id"], m["sha256"])
    assert _restore_counts(rotated, old, scratch_db) == old["table_counts"]
    with pytest.raises(BackupError, match="was encrypted with key"):  # without the previous key: refused
        backups.verify_stored(_store(tmp_path, "env:DUMP_KEY_B"), PG, old["scope"], old["id"], old["sha256"])


def test_frames_round_trip_and_reordering_fails():
    key = crypt.Key.from_secret(KEY_A, "t")
    plain = bytes(range(256)) * 9000  # > 2 frames
    stored = b"".join(crypt.encrypt([plain[:1000], plain[1000:]], key))
    ring = crypt.Keyring(key)
    assert b"".join(crypt.decrypt([stored[i:i + 7777] for i in range(0, len(stored), 7777)], ring, "B")) == plain
    header = len(crypt.MAGIC) + 20
    f0 = 5 + int.from_bytes(stored[header:header + 4], "big")
    swapped = stored[:header] + stored[header + f0:header + 2 * f0] + stored[header:header + f0] + stored[header + 2 * f0:]
    with pytest.raises(BackupError, match="backup B is corrupted or altered: encrypted frame 0"):
        b"".join(crypt.decrypt([swapped], ring, "B"))
    f1 = 5 + int.from_bytes(stored[header + f0:header + f0 + 4], "big")
    with pytest.raises(BackupError, match=r"backup B is truncated: the final encrypted frame is missing \(after 2 frames\)"):
        b"".join(crypt.decrypt([stored[:header + f0 + f1]], ring, "B"))
    assert "kR3n" not in repr(key)


def test_settings_take_key_references_and_never_echo_a_pasted_key(monkeypatch):
    from ops_pipeline.platform.settings import SettingsError, load_settings

    monkeypatch.setenv("OPS_BACKUP_CIPHER_KEY_FROM", "env:DUMP_KEY_B")
    monkeypatch.setenv("OPS_BACKUP_PREVIOUS_KEYS_FROM", "env:DUMP_KEY_A,file:/etc/old-key")
    s = load_settings()
    assert (s.backup_cipher_key_from, s.backup_previous_keys_from) == ("env:DUMP_KEY_B", "env:DUMP_KEY_A,file:/etc/old-key")
    monkeypatch.setenv("OPS_BACKUP_CIPHER_KEY_FROM", KEY_A)
    with pytest.raises(SettingsError, match="OPS_BACKUP_CIPHER_KEY_FROM: must be env:NAME") as exc:
        load_settings()
    assert KEY_A not in str(exc.value)
