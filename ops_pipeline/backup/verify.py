"""Reading a stored backup back: the decompressed stream, and the full verification (sha256 of the stored bytes,
`pg_restore` parsing every byte) that a backup passes before its manifest is written."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import threading
import time
from collections.abc import Iterator

import zstandard

from ops_pipeline.backup import crypt
from ops_pipeline.backup.common import BackupError, stderr_reader
from ops_pipeline.backup.store import DUMP_NAME, BackupStore, StoreError
from ops_pipeline.platform.postgres import PostgresResource


def _stored(store: BackupStore, scope: str, backup_id: str, sha) -> Iterator[bytes]:
    for chunk in store.read(scope, backup_id, DUMP_NAME):
        if sha is not None:
            sha.update(chunk)
        yield chunk


def decrypted(store: BackupStore, scope: str, backup_id: str, sha=None) -> Iterator[bytes]:
    """The stored dump's zstd stream, decrypted when it was stored encrypted (seen from its first bytes); feeds `sha`
    with the stored bytes."""
    stored = _stored(store, scope, backup_id, sha)
    first = next(stored, b"")
    rest = itertools.chain([first], stored)
    if crypt.is_encrypted(first):
        return crypt.decrypt(rest, store.keyring(), backup_id)
    return rest


def decompressed(store: BackupStore, scope: str, backup_id: str, sha=None) -> Iterator[bytes]:
    """The stored dump, decrypted if need be and decompressed, chunk by chunk; feeds `sha` with the stored bytes.
    Raises BackupError on a wrong key, a corrupted or truncated stream."""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    for chunk in decrypted(store, scope, backup_id, sha):
        try:
            out = dobj.decompress(chunk)
        except zstandard.ZstdError as exc:
            raise BackupError(f"backup {backup_id} is corrupted: zstd: {exc}") from None
        if out:
            yield out
    if not dobj.eof:
        raise BackupError("compressed stream is truncated (zstd frame incomplete)")


def stream_decompressed(store: BackupStore, scope: str, backup_id: str, sink, sha=None) -> int:
    """Read a stored dump, feeding the sha256 of the stored bytes and writing decompressed bytes to `sink`.
    Returns the number of stored bytes."""
    stored = _Counted(sha)
    for out in decompressed(store, scope, backup_id, stored):
        sink(out)
    return stored.n


class _Counted:
    """Counts the bytes fed to a hash (if any) on their way."""

    def __init__(self, sha=None) -> None:
        self.sha, self.n = sha, 0

    def update(self, data: bytes) -> None:
        self.n += len(data)
        if self.sha is not None:
            self.sha.update(data)


def verify_stored(store: BackupStore, postgres: PostgresResource, scope: str, backup_id: str, expected_sha: str,
                  expected_size: int | None = None) -> dict:
    """Read the stored backup back in full: sha256 must match and pg_restore must parse every byte."""
    t0 = time.monotonic()
    sha = hashlib.sha256()
    proc = subprocess.Popen([postgres.binary("pg_restore"), "--list"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    # `--list` alone would accept a truncated file; the full read below goes through a second pg_restore
    # that writes the whole archive as SQL to /dev/null (reads and decodes every data block).
    full = subprocess.Popen([postgres.binary("pg_restore"), "--file=/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    toc_out: list[bytes] = []
    full_err: list[str] = []

    def read_list() -> None:
        assert proc.stdout is not None
        toc_out.append(proc.stdout.read())

    lister = threading.Thread(target=read_list, daemon=True)
    lister.start()
    err_thread = stderr_reader(full, full_err)
    head_sent = False
    size = 0

    def sink(data: bytes) -> None:
        nonlocal head_sent
        assert full.stdin is not None and proc.stdin is not None
        full.stdin.write(data)
        if not head_sent:
            try:
                proc.stdin.write(data)
            except BrokenPipeError:
                head_sent = True

    try:
        try:
            size = stream_decompressed(store, scope, backup_id, sink, sha)
        except (StoreError, zstandard.ZstdError) as exc:
            raise BackupError(f"backup {backup_id} unreadable: {exc}") from None
        finally:
            for p in (full, proc):
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass
        rc_full = full.wait()
        err_thread.join(5)
        proc.wait()
        lister.join(5)
    except BrokenPipeError:
        full.wait()
        err_thread.join(5)
        raise BackupError(f"backup {backup_id} failed verification: pg_restore stopped reading: "
                          f"{' | '.join(full_err[-3:])}") from None
    finally:
        for p in (full, proc):
            if p.poll() is None:
                p.kill()
    if sha.hexdigest() != expected_sha:
        raise BackupError(f"backup {backup_id} failed verification: stored sha256 {sha.hexdigest()[:16]}… "
                          f"!= written {expected_sha[:16]}…")
    if expected_size is not None and size != expected_size:
        raise BackupError(f"backup {backup_id} failed verification: stored {size} bytes, wrote {expected_size}")
    if rc_full != 0:
        raise BackupError(f"backup {backup_id} failed verification: pg_restore could not read it: {' | '.join(full_err[-3:])}")
    toc = (toc_out[0] if toc_out else b"").decode(errors="replace")
    entries = sum(1 for line in toc.splitlines() if line and not line.startswith(";"))
    return {"method": "sha256 + full pg_restore read", "seconds": round(time.monotonic() - t0, 3), "toc_entries": entries,
            "ok": True}
