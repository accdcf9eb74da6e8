"""The custom-format TOC reader against archives written by the real pg_dump."""

import subprocess

import pytest

from ops_pipeline.backup.pg_archive import (
    SECTION_DATA,
    SECTION_POST_DATA,
    ArchiveError,
    ArchiveReader,
    UnsupportedArchive,
)
from ops_pipeline.platform.postgres import PostgresResource

PG = PostgresResource()


def _dump(url: str, *args: str) -> bytes:
    return subprocess.run([PG.binary("pg_dump"), "-Fc", *args], env=PG.tool_env(url), capture_output=True,
                          check=True).stdout


def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_toc_matches_pg_restore_list_and_prefix_is_an_archive_of_its_own(scratch_db, tmp_path):
    data = _dump(scratch_db, "-Z0")
    reader = ArchiveReader(_chunks(data, 7))  # reads that cut every field
    entries = reader.read_toc()
    listed = subprocess.run([PG.binary("pg_restore"), "--list"], input=data, capture_output=True, check=True).stdout
    ids = [int(line.split(b";")[0]) for line in listed.splitlines() if line and not line.startswith(b";")]
    assert sorted(ids) == sorted(e.dump_id for e in entries if e.desc not in ("ENCODING", "STDSTRINGS", "SEARCHPATH", "DATABASE"))
    by_tag = {(e.desc, e.tag): e for e in entries}
    orders_data = by_tag[("TABLE DATA", "orders")]
    assert orders_data.section == SECTION_DATA and orders_data.copy_stmt.startswith("COPY public.orders (id, ")
    fk = next(e for e in entries if e.desc == "FK CONSTRAINT")
    assert fk.section == SECTION_POST_DATA and by_tag[("TABLE", "customers")].dump_id in fk.deps
    assert data.startswith(reader.prefix) and b"".join(reader.rest()) == data[len(reader.prefix):]
    toc = tmp_path / "toc.pgc"
    toc.write_bytes(reader.prefix)  # header + TOC alone: pg_restore lists and prints post-data from it
    post = subprocess.run([PG.binary("pg_restore"), "--section=post-data", "--file=-", str(toc)], capture_output=True,
                          text=True, check=True).stdout
    assert "ADD CONSTRAINT orders_pkey PRIMARY KEY (id)" in post and "CREATE INDEX orders_customer_idx" in post


def test_compressed_archive_is_refused_and_replayed_byte_for_byte(scratch_db):
    data = _dump(scratch_db, "-Z6")
    reader = ArchiveReader(_chunks(data, 3))
    with pytest.raises(UnsupportedArchive, match="compressed"):
        reader.read_toc()
    assert b"".join(reader.replay()) == data


def test_truncated_toc_and_foreign_bytes_are_errors(scratch_db):
    data = _dump(scratch_db, "-Z0")
    with pytest.raises(ArchiveError, match="ends early"):
        ArchiveReader(_chunks(data[:300])).read_toc()
    with pytest.raises(UnsupportedArchive, match="PGDMP"):
        ArchiveReader(_chunks(b"-- plain SQL dump\n" + data)).read_toc()
