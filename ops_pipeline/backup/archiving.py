"""Continuous archiving on an environment's PostgreSQL server: turning it on, the release's safety point (a named
restore point whose WAL is archived before the release migrates), and the WAL gaps of a repository.

The server is found from a superuser connection (data folder, port, socket folder; its OS user is the data folder's
owner), so the spec names no path: an environment whose server runs elsewhere (a managed database) cannot archive
this way and keeps pg_dump backups (`app.database.backups: dump`).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from ops_pipeline.backup.common import BackupError, LogFn
from ops_pipeline.backup.pgbackrest import PgBackRest, Server, segment_name, segment_number
from ops_pipeline.platform.postgres import ConnInfo

RESTORE_POINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,62}\Z")  # pg_create_restore_point takes up to 63 bytes


def discover_server(admin_url: str) -> Server:
    """The server behind `admin_url` (a superuser's), on this host: data folder, port, socket folder, OS user."""
    info = ConnInfo.parse(admin_url)
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SELECT current_setting('data_directory'), current_setting('port')::int, "
                               "current_setting('unix_socket_directories'), "
                               "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)").fetchone()
    except psycopg.Error as exc:
        raise BackupError(f"archiving needs a superuser connection to the server: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    data_dir, port, sockets, superuser = row
    if not superuser:
        raise BackupError(f"archiving needs a superuser connection (role {info.user!r} is not one): restore points, "
                          "archive status and base backups are the server's")
    if not os.path.isdir(data_dir):
        raise BackupError(f"the server's data folder {data_dir} is not on this host: archiving needs the server's "
                          "host (a managed database keeps app.database.backups: dump)")
    socket_dir = next((s.strip() for s in sockets.split(",") if s.strip() and not s.strip().startswith("@")), "")
    if not socket_dir:
        raise BackupError("the server listens on no Unix socket folder (unix_socket_directories), which pgBackRest uses")
    return Server(data_dir=data_dir, port=port, socket_dir=socket_dir, os_user=pwd.getpwuid(os.stat(data_dir).st_uid).pw_name,
                  db_user=info.user, db_password=info.password or "")


def record_server(config_dir: Path, server: Server) -> None:
    """What a restore needs of the server when it no longer answers (no password: that comes from its URL)."""
    facts = {"data_dir": server.data_dir, "port": server.port, "socket_dir": server.socket_dir,
             "os_user": server.os_user, "recorded_at": time.time()}
    path = config_dir / "server.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts))
    os.replace(tmp, path)


def recorded_server(config_dir: Path, admin_url: str) -> Server | None:
    try:
        facts = json.loads((config_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None
    info = ConnInfo.parse(admin_url)
    return Server(data_dir=facts["data_dir"], port=facts["port"], socket_dir=facts["socket_dir"],
                  os_user=facts["os_user"], db_user=info.user, db_password=info.password or "")


def enable_archiving(admin_url: str, tool: PgBackRest, *, archive_timeout_s: int, log: LogFn) -> bool:
    """Set archive_command (and archive_mode, wal_level, archive_timeout) with ALTER SYSTEM and reload. Returns
    False when the server still needs a restart for archive_mode or wal_level (this code never restarts a server)."""
    settings = {"archive_mode": "on", "wal_level": "replica", "archive_command": tool.archive_command(),
                "archive_timeout": f"{archive_timeout_s}s"}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        current = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN ('archive_mode', 'wal_level', "
                                    "'archive_command', 'archive_timeout')").fetchall())
        current["archive_timeout"] = f"{current.get('archive_timeout')}s"
        changed = [name for name, value in settings.items() if current.get(name) != value
                   and not (name == "wal_level" and current.get(name) == "logical")]  # logical includes replica
        for name in changed:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(settings[name])))
        if changed:
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.2)
        live = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN ('archive_mode', 'wal_level')").fetchall())
    ready = live.get("archive_mode") in ("on", "always") and live.get("wal_level") in ("replica", "logical")
    if not ready:
        log(f"archiving configured; the server needs a restart for archive_mode/wal_level (now {live})")
    return ready


@dataclass(frozen=True)
class SafetyPoint:
    name: str
    lsn: str
    segment: str  # the WAL file holding the restore point, archived before this returns
    created_at: float
    archived_after_s: float

    def as_dict(self) -> dict:
        return {"restore_point": self.name, "lsn": self.lsn, "wal_segment": self.segment,
                "created_at": self.created_at, "archived_after_s": round(self.archived_after_s, 3)}


def create_safety_point(admin_url: str, name: str, *, log: LogFn, timeout_s: float = 120) -> SafetyPoint:
    """A named restore point, then a WAL switch so the segment holding it is completed, then a wait until the server
    has archived it (pg_stat_archiver): a restore to this name needs nothing that is not yet in the repository."""
    if not RESTORE_POINT.match(name):
        raise BackupError(f"restore point name {name!r}: letters, digits, '.', '_', ':', '+', '-' (at most 63)")
    t0 = time.monotonic()
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        mode = conn.execute("SELECT current_setting('archive_mode'), pg_is_in_recovery()").fetchone()
        if mode[0] not in ("on", "always") or mode[1]:
            raise BackupError(f"the server does not archive WAL (archive_mode={mode[0]}, in recovery={mode[1]}): "
                              "no restore point can be relied on")
        lsn = str(conn.execute("SELECT pg_create_restore_point(%s)", (name,)).fetchone()[0])
        created = time.time()
        switched = conn.execute("SELECT pg_switch_wal()").fetchone()[0]
        segment = conn.execute("SELECT pg_walfile_name(%s)", (switched,)).fetchone()[0]
        deadline = time.monotonic() + timeout_s
        while True:
            done, failed, failed_at = conn.execute(
                "SELECT last_archived_wal, last_failed_wal, last_failed_time FROM pg_stat_archiver").fetchone()
            if done and len(done) == 24 and done >= segment:
                break
            if time.monotonic() > deadline:
                why = f"; the last failure was {failed} at {failed_at}" if failed else ""
                raise BackupError(f"WAL segment {segment} with restore point {name!r} was not archived within "
                                  f"{timeout_s:.0f} s (last archived: {done or 'none'}{why})")
            time.sleep(0.05)
    point = SafetyPoint(name, lsn, segment, created, time.monotonic() - t0)
    log(f"restore point {name!r} at {lsn}, segment {segment} archived in {point.archived_after_s:.2f} s")
    return point


def wal_gaps(tool: PgBackRest, start_segment: str, up_to: str = "") -> list[str]:
    """The WAL segments missing from the repository between `start_segment` (a base backup's first) and the newest
    archived one (or `up_to`), across the timelines after it. Empty: recovery can replay all of it."""
    have = tool.archived_segments()
    start_tl, start_n = segment_number(start_segment)
    end_tl, end_n = segment_number(up_to) if up_to else (None, None)
    missing: list[str] = []
    for tl in sorted(t for t in have if t >= start_tl and (end_tl is None or t <= end_tl)):
        numbers = set(have[tl])
        first = start_n if tl == start_tl else min(numbers)
        last = end_n if (end_tl == tl) else max(numbers)
        missing += [segment_name(tl, n) for n in range(first, last + 1) if n not in numbers]
    if start_tl not in have:
        missing.insert(0, start_segment)
    return missing


def newest_segment(tool: PgBackRest) -> str:
    have = tool.archived_segments()
    if not have:
        return ""
    tl = max(have)
    return segment_name(tl, max(have[tl]))
