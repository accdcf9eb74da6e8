"""Table rows on their way from the archive to their loaders: pg_restore's COPY text is cut into one spool per
table (`split`), held in memory while the restore's budget allows, in a temp file after that."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator

from ops_pipeline.backup import common
from ops_pipeline.backup.common import BackupError
from ops_pipeline.backup.pg_archive import TocEntry, UnsupportedArchive
from ops_pipeline.platform.redaction import Redactor

_COPY_END = b"\n\\.\n"
_COPY_TABLE = re.compile(r'^COPY ((?:"(?:[^"]|"")*"|[^".\s]+)\.(?:"(?:[^"]|"")*"|[^".\s]+)) ')


def copy_table(entry: TocEntry) -> str:
    """The table a TABLE DATA entry's COPY statement loads, as pg_dump quotes it (the manifest's row-count key)."""
    match = _COPY_TABLE.match(entry.copy_stmt)
    if not match:
        raise UnsupportedArchive(f"unexpected COPY statement in entry {entry.dump_id}: {entry.copy_stmt[:200]}")
    return match.group(1)

class Budget:
    """Bytes of table rows the restore may hold in memory, shared by all its spools."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self.lock:
            if self.left < n:
                return False
            self.left -= n
            return True

    def give(self, n: int) -> None:
        with self.lock:
            self.left += n


class Spool:
    """One table's COPY rows as they arrive, for a loader that may run behind the splitter: in memory while the
    restore's budget allows, in a file after that (once spilled, the rest of the table follows in the file)."""

    def __init__(self, path: str, budget: Budget) -> None:
        self.path, self.budget = path, budget
        self.blocks: collections.deque[bytes] = collections.deque()
        self.spilled = False
        self.file_size = 0
        self.started = False
        self.done = False
        self.cond = threading.Condition()
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        if not self.spilled and self.budget.take(len(data)):
            with self.cond:
                self.blocks.append(data)
                self.started = True
                self.cond.notify_all()
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        view = memoryview(data)
        while view:  # a short write (disk nearly full) is continued; a full disk raises OSError
            view = view[os.write(self._fd, view):]
        with self.cond:
            self.spilled = self.started = True
            self.file_size += len(data)
            self.cond.notify_all()

    def finish(self) -> None:
        self.close()
        with self.cond:
            self.started = self.done = True
            self.cond.notify_all()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def chunks(self, failed: threading.Event) -> Iterator[bytes]:
        """The rows in order, as they come; raises BackupError("stopped: ...") once `failed` is set."""
        f, pos = None, 0
        try:
            while True:
                with self.cond:
                    while not (self.blocks or pos < self.file_size or self.done or failed.is_set()):
                        self.cond.wait(0.5)
                    if failed.is_set():
                        raise BackupError("stopped: another part of the restore failed")
                    block = self.blocks.popleft() if self.blocks else None
                    size, done = self.file_size, self.done
                if block is not None:
                    self.budget.give(len(block))
                    yield block
                elif pos < size:
                    if f is None:
                        f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed below
                    while pos < size:
                        data = f.read(min(common.CHUNK, size - pos))
                        if not data:
                            raise BackupError(f"restore temp file {self.path} ends at {pos} of {size} bytes")
                        pos += len(data)
                        yield data
                elif done:
                    return
        finally:
            if f is not None:
                f.close()
                os.unlink(self.path)



def split(proc: subprocess.Popen, data: list[TocEntry], spools: list[Spool], err: list[str], err_thread: threading.Thread,
          redact: Redactor, fail: Callable[[BaseException], None]) -> None:
    """Cut pg_restore's plain-text output (settings, then per table `COPY ... FROM stdin;`, rows, the end
    marker) into the spools of the `data` entries, in order; failures go to `fail`."""
    out = proc.stdout
    assert out is not None
    buf, eof, i, spool, at_start = b"", False, 0, None, False

    def failure(what: str) -> BackupError:
        rc = proc.wait()
        err_thread.join(5)
        return BackupError(f"pg_restore reading the archive's data failed ({what}; exit {rc}): "
                           f"{redact(' | '.join(err[-5:]))}")

    try:
        while True:
            if spool is None:  # between tables: look for the next COPY line
                nl = buf.find(b"\n")
                if nl < 0:
                    if eof:
                        break
                    block = out.read(common.CHUNK)
                    eof, buf = not block, buf + block
                    continue
                line, buf = buf[:nl], buf[nl + 1:]
                if line.startswith(b"COPY ") and line.endswith(b" FROM stdin;"):
                    if i >= len(spools) or line.decode() != data[i].copy_stmt.strip():
                        raise BackupError(f"unexpected COPY statement from pg_restore: {line[:200]!r}")
                    spool, at_start, i = spools[i], True, i + 1
                continue
            # in a table's rows: the end marker is a line of its own (no newline before it at the very start)
            if at_start and len(buf) < 3 and not eof:
                block = out.read(common.CHUNK)
                eof, buf = not block, buf + block
                continue
            if at_start and buf.startswith(b"\\.\n"):
                spool.finish()
                buf, spool = buf[3:], None
                continue
            end = buf.find(_COPY_END)
            if end >= 0:
                spool.write(buf[: end + 1])
                spool.finish()
                buf, spool = buf[end + len(_COPY_END):], None
                continue
            if eof:
                raise failure(f"the rows of {copy_table(data[i - 1])} end without the end marker")
            cut = len(buf) - (len(_COPY_END) - 1)
            if cut > 0:
                spool.write(buf[:cut])
                buf, at_start = buf[cut:], False
            block = out.read(common.CHUNK)
            eof, buf = not block, buf + block
        if proc.wait() != 0 or i != len(spools):
            raise failure(f"{i} of {len(spools)} tables")
    except OSError as exc:
        fail(BackupError(f"writing the restore's temp files failed: {exc}"))
        proc.kill()
        proc.wait()
    except BaseException as exc:
        fail(exc)
        proc.kill()
        proc.wait()
