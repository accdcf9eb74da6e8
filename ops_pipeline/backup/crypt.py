"""Encryption at rest of stored dumps: AES-256-GCM (the maintained `cryptography` package) in framed chunks, between
zstd and the store.

Stored layout: a header `MAGIC | key id (16 bytes) | nonce prefix (4 random bytes)`, then frames
`length (4 bytes, big-endian) | final flag (1 byte) | ciphertext+tag`. Frame n's nonce is the prefix and n (8 bytes);
its associated data is the header, n and the final flag, so a reordered, altered, dropped or truncated frame (or a
stream cut at a frame boundary: no final frame) fails authentication. The key id is a fingerprint of the key, never
the key: a wrong key is named before anything is decrypted.

Keys come from secrets (`env:NAME` / `file:/path`, resolved like the archive's `cipher_key_from`); the bytes of the
secret are stretched by HKDF-SHA256 into the AES key, so the secret must itself be random (at least 32 characters)."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ops_pipeline.backup.common import BackupError

MAGIC = b"OPSGCM1\n"
CIPHER = "aes-256-gcm"
FRAME = 1 << 20  # plaintext bytes per frame
MIN_SECRET = 32
_HEADER = len(MAGIC) + 16 + 4
_TAG = 16


class KeyProblem(BackupError):
    """A missing, short or wrong key."""


@dataclass(frozen=True)
class Key:
    key: bytes = b""
    id: str = ""  # hex fingerprint, safe to log and to store

    def __repr__(self) -> str:  # never the key
        return f"Key(id={self.id})"

    @classmethod
    def from_secret(cls, secret: str, source: str) -> Key:
        raw = secret.encode()
        if len(raw) < MIN_SECRET:
            raise KeyProblem(f"backup encryption key from {source} is {len(raw)} bytes; give a random secret of at "
                            f"least {MIN_SECRET} characters (e.g. `openssl rand -base64 48`)")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ops-pipeline dump key").derive(raw)
        fid = hashlib.sha256(b"ops-pipeline key id\0" + key).digest()[:16]
        return cls(key, fid.hex())


@dataclass(frozen=True)
class Keyring:
    """The key new backups are encrypted with (None: unencrypted) and the previous ones, still accepted for reading."""

    current: Key | None = None
    previous: tuple[Key, ...] = ()

    def find(self, key_id: str, backup_id: str) -> Key:
        for k in (self.current, *self.previous):
            if k is not None and k.id == key_id:
                return k
        configured = self.current.id if self.current else "none"
        prev = f" (previous keys: {', '.join(k.id for k in self.previous)})" if self.previous else ""
        raise KeyProblem(f"backup {backup_id} was encrypted with key {key_id}; the configured key is {configured}{prev}. "
                        "Configure that key as the store's cipher_key_from or in previous_keys_from.")

    def check_manifest(self, manifest: dict) -> None:
        """Before any byte is read: the key the manifest names is configured."""
        enc = manifest.get("encryption")
        if enc:
            self.find(enc["key_id"], manifest["id"])


def encrypt(chunks: Iterable[bytes], key: Key) -> Iterator[bytes]:
    """The framed ciphertext of `chunks` (header first)."""
    enc = Encryptor(key)
    yield enc.header
    for c in chunks:
        yield from enc.update(c)
    yield enc.finish()


class Encryptor:
    def __init__(self, key: Key) -> None:
        self.aead = AESGCM(key.key)
        self.header = MAGIC + bytes.fromhex(key.id) + os.urandom(4)
        self.n = 0
        self.buf = bytearray()

    def _frame(self, data: bytes, final: bool) -> bytes:
        flag = b"\x01" if final else b"\x00"
        ctr = struct.pack(">Q", self.n)
        ct = self.aead.encrypt(self.header[-4:] + ctr, data, self.header + ctr + flag)
        self.n += 1
        return struct.pack(">I", len(ct)) + flag + ct

    def update(self, data: bytes) -> Iterator[bytes]:
        self.buf += data
        while len(self.buf) > FRAME:  # keep at least one byte back: the last frame is written by finish()
            yield self._frame(bytes(self.buf[:FRAME]), False)
            del self.buf[:FRAME]

    def finish(self) -> bytes:
        out = self._frame(bytes(self.buf), True)
        self.buf.clear()
        return out


def is_encrypted(first: bytes) -> bool:
    return first.startswith(MAGIC)


def decrypt(chunks: Iterable[bytes], keys: Keyring, backup_id: str) -> Iterator[bytes]:
    """The plaintext of a framed stream. BackupError naming the backup on a wrong key, altered or truncated frame."""
    buf = bytearray()
    it = iter(chunks)
    aead = header = None
    n = 0
    final = False
    for chunk in it:
        buf += chunk
        if header is None:
            if len(buf) < _HEADER:
                continue
            header = bytes(buf[:_HEADER])
            del buf[:_HEADER]
            aead = AESGCM(keys.find(header[len(MAGIC):len(MAGIC) + 16].hex(), backup_id).key)
        while len(buf) >= 5:
            (size,) = struct.unpack(">I", buf[:4])
            if size < _TAG or size > FRAME + _TAG:
                raise BackupError(f"backup {backup_id} is corrupted: encrypted frame {n} has an impossible length {size}")
            if len(buf) < 5 + size:
                break
            if final:
                raise BackupError(f"backup {backup_id} is corrupted: data after the final encrypted frame")
            flag = bytes(buf[4:5])
            ctr = struct.pack(">Q", n)
            try:
                plain = aead.decrypt(header[-4:] + ctr, bytes(buf[5:5 + size]), header + ctr + flag)
            except InvalidTag:
                raise BackupError(f"backup {backup_id} is corrupted or altered: encrypted frame {n} fails "
                                  "authentication (AES-256-GCM)") from None
            del buf[:5 + size]
            n += 1
            final = flag == b"\x01"
            if plain:
                yield plain
    if header is None:
        raise BackupError(f"backup {backup_id} is truncated: incomplete encryption header")
    if buf:
        raise BackupError(f"backup {backup_id} is truncated: encrypted frame {n} is incomplete ({len(buf)} bytes)")
    if not final:
        raise BackupError(f"backup {backup_id} is truncated: the final encrypted frame is missing (after {n} frames)")
