"""The header and table of contents of a pg_dump custom-format archive (`-Fc`), read from the start of a stream.

`pg_restore --list` prints the entries but not their dependencies, which the restore (restore.restore_into)
needs to start an index build as soon as its table is loaded, and it needs a file. This reader takes the
entries, their dependencies and the exact header+TOC bytes (`prefix`) from the first bytes of the decompressed
stream and hands the rest of the stream on (`rest()`) untouched. pg_restore accepts `prefix` alone as an
archive for every entry without data (pre-data, indexes, constraints, ...: definitions live in the TOC).

Archive versions 1.14 to 1.16 (pg_dump 12 to 17) with uncompressed data blocks (`-Z0`, what our backups write)
are read; anything else raises `UnsupportedArchive` and the caller uses pg_restore on the whole file. Layout
(pg_backup_archiver.c ReadHead/ReadToc, pg_backup_custom.c): integers are a sign byte and `intSize`
little-endian bytes; strings are an integer length (-1 = NULL) and the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
MIN_VERSION = (1, 14, 0)  # tableam in the TOC (pg_dump 12)
MAX_VERSION = (1, 16, 255)  # relkind in the TOC, BLOB METADATA (pg_dump 17)
SECTION_NONE, SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA = 1, 2, 3, 4


class ArchiveError(RuntimeError):
    """The stream is not a well-formed archive (truncated, corrupted)."""


class UnsupportedArchive(ArchiveError):
    """A well-formed archive this reader does not handle (version, compression, block type)."""


@dataclass(frozen=True)
class TocEntry:
    dump_id: int
    had_dumper: bool
    tag: str
    desc: str
    section: int
    defn: str
    copy_stmt: str
    namespace: str
    tablespace: str
    deps: tuple[int, ...]

    def list_line(self) -> str:
        """A line for `pg_restore --use-list` (only the dump id before ';' matters to pg_restore)."""
        return f"{self.dump_id}; {self.desc} {self.namespace or '-'} {self.tag}"


class ArchiveReader:
    """Pulls bytes from an iterator of chunks: `read_toc()`, then `rest()` for the data that follows. `prefix` holds
    every byte up to the end of the TOC."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._pos = 0
        self._prefix: list[bytes] | None = []
        self.prefix = b""
        self.version = (0, 0, 0)
        self.int_size = 4
        self.entries: list[TocEntry] = []

    # -- bytes ------------------------------------------------------------------------------------
    def _fill(self, n: int) -> bool:
        """Make at least n unread bytes available; False at the end of the stream."""
        while len(self._buf) - self._pos < n:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return False
            rest = self._buf[self._pos:]
            if self._prefix is not None:
                self._prefix.append(self._buf[: self._pos])
            self._buf, self._pos = rest + chunk, 0
        return True

    def _read(self, n: int) -> bytes:
        if not self._fill(n):
            raise ArchiveError(f"archive ends early (wanted {n} more bytes)")
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def _byte(self) -> int:
        return self._read(1)[0]

    def _int(self) -> int:
        raw = self._read(1 + self.int_size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def _str(self) -> str | None:
        n = self._int()
        if n < 0:
            return None
        return self._read(n).decode("utf-8", errors="surrogateescape")

    # -- header and TOC ---------------------------------------------------------------------------
    def read_toc(self) -> list[TocEntry]:
        if self._read(5) != MAGIC:
            raise UnsupportedArchive("not a pg_dump custom-format archive (no PGDMP header)")
        vmaj, vmin = self._byte(), self._byte()
        vrev = self._byte() if (vmaj, vmin) > (1, 0) else 0
        self.version = (vmaj, vmin, vrev)
        if not MIN_VERSION <= self.version <= MAX_VERSION:
            raise UnsupportedArchive(f"archive version {vmaj}.{vmin}.{vrev} (this reader: 1.14 to 1.16)")
        self.int_size = self._byte()
        off_size = self._byte()
        if self._byte() != FORMAT_CUSTOM:
            raise UnsupportedArchive("not the custom format")
        if self.version >= (1, 15, 0):
            compressed = self._byte() != 0  # compression algorithm: 0 = none
        else:
            compressed = self._int() != 0  # compression level
        if compressed:
            raise UnsupportedArchive("data blocks are compressed inside the archive (not -Z0)")
        for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
            self._int()
        self._str()  # database name
        self._str()  # server version
        self._str()  # pg_dump version
        entries = []
        for _ in range(self._int()):
            dump_id = self._int()
            had_dumper = bool(self._int())
            self._str()  # tableoid
            self._str()  # oid
            tag = self._str() or ""
            desc = self._str() or ""
            section = self._int()
            defn = self._str() or ""
            self._str()  # drop statement
            copy_stmt = self._str() or ""
            namespace = self._str() or ""
            tablespace = self._str() or ""
            self._str()  # table access method
            if self.version >= (1, 16, 0):
                self._int()  # relkind
            self._str()  # owner
            if self._str() == "true":
                raise UnsupportedArchive(f"entry {dump_id} is a table WITH OIDS")
            deps = []
            while (dep := self._str()) is not None:
                deps.append(int(dep))
            self._read(1 + off_size)  # data offset flag and offset (custom format's extra TOC data)
            entries.append(TocEntry(dump_id, had_dumper, tag, desc, section, defn, copy_stmt, namespace, tablespace,
                                    tuple(deps)))
        assert self._prefix is not None
        self.prefix = b"".join(self._prefix) + self._buf[: self._pos]
        self._prefix = None
        self.entries = entries
        return entries

    def replay(self) -> Iterator[bytes]:
        """Every byte of the stream from its start, for a caller that gives up reading it here."""
        if self._prefix is not None:  # the TOC was not read to its end
            yield from self._prefix
            yield self._buf
        else:
            yield self.prefix
            yield self._buf[self._pos:]
        self._buf, self._pos = b"", 0
        yield from self._chunks

    def rest(self) -> Iterator[bytes]:
        """The stream from where the TOC ended: what is buffered, then the chunks not read yet."""
        if self._pos < len(self._buf):
            yield self._buf[self._pos:]
        self._buf, self._pos = b"", 0
        yield from self._chunks
