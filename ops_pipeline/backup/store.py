"""Where backups are kept: a local directory (embedded default) or S3 (dagster-aws `S3Resource`).

Layout, the same in both: `<prefix>/<database>/<backup id>/dump.pgc.zst` then, written LAST,
`<prefix>/<database>/<backup id>/manifest.json`. A backup exists only once its manifest does. Writers
never leave anything partial behind: a local write goes to a temporary name and is renamed into place;
an S3 write is a multipart upload that is aborted on any error. Deletion removes the manifest first.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
import zstandard
from pydantic import Field

from ops_pipeline.platform import paths

DUMP_NAME = "dump.pgc.zst"
MANIFEST_NAME = "manifest.json"


class StoreError(RuntimeError):
    pass


# zstd parameters tuned on pg_dump custom-format data: level 3's window and tables, lazy matching with a search
# depth of 2 and a minimum match of 6 (table rows repeat in 6+ byte runs; shorter matches cost time, not size).
# On bench/backup.py's 1 GB database (666 MB -Fc -Z0 dump, 2 threads): 166.7 MB in 5.7 CPU s, where zstd-6 gives
# 168.4 MB in 7.5 CPU s, zstd-3 182.4 MB in 3.1 CPU s and the seed's gzip-6 168.4 MB in 20 CPU s.
DUMP_TUNED = {"strategy": zstandard.STRATEGY_LAZY, "search_log": 2, "min_match": 6}
COMPRESSION_CHOICES = "'zstd-dump' (tuned for dumps) or 'zstd-1' ... 'zstd-19' (zstd's standard levels)"


def zstd_parameters(compression: str, threads: int) -> zstandard.ZstdCompressionParameters:
    """The zstd parameters a compression name stands for (StoreError naming the field when it is unknown)."""
    if threads < 0:
        raise StoreError(f"backup store: zstd_threads must be >= 0 (got {threads})")
    if compression == "zstd-dump":
        return zstandard.ZstdCompressionParameters.from_level(3, threads=threads, **DUMP_TUNED)
    level = compression.removeprefix("zstd-")
    if not (compression.startswith("zstd-") and level.isdigit() and 1 <= int(level) <= 19):
        raise StoreError(f"backup store: compression must be {COMPRESSION_CHOICES} (got {compression!r})")
    return zstandard.ZstdCompressionParameters.from_level(int(level), threads=threads)


@dataclass
class StoredObject:
    key: str
    size: int
    modified: float


class _LocalWriter:
    def __init__(self, final: Path) -> None:
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.partial"
        self.f = open(self.tmp, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.size += len(data)

    def commit(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        return self.size

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)
            # Remove the backup folder if we left it empty.
            try:
                self.final.parent.rmdir()
            except OSError:
                pass


class _S3Writer:
    def __init__(self, client, bucket: str, key: str, part_size: int, sse: dict | None = None) -> None:
        self.client, self.bucket, self.key, self.part_size = client, bucket, key, part_size
        self.buf = bytearray()
        self.parts: list[dict] = []
        self.size = 0
        self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **(sse or {}))["UploadId"]

    def _flush_part(self) -> None:
        n = len(self.parts) + 1
        data = bytes(self.buf)
        md5 = __import__("base64").b64encode(hashlib.md5(data).digest()).decode()
        resp = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n, Body=data,
                                       ContentMD5=md5)
        self.parts.append({"ETag": resp["ETag"], "PartNumber": n})
        self.buf.clear()

    def write(self, data: bytes) -> None:
        self.buf += data
        self.size += len(data)
        if len(self.buf) >= self.part_size:
            self._flush_part()

    def commit(self) -> int:
        if self.buf or not self.parts:
            self._flush_part()
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.parts})
        return self.size

    def abort(self) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception:
            pass


class BackupStore(dg.ConfigurableResource):
    """Backup storage: a local directory, or an S3 bucket (any S3-compatible store via endpoint_url)."""

    kind: Literal["local", "s3"] = Field("local", description="local | s3")
    local_dir: str = Field("", description="Local backup folder (default: <state>/backups).")
    bucket: str = Field("", description="S3 bucket (kind: s3).")
    prefix: str = Field("backups", description="Key prefix inside the store.")
    part_size_mb: int = Field(16, description="S3 multipart part size in MiB (min 5).")
    compression: str = Field("zstd-dump", description="Compression of new backups: 'zstd-dump' (default; zstd tuned for "
                             "pg_dump data; figures in bench/README.md) "
                             "or 'zstd-N', zstd's standard level N (1-19; zstd-3: fastest, ~9% larger).")
    zstd_threads: int = Field(2, description="zstd worker threads (0: compress in the streaming thread).")
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint (empty: AWS).")
    s3_region: str = Field("us-east-1", description="S3 region.")
    aws_access_key_id: str = Field("", description="Access key id (set with EnvVar; empty: the default credential chain).")
    aws_secret_access_key: str = Field("", description="Secret access key (set with EnvVar).")
    s3_max_attempts: int = Field(3, description="boto3 attempts per request before the op's RetryPolicy takes over.")
    s3_sse: Literal["", "AES256", "aws:kms"] = Field("", description="S3 server-side encryption asked on every put: "
                                                     "AES256 (SSE-S3) or aws:kms (SSE-KMS); empty: the bucket's default.")
    s3_sse_kms_key_id: str = Field("", description="KMS key id or ARN for s3_sse aws:kms (empty: the account's "
                                   "default aws/s3 key).")
    cipher_key_from: str = Field("", description="Key encrypting new dumps at rest (AES-256-GCM): env:NAME or "
                                 "file:/path holding a random secret of 32+ characters, never stored with the backups; "
                                 "empty: dumps are stored unencrypted.")
    previous_keys_from: builtins.list[str] = Field([], description="Earlier keys (env:NAME / file:/path), still accepted for "
                                          "reading the backups they encrypted after a key rotation.")

    def s3_resource(self):
        """dagster-aws's S3Resource for this store (imported on first use: boto3 costs ~0.6 s to import)."""
        from dagster_aws.s3 import S3Resource

        return S3Resource(endpoint_url=self.s3_endpoint_url or None, region_name=self.s3_region,
                          aws_access_key_id=self.aws_access_key_id or None,
                          aws_secret_access_key=self.aws_secret_access_key or None, max_attempts=self.s3_max_attempts)

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.local_dir) if self.local_dir else paths.default_backup_dir()

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def _client(self):
        return self.s3_resource().get_client()

    def validate(self) -> None:
        if self.kind == "s3" and not self.bucket:
            raise StoreError("backup store: bucket is required when kind is 's3'")
        zstd_parameters(self.compression, self.zstd_threads)
        if self.s3_sse_kms_key_id and self.s3_sse != "aws:kms":
            raise StoreError("backup store: s3_sse_kms_key_id is only used with s3_sse 'aws:kms'")
        if self.part_size_mb < 5:
            raise StoreError(f"backup store: part_size_mb must be >= 5 (got {self.part_size_mb})")

    def sse_args(self) -> dict:
        """The server-side encryption arguments of every put (empty: none asked)."""
        if not self.s3_sse:
            return {}
        return {"ServerSideEncryption": self.s3_sse,
                **({"SSEKMSKeyId": self.s3_sse_kms_key_id} if self.s3_sse_kms_key_id else {})}

    def keyring(self, environ: dict | None = None):
        """The encryption keys, resolved from their references now (StoreError naming the reference, never the
        value, when one is missing or too short)."""
        from ops_pipeline.backup.crypt import Key, KeyProblem, Keyring
        from ops_pipeline.platform.app_env import resolve_reference

        env = dict(os.environ if environ is None else environ)

        def load(ref: str, field: str) -> Key:
            if not ref.startswith(("env:", "file:/")):
                raise StoreError(f"backup store: {field} must be env:NAME or file:/absolute/path (got {ref!r})")
            value, source = resolve_reference(ref, env)
            if value is None:
                raise StoreError(f"backup store: {field}: no key in {source}")
            try:
                return Key.from_secret(value, source)
            except KeyProblem as exc:
                raise StoreError(f"backup store: {field}: {exc}") from None

        current = load(self.cipher_key_from, "cipher_key_from") if self.cipher_key_from else None
        return Keyring(current, tuple(load(r, f"previous_keys_from[{i}]") for i, r in enumerate(self.previous_keys_from)))

    def compressor(self) -> zstandard.ZstdCompressor:
        return zstandard.ZstdCompressor(compression_params=zstd_parameters(self.compression, self.zstd_threads))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.kind == "s3" else str(self.root / self.prefix)

    # ---- objects ------------------------------------------------------------------------------
    def writer(self, *parts: str):
        self.validate()
        key = self._key(*parts)
        if self.kind == "local":
            return _LocalWriter(self.root / key)
        return _S3Writer(self._client(), self.bucket, key, self.part_size_mb * 1024 * 1024, self.sse_args())

    def read(self, *parts: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        key = self._key(*parts)
        if self.kind == "local":
            try:
                f = open(self.root / key, "rb")
            except FileNotFoundError:
                raise StoreError(f"{key} not found in {self.describe()}") from None
            with f:
                while data := f.read(chunk):
                    yield data
            return
        try:
            body = self._client().get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:
            raise StoreError(f"cannot read s3://{self.bucket}/{key}: {exc}") from None
        yield from body.iter_chunks(chunk)

    def put_json(self, obj: dict, *parts: str) -> None:
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        w = self.writer(*parts)
        if self.kind == "local":
            try:
                w.write(data)
                w.commit()
            except BaseException:
                w.abort()
                raise
        else:
            w.abort()  # small object: a plain PUT is atomic
            self._client().put_object(Bucket=self.bucket, Key=self._key(*parts), Body=data, ContentType="application/json",
                                      **self.sse_args())

    def get_json(self, *parts: str) -> dict:
        return json.loads(b"".join(self.read(*parts)))

    def list(self, *parts: str) -> list[StoredObject]:
        prefix = self._key(*parts)
        if self.kind == "local":
            base = self.root / prefix
            if not base.exists():
                return []
            out = []
            for p in base.rglob("*"):
                if p.is_file():
                    st = p.stat()
                    out.append(StoredObject(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
            return out
        client = self._client()
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                out.append(StoredObject(o["Key"], o["Size"], o["LastModified"].timestamp()))
        return out

    def delete_backup(self, database: str, backup_id: str) -> None:
        """Manifest first: a half-deleted backup must never look complete."""
        manifest = self._key(database, backup_id, MANIFEST_NAME)
        others = [o.key for o in self.list(database, backup_id) if o.key != manifest]
        if self.kind == "local":
            (self.root / manifest).unlink(missing_ok=True)
            shutil.rmtree(self.root / self._key(database, backup_id), ignore_errors=True)
            return
        client = self._client()
        client.delete_object(Bucket=self.bucket, Key=manifest)
        for key in others:
            client.delete_object(Bucket=self.bucket, Key=key)

    def abort_stale_uploads(self, older_than_s: float = 86400) -> int:
        """S3 only: abort multipart uploads left by crashed writers (they hold storage, not backups)."""
        if self.kind != "s3":
            return 0
        client = self._client()
        n = 0
        resp = client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + "/")
        for up in resp.get("Uploads", []):
            if time.time() - up["Initiated"].timestamp() > older_than_s:
                client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
        return n

    def manifests(self, database: str) -> list[dict]:
        """Every complete backup of `database` (one with a manifest), newest first."""
        out = []
        for o in self.list(database):
            if o.key.endswith("/" + MANIFEST_NAME):
                try:
                    m = json.loads(b"".join(self.read(o.key[len(self.prefix) + 1:] if self.prefix else o.key)))
                except (StoreError, ValueError):
                    continue
                out.append(m)
        return sorted(out, key=lambda m: m.get("finished_at", 0), reverse=True)

    def incomplete(self, database: str) -> list[tuple[str, float]]:
        """Backup folders without a manifest (crashed writers): (backup id, newest modification)."""
        by_id: dict[str, list[StoredObject]] = {}
        base = self._key(database)
        for o in self.list(database):
            rest = o.key[len(base) + 1:]
            bid = rest.split("/", 1)[0]
            by_id.setdefault(bid, []).append(o)
        return [(bid, max(o.modified for o in objs)) for bid, objs in by_id.items()
                if not any(o.key.endswith("/" + MANIFEST_NAME) for o in objs)]

    def location(self, database: str, backup_id: str, name: str = DUMP_NAME) -> str:
        key = self._key(database, backup_id, name)
        if self.kind == "local":
            return (self.root / key).as_uri()
        endpoint = self.s3_endpoint_url.rstrip("/")
        if endpoint:
            return f"{endpoint}/{self.bucket}/{key}"
        region = self.s3_region or "us-east-1"
        return f"https://{self.bucket}.s3.{region}.amazonaws.com/{key}"
