"""Point-in-time restore: a pgBackRest restore into a NEW data folder, a server of its own on it, verified, and the
switch-over that makes it the live one.

A restore never touches the live server: the base backup and the WAL up to the target (the latest archived WAL, a
timestamp or a named restore point) go into a new folder beside the live one, which is started on a free port with
archiving off (a copy that may be discarded must never push WAL into the repository), and is only used once
recovery has promoted it. A target it cannot reach fails: a restore point or time past a missing WAL segment makes
PostgreSQL stop ("recovery ended before configured recovery target was reached"), and "latest" is checked against
the repository before the restore (every segment from the base backup to the newest archived one) and after it (the
newest archived segment was replayed), so a gap fails the restore naming the segment instead of ending short.

Switch-over (only when asked and confirmed by the caller): a restore point on the live server first (its WAL
archived), the restored copy's new timeline pushed into the repository, the live server stopped and its folder
renamed aside (kept), the restored folder renamed into its place, the server started with the options it ran with.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg

from ops_pipeline.backup import archiving
from ops_pipeline.backup.common import BackupError, LogFn
from ops_pipeline.backup.pgbackrest import PgBackRest, Server, segment_name, segment_number
from ops_pipeline.platform.commands import Command, CommandError, run
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.postgres import ConnInfo

TARGETS = ("latest", "time", "name")


@dataclass(frozen=True)
class Target:
    kind: str  # latest | time | name
    value: str = ""

    @classmethod
    def parse(cls, kind: str, value: str = "") -> Target:
        """Checked before anything is restored: a timestamp must carry its zone, a name must be a restore point's."""
        if kind not in TARGETS:
            raise BackupError(f"target: one of {', '.join(TARGETS)} (got {kind!r})")
        if kind == "latest":
            if value:
                raise BackupError("target_value: must be empty for target latest")
            return cls(kind)
        if kind == "time":
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                raise BackupError(f"target_value: {value!r} is not an ISO timestamp (e.g. 2026-12-04T22:10:00+00:00)") from None
            if when.tzinfo is None:
                raise BackupError(f"target_value: {value!r} has no time zone; write it with one (e.g. +00:00)")
            return cls(kind, when.isoformat(sep=" "))
        if not archiving.RESTORE_POINT.match(value or ""):
            raise BackupError(f"target_value: {value!r} is not a restore point name")
        return cls(kind, value)

    def describe(self) -> str:
        return "the latest archived WAL" if self.kind == "latest" else f"{self.kind} {self.value!r}"


def as_user(os_user: str) -> list[str]:
    owner = pwd.getpwnam(os_user)
    if os.geteuid() == owner.pw_uid:
        return []
    if os.geteuid() == 0:
        return ["runuser", "-u", os_user, "--"]
    raise BackupError(f"the server runs as {os_user}; this process cannot act as that user")


def postmaster_options(data_dir: str) -> tuple[str, list[str]]:
    """(bin folder, options) the server in `data_dir` was last started with (its postmaster.opts), without -D."""
    try:
        argv = shlex.split(Path(data_dir, "postmaster.opts").read_text())
    except OSError as exc:
        raise BackupError(f"cannot read how the server was started ({data_dir}/postmaster.opts): {exc}") from None
    options, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "-D":
            skip = True
        elif not arg.startswith("-D"):
            options.append(arg)
    return str(Path(argv[0]).parent), options


@dataclass
class RestoredServer:
    """A restored data folder and the server running on it (until `stop`)."""

    data_dir: str
    port: int
    socket_dir: str
    os_user: str
    bindir: str
    log_file: str
    admin_url: str  # the live admin URL's role and password, this server's port
    recovery: dict = field(default_factory=dict)
    log: LogFn = print

    def url(self, database: str) -> str:
        return ConnInfo.parse(self.admin_url).url(database)

    def pg_ctl(self, *args: str, timeout_s: float = 600) -> None:
        argv = [*as_user(self.os_user), f"{self.bindir}/pg_ctl", "-D", self.data_dir, "-l", self.log_file, "-w",
                "-t", str(int(timeout_s)), *args]
        try:
            run(Command(argv=argv, timeout_s=timeout_s + 30, label=f"pg_ctl {args[-1]} ({self.data_dir})"), log=self.log)
        except CommandError as exc:
            raise BackupError(f"{exc}\nserver log:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = Path(self.log_file).read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(line for line in text if "archive-get command" not in line)[-4000:] if lines else ""

    def running(self) -> bool:
        return Path(self.data_dir, "postmaster.pid").exists()

    def status(self) -> bool:
        """`pg_ctl status`: a postmaster runs on this data folder (a stale pid file of a killed one does not count)."""
        argv = [*as_user(self.os_user), f"{self.bindir}/pg_ctl", "-D", self.data_dir, "status"]
        return run(Command(argv=argv, timeout_s=30, label="pg_ctl status"), check=False).returncode == 0

    def stop(self) -> None:
        if self.running():
            self.pg_ctl("-m", "fast", "stop")

    def discard(self) -> None:
        """Stop the server and remove the restored folder (a verification copy nobody switched to)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        Path(self.log_file).unlink(missing_ok=True)


def _new_folder(path: str, os_user: str) -> None:
    owner = pwd.getpwnam(os_user)
    os.mkdir(path, 0o700)
    if os.geteuid() == 0:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def restore(tool: PgBackRest, live: Server, admin_url: str, target: Target, *, log: LogFn, timeout_s: float = 3600,
            point_lsn: str = "") -> RestoredServer:
    """Restore into a new folder beside the live data folder, start it and wait until recovery reached `target` and
    promoted it. Any failure removes what it created; the live server is never touched."""
    info = tool.info()
    if not info.get("backup"):
        raise BackupError(f"no base backup of stanza {tool.stanza} in the repository: nothing to restore from")
    backup_set = _backup_set(info, target, point_lsn)
    start = backup_set["archive"]["start"]
    gaps = archiving.wal_gaps(tool, start)
    if gaps and target.kind == "latest":
        raise BackupError(f"WAL missing from the repository after base backup {backup_set['label']}: "
                          f"{', '.join(gaps[:10])}{' …' if len(gaps) > 10 else ''}; a restore to the latest WAL would "
                          f"stop at {gaps[0]} and lose everything after it. Restore to a time before it instead")
    newest = archiving.newest_segment(tool)
    stamp = time.strftime("%Y%m%d%H%M%S")
    parent, base = os.path.split(live.data_dir.rstrip("/"))
    data_dir = os.path.join(parent, f"{base}_pitr_{stamp}")
    bindir, _ = postmaster_options(live.data_dir)
    owner = pwd.getpwnam(live.os_user)
    socket_dir = tempfile.mkdtemp(prefix="ops-pitr-")
    os.chmod(socket_dir, 0o700)
    if os.geteuid() == 0:
        os.chown(socket_dir, owner.pw_uid, owner.pw_gid)
    port = free_port()
    info_url = ConnInfo.parse(admin_url)
    url = f"postgresql://{info_url.user}:{info_url.password or ''}@127.0.0.1:{port}/{info_url.database or 'postgres'}"
    restored = RestoredServer(data_dir, port, socket_dir, live.os_user, bindir, f"{data_dir}.log", url, log=log)
    t0 = time.monotonic()
    try:
        _new_folder(data_dir, live.os_user)
        log(f"restoring backup {backup_set['label']} and WAL to {target.describe()} into {data_dir}")
        tool.restore(data_dir, target=target.kind, value=target.value, backup_set=backup_set["label"])
        fetched = time.monotonic() - t0
        Path(restored.log_file).touch()
        if os.geteuid() == 0:
            os.chown(restored.log_file, owner.pw_uid, owner.pw_gid)
        options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={socket_dir} "
                   "-c archive_mode=off -c hot_standby=on")
        restored.pg_ctl("-o", options, "start", timeout_s=timeout_s)
        _wait_promoted(restored, timeout_s, gaps)
        text = Path(restored.log_file).read_text(errors="replace")
        if target.kind == "latest" and newest and f'restored log file "{newest}"' not in text:
            replayed = re.findall(r'restored log file "([0-9A-F]{24})"', text)
            raise BackupError(f"recovery ended at {replayed[-1] if replayed else 'the base backup'} but the repository "
                              f"holds WAL up to {newest}: the restore would be short, refused")
        last_tx = re.findall(r"last completed transaction was at log time (.+)", text)
        restored.recovery = {"backup_set": backup_set["label"], "target": target.describe(), "newest_archived": newest,
                             "last_transaction": last_tx[-1].strip() if last_tx else "", "fetch_s": round(fetched, 3),
                             "restore_s": round(time.monotonic() - t0, 3), "missing_wal_after_target": gaps}
        log(f"recovered to {target.describe()} in {time.monotonic() - t0:.1f} s; last transaction replayed: "
            f"{restored.recovery['last_transaction'] or 'none after the base backup'}")
        return restored
    except BaseException:
        restored.discard()
        raise


def _backup_set(info: dict, target: Target, point_lsn: str) -> dict:
    """The base backup a restore starts from: the newest that ended before the target (a restore point's LSN when it
    is known, a time), else the newest."""
    backups = [b for b in info["backup"] if not b.get("error")]
    if not backups:
        raise BackupError("every base backup in the repository is marked in error")
    if target.kind == "time":
        when = datetime.fromisoformat(target.value).timestamp()
        before = [b for b in backups if b["timestamp"]["stop"] <= when]
        if not before:
            raise BackupError(f"no base backup ended before {target.value}: the oldest ended at "
                              f"{datetime.fromtimestamp(backups[0]['timestamp']['stop']).astimezone().isoformat()}")
        return before[-1]
    if target.kind == "name" and point_lsn:
        before = [b for b in backups if _lsn(b["lsn"]["stop"]) <= _lsn(point_lsn)]
        if not before:
            raise BackupError(f"no base backup ended before restore point {target.value!r} ({point_lsn})")
        return before[-1]
    return backups[-1]


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def _wait_promoted(restored: RestoredServer, timeout_s: float, gaps: list[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(restored.url("postgres"), connect_timeout=5, autocommit=True) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return
        except psycopg.OperationalError:
            if not restored.running():
                why = f" (WAL missing from the repository: {', '.join(gaps[:5])})" if gaps else ""
                raise BackupError(f"the restored server stopped during recovery{why}:\n{restored.log_tail()}") from None
        if time.monotonic() > deadline:
            raise BackupError(f"recovery did not finish within {timeout_s:.0f} s:\n{restored.log_tail()}")
        time.sleep(0.2)


def switch_over(tool: PgBackRest, live: Server, live_admin_url: str, restored: RestoredServer, *, log: LogFn,
                live_answers: bool = True) -> dict:
    """Make the restored folder the live one (see the module docstring). Returns what was done and kept. A live
    server that is down (crashed) is not stopped and gets no restore point: its folder is kept aside as it is."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    bindir, options = postmaster_options(live.data_dir)
    aside = f"{live.data_dir.rstrip('/')}_before_pitr_{stamp}"
    live_ctl = RestoredServer(live.data_dir, live.port, live.socket_dir, live.os_user, bindir,
                              f"{live.data_dir.rstrip('/')}_switch_{stamp}.log", live_admin_url, log=log)
    running = live_ctl.status()
    if running and not live_answers:
        raise BackupError(f"the live server in {live.data_dir} runs but does not answer this pipeline's connection: "
                          "nothing was switched")
    safety = archiving.create_safety_point(live_admin_url, f"before-switch-{stamp}", log=log) if running else None
    _push_new_timeline(tool, restored, log)
    restored.stop()
    Path(live_ctl.log_file).touch()
    owner = pwd.getpwnam(live.os_user)
    if os.geteuid() == 0:
        os.chown(live_ctl.log_file, owner.pw_uid, owner.pw_gid)
    if running:
        live_ctl.pg_ctl("-m", "fast", "stop")
    os.rename(live.data_dir, aside)
    os.rename(restored.data_dir, live.data_dir)
    try:
        live_ctl.pg_ctl("-o", shlex.join(options), "start")
    except BackupError:  # put the previous server back as it was
        os.rename(live.data_dir, restored.data_dir)
        os.rename(aside, live.data_dir)
        if running:
            live_ctl.pg_ctl("-o", shlex.join(options), "start")
        raise
    shutil.rmtree(restored.socket_dir, ignore_errors=True)
    tool.check()
    log(f"switched: the restored copy serves from {live.data_dir}; the previous data folder is kept as {aside}")
    return {"safety_restore_point": safety.as_dict() if safety else "none: the live server was down",
            "previous_data_dir": aside}


def _push_new_timeline(tool: PgBackRest, restored: RestoredServer, log: LogFn) -> None:
    """The verification copy ran with archiving off: push its timeline history and completed segments now, so the
    repository can replay the new timeline once it serves."""
    with psycopg.connect(restored.url("postgres"), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        current = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    tl, now = segment_number(current)
    wal = Path(restored.data_dir, "pg_wal")
    files = [wal / f"{tl:08X}.history"] + [wal / segment_name(tl, n) for n in range(max(0, now - 64), now)
                                             if (wal / segment_name(tl, n)).exists()]
    for f in files:
        if f.exists():
            tool.run("archive-push", str(f))
    log(f"new timeline {tl}: pushed {len(files)} file(s) to the repository")
