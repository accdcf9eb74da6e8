"""What every part of the backups package shares: its error, the log callback, the pipe read size, a stderr
collector for the PostgreSQL tools it runs, and where an environment's backups live in the store."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

LogFn = Callable[[str], None]
CHUNK = 1 << 20  # bytes read from a pipe or temp file at a time (tests and bench/backup.py change it: common.CHUNK)


class BackupError(RuntimeError):
    pass


def store_scope(environment: str, database: str) -> str:
    """Backups of each environment's database live apart: retention never crosses environments."""
    return f"{environment}/{database}"


def stderr_reader(proc: subprocess.Popen, sink: list[str]) -> threading.Thread:
    def run() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sink.append(line.decode(errors="replace").rstrip())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
