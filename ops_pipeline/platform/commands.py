"""Running external commands: built as data, run in one place, output streamed into the run log.

Every command whose output is a log (npm, yarn, pnpm, git, pm2, the app's test and migrate commands, ...) goes
through `run()`: its output is streamed line by line to a log function while it runs, secrets are masked on the way,
a deadline is enforced, and the result keeps the output for parsing and the last lines for error messages.

Two kinds of process are started elsewhere, each in the one module that owns it: data pipelines whose stdout is the
data (pg_dump -> zstd -> store, store -> pg_restore: backup/dump.py, verify.py, streamed.py, database.py, spool.py)
and long-lived servers (nginx: targets/nginx.py, the host relay: targets/relay.py, PostgreSQL and Redis:
platform/local_stack.py).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ops_pipeline.platform.redaction import Redactor

LogFn = Callable[[str], None]


class CommandError(RuntimeError):
    """A command failed (non-zero exit, timeout or could not start). Its message is already redacted."""

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Command:
    """One external command. `argv` is a list (no shell) or a string run by /bin/sh -c."""

    argv: Sequence[str] | str
    cwd: str | None = None
    env: Mapping[str, str] | None = None  # added to (and overriding) the inherited environment
    timeout_s: float | None = None
    label: str = ""
    unset: tuple[str, ...] = ()  # inherited variables removed from the child's environment

    @property
    def display(self) -> str:
        if isinstance(self.argv, str):
            return self.argv
        return shlex.join(self.argv)


@dataclass
class CommandResult:
    command: Command
    returncode: int
    duration_s: float
    output: str  # stdout+stderr interleaved, redacted
    timed_out: bool = False
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _child_env(extra: Mapping[str, str] | None, unset: Sequence[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in unset}
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def run(
    command: Command,
    *,
    log: LogFn | None = None,
    redactor: Redactor | None = None,
    check: bool = True,
    tail_lines: int = 40,
    batch_s: float = 1.0,
    batch_lines: int = 50,
) -> CommandResult:
    """Run `command`, streaming each output line (redacted) to `log`. Raises CommandError if `check`."""
    redact = redactor or Redactor()
    shell = isinstance(command.argv, str)
    started = time.monotonic()
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=tail_lines)
    try:
        proc = subprocess.Popen(
            command.argv if not shell else ["/bin/sh", "-c", command.argv],
            cwd=command.cwd,
            env=_child_env(command.env, command.unset),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # so a timeout can kill the whole process group
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        raise CommandError(redact(f"could not start `{command.display}`: {exc}")) from None

    timed_out = threading.Event()
    pending: list[str] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if log and pending:
            log("\n".join(pending))
        pending.clear()
        last_flush = time.monotonic()

    def _kill_on_deadline() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(command.timeout_s, _kill_on_deadline) if command.timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = redact(raw.rstrip("\n"))
            lines.append(line)
            tail.append(line)
            if line.strip():
                pending.append(line)
            # Batched: one run-log event per second (or 50 lines), not one per line.
            if len(pending) >= batch_lines or time.monotonic() - last_flush >= batch_s:
                flush()
        returncode = proc.wait()
        flush()
    finally:
        if timer:
            timer.cancel()
    result = CommandResult(
        command=command,
        returncode=returncode,
        duration_s=time.monotonic() - started,
        output="\n".join(lines),
        timed_out=timed_out.is_set(),
        tail=list(tail),
    )
    if check and not result.ok:
        what = command.label or redact(command.display)
        if result.timed_out:
            reason = f"timed out after {command.timeout_s:.0f} s"
        else:
            reason = f"exited with status {returncode}"
        last = "\n".join(result.tail[-15:])
        raise CommandError(f"`{what}` {reason}" + (f"; last output:\n{last}" if last else ""), result)
    return result


def which(name: str, extra_dirs: Sequence[str | Path] = ()) -> str | None:
    """Find an executable in `extra_dirs` first, then on PATH."""
    for d in extra_dirs:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    from shutil import which as _which

    return _which(name)
