"""pgBackRest, the one class that runs it: continuous WAL archiving, base backups, restores, repository listing.

Why pgBackRest (not WAL-G or Barman): it is packaged by Debian (2.45 in bookworm, `apt-get install pgbackrest`, no
download from elsewhere), it checksums every file and rechecks on restore, waits until the WAL a backup needs is in
the repository before the backup counts, expires base backups together with the WAL they need (and never the last
full), encrypts the repository (aes-256-cbc) and writes to a folder or any S3-compatible store with the same
commands. WAL-G has no Debian package and its retention deletes by name order (wal-g #636); Barman needs a server
of its own and its GPG encryption of WAL is recent (3.14).

pgBackRest must run as the OS user that runs PostgreSQL: when this process is root, every command is run through
`runuser -u <os user>`. Its configuration (one stanza per environment) is written to a folder of its own, mode 0700,
never inside the repository: with encryption on, it holds the repository key, which the server's archive_command
needs; the key is never on a command line, in the repository or in a log (pgBackRest prints secure options as
`<redacted>`, and every line goes through the run's Redactor too).

Every command is built as data (`Command`) and run through `platform.commands.run`, its output streamed to the log.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ops_pipeline.backup.common import BackupError, LogFn
from ops_pipeline.platform.commands import Command, CommandError, run, which
from ops_pipeline.platform.redaction import Redactor

SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
CIPHER = "aes-256-cbc"


@dataclass(frozen=True)
class S3:
    """An S3-compatible bucket as the repository (pgBackRest speaks HTTPS only)."""

    bucket: str
    endpoint: str  # host name or address
    port: int = 443
    region: str = "us-east-1"
    key: str = ""
    secret: str = ""
    ca_file: str = ""  # CA bundle to verify the endpoint with (e.g. AWS_CA_BUNDLE); empty: the system's
    uri_style: str = "path"  # path style works with any S3-compatible endpoint


@dataclass(frozen=True)
class Repository:
    """Where a stanza's WAL and base backups go and how they are kept."""

    path: str  # a local folder, or the key prefix inside the bucket (pgBackRest's repo1-path)
    retention_full: int = 2  # full backups kept; WAL older than the oldest kept one's start goes with it
    cipher_key: str = ""  # aes-256-cbc key of the repository (empty: unencrypted)
    s3: S3 | None = None

    def describe(self) -> str:
        return f"s3://{self.s3.bucket}{self.path}" if self.s3 else self.path


@dataclass(frozen=True)
class Server:
    """The PostgreSQL server a stanza archives: found on the server itself (SHOW data_directory, port, socket)."""

    data_dir: str
    port: int
    socket_dir: str
    os_user: str  # who runs the server (pgBackRest must run as the same user)
    db_user: str = "postgres"  # a superuser pgBackRest connects as (backup start/stop, check)
    db_password: str = ""


def _printable(text: str) -> str:
    """pgBackRest quotes undecryptable file content in some messages: keep the words."""
    return re.sub(r"[^\x20-\x7e]+", "?", text)


def segment_number(name: str) -> tuple[int, int]:
    """(timeline, segment number) of a WAL file name, with 16 MB segments (256 per 'log' id)."""
    m = SEGMENT.match(name)
    if not m:
        raise ValueError(f"not a WAL segment name: {name!r}")
    return int(m[1], 16), int(m[2], 16) * 0x100 + int(m[3], 16)


def segment_name(timeline: int, number: int) -> str:
    return f"{timeline:08X}{number // 0x100:08X}{number % 0x100:08X}"


class PgBackRest:
    """pgBackRest for one stanza: `config_dir` holds its configuration (written by `write_config`)."""

    def __init__(self, stanza: str, server: Server, repo: Repository, config_dir: str | Path, *,
                 log: LogFn = print, redactor: Redactor | None = None, binary: str = "") -> None:
        if not re.match(r"^[a-z][a-z0-9-]{0,62}\Z", stanza):
            raise BackupError(f"stanza {stanza!r}: lower-case letters, digits and '-', starting with a letter")
        self.stanza, self.server, self.repo = stanza, server, repo
        self.config_dir = Path(config_dir)
        self.config_file = self.config_dir / "pgbackrest.conf"
        self.log = log
        self.redact = (redactor or Redactor()).add(repo.cipher_key, server.db_password,
                                                   repo.s3.secret if repo.s3 else "")
        self.binary = binary or which("pgbackrest") or ""
        if not self.binary:
            raise BackupError("pgbackrest is not installed (Debian: apt-get install pgbackrest; `make setup` does it)")

    # ---- configuration ----------------------------------------------------------------------------------------
    def _owner(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.server.os_user)
        except KeyError:
            raise BackupError(f"OS user {self.server.os_user!r} (who runs PostgreSQL) does not exist here") from None

    def _prefix(self) -> list[str]:
        owner = self._owner()
        if os.geteuid() == owner.pw_uid:
            return []
        if os.geteuid() == 0:
            return ["runuser", "-u", owner.pw_name, "--"]
        raise BackupError(f"pgBackRest must run as {owner.pw_name}, who runs PostgreSQL; this process runs as "
                          f"{pwd.getpwuid(os.geteuid()).pw_name} and cannot switch user")

    def write_config(self) -> None:
        """Write the stanza's configuration (0600 in a 0700 folder, owned by the server's OS user) and create the
        repository folder. The repository key, when there is one, is in this file only."""
        owner = self._owner()
        lines = [
            "[global]",
            f"repo1-path={self.repo.path}",
            "repo1-retention-full-type=count",
            f"repo1-retention-full={self.repo.retention_full}",
            "compress-type=zst",
            "start-fast=y",  # the backup starts at once (an immediate checkpoint), not at the next regular one
            "archive-check=y",
            "log-level-console=info",
            "log-level-file=off",
            f"lock-path={self.config_dir / 'lock'}",
            f"spool-path={self.config_dir / 'spool'}",
        ]
        if self.repo.cipher_key:
            lines += [f"repo1-cipher-type={CIPHER}", f"repo1-cipher-pass={self.repo.cipher_key}"]
        s3 = self.repo.s3
        if s3:
            lines += ["repo1-type=s3", f"repo1-s3-bucket={s3.bucket}", f"repo1-s3-endpoint={s3.endpoint}",
                      f"repo1-storage-port={s3.port}", f"repo1-s3-region={s3.region}", f"repo1-s3-uri-style={s3.uri_style}"]
            lines += [f"repo1-s3-key={s3.key}", f"repo1-s3-key-secret={s3.secret}"] if s3.key else ["repo1-s3-key-type=auto"]
            lines += [f"repo1-storage-ca-file={s3.ca_file}"] if s3.ca_file else []
        lines += [
            "",
            f"[{self.stanza}]",
            f"pg1-path={self.server.data_dir}",
            f"pg1-port={self.server.port}",
            f"pg1-socket-path={self.server.socket_dir}",
            f"pg1-user={self.server.db_user}",
            "",
        ]
        if any("\n" in line for line in lines):
            raise BackupError("a pgBackRest setting may not contain a line break")
        folders = [self.config_dir, self.config_dir / "lock", self.config_dir / "spool"]
        for folder in folders + ([] if s3 else [Path(self.repo.path)]):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700 if folder != Path(self.repo.path) else 0o750)
            if os.geteuid() == 0:
                os.chown(folder, owner.pw_uid, owner.pw_gid)
        tmp = self.config_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
        if os.geteuid() == 0:
            os.chown(tmp, owner.pw_uid, owner.pw_gid)
        os.replace(tmp, self.config_file)

    def archive_command(self) -> str:
        """The server's archive_command: push each completed WAL segment into the repository."""
        return (f"{shlex.quote(self.binary)} --config={shlex.quote(str(self.config_file))} "
                f"--stanza={self.stanza} archive-push %p")

    # ---- commands ---------------------------------------------------------------------------------------------
    def command(self, name: str, *args: str, timeout_s: float | None = 3600, label: str = "") -> Command:
        options = [a for a in args if a.startswith("--")]
        positional = [a for a in args if not a.startswith("--")]  # e.g. archive-push's file
        argv = [*self._prefix(), self.binary, f"--config={self.config_file}", f"--stanza={self.stanza}", *options, name,
                *positional]
        env = {"PGPASSWORD": self.server.db_password} if self.server.db_password else {}
        return Command(argv=argv, env=env, timeout_s=timeout_s, label=label or f"pgbackrest {name}",
                       unset=("PGBACKREST_REPO1_CIPHER_PASS",))

    def run(self, name: str, *args: str, quiet: bool = False, timeout_s: float | None = 3600) -> str:
        try:
            result = run(self.command(name, *args, timeout_s=timeout_s), log=None if quiet else self.log,
                         redactor=self.redact)
        except CommandError as exc:
            raise BackupError(self.redact(str(exc))) from None
        return result.output

    def stanza_create(self) -> None:
        self.run("stanza-create")

    def check(self) -> None:
        """The server archives into the repository: forces a WAL switch and waits until that segment is there."""
        self.run("check")

    def backup(self, kind: str = "full") -> dict:
        """A base backup (full | diff | incr); expire runs after it (only after a successful backup). Returns its
        entry of `info`."""
        if kind not in ("full", "diff", "incr"):
            raise BackupError(f"backup type: full, diff or incr (got {kind!r})")
        self.run("backup", f"--type={kind}")
        backups = self.info()["backup"]
        if not backups:
            raise BackupError("pgbackrest backup ended but the repository lists no backup")
        return backups[-1]

    def expire(self) -> None:
        self.run("expire")

    def info(self) -> dict:
        """`pgbackrest info --output=json` for the stanza; a repository error (wrong key, missing stanza) raises."""
        out = self.run("info", "--output=json", "--log-level-console=warn", quiet=True)
        try:
            stanzas = json.loads(out[out.index("["):], strict=False)  # messages may quote undecryptable bytes
        except ValueError:
            raise BackupError(f"pgbackrest info gave no JSON: {self.redact(_printable(out)[-500:])}") from None
        stanza = next((s for s in stanzas if s.get("name") == self.stanza), None)
        if stanza is None:
            raise BackupError(f"no stanza {self.stanza!r} in the repository")
        status = stanza.get("status", {})
        fine = (0, 2, None)  # 2: no valid backups yet (a new stanza)
        if status.get("code") not in fine or any(r.get("status", {}).get("code") not in fine for r in stanza.get("repo", [])):
            problems = [r["status"].get("message", "") for r in stanza.get("repo", [])
                        if r.get("status", {}).get("code") not in fine]
            text = _printable("; ".join(problems))
            text = re.sub(r"(at line \d+):.*", r"\1 (ciphertext)", text.split("?FormatError")[0] + (
                " (" + text.split("?FormatError: ", 1)[1].split(":")[0] + ")" if "?FormatError: " in text else ""))
            if re.search(r"cipher|encrypt|Salted|FormatError", text):
                raise BackupError(f"the repository key does not open the repository {self.repo.describe()} (no key or a wrong "
                                  f"key: {'none given' if not self.repo.cipher_key else 'the one given'}); pgBackRest "
                                  f"says: {self.redact(text)[:300]}")
            raise BackupError(f"pgbackrest info: stanza {self.stanza}: {status.get('message')}"
                              + (f" ({self.redact(text)[:500]})" if problems else ""))
        return stanza

    def verify(self) -> str:
        """`pgbackrest verify`: every WAL file and backup file against its checksum."""
        return self.run("verify", "--output=text", "--verbose")

    def archived_segments(self) -> dict[int, list[int]]:
        """The WAL segments in the repository, by timeline (sorted segment numbers), from `repo-ls`."""
        out = self.run("repo-ls", f"archive/{self.stanza}", "--recurse", "--output=json", "--log-level-console=warn",
                       quiet=True)
        try:
            listing = json.loads(out[out.index("{"):])
        except ValueError:
            raise BackupError(f"pgbackrest repo-ls gave no JSON: {self.redact(out[-500:])}") from None
        found: dict[int, set[int]] = {}
        for path, entry in listing.items():
            name = path.rsplit("/", 1)[-1].split("-", 1)[0]
            if entry.get("type") == "file" and SEGMENT.match(name):
                tl, n = segment_number(name)
                found.setdefault(tl, set()).add(n)
        return {tl: sorted(ns) for tl, ns in found.items()}

    def restore(self, data_dir: str, *, target: str = "latest", value: str = "", backup_set: str = "") -> None:
        """Restore into `data_dir` (a NEW, empty folder): the base backup, then recovery settings for `target`:
        latest (all archived WAL), time (`value`: a timestamp with zone), name (a restore point) or lsn. Recovery
        promotes the server when the target is reached; it fails if the target is never reached."""
        args = [f"--pg1-path={data_dir}", "--target-action=promote"] if target != "latest" else [f"--pg1-path={data_dir}"]
        if target == "latest":
            args.append("--type=default")
        elif target in ("time", "name", "lsn"):
            args += [f"--type={target}", f"--target={value}"]
        else:
            raise BackupError(f"restore target: latest, time, name or lsn (got {target!r})")
        if backup_set:
            args.append(f"--set={backup_set}")
        self.run("restore", *args)
