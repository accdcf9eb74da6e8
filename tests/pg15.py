"""A throwaway cluster of this machine's own PostgreSQL (Debian's postgresql-15, installed by .ci/run), for what the
embedded PostgreSQL 16 (pgserver) lacks: contrib modules such as amcheck (the restore drill's check) and pg_trgm
(which Medusa's migrations create). Run as the unprivileged `opspg` user when the tests run as root: initdb
refuses root."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from ops_pipeline.platform.local_stack import _ensure_system_user, free_port


def bindir_with(extension: str, tools: tuple[str, ...] = ()) -> Path | None:
    """A PostgreSQL bin folder with initdb, pg_ctl, pg_config and `tools`, whose share folder has `extension`
    (OPS_TEST_PG_BIN first, then pg_config's, then /usr/lib/postgresql/*/bin, newest first)."""
    candidates = [os.environ.get("OPS_TEST_PG_BIN", ""), os.environ.get("OPS_TEST_AMCHECK_PG_BIN", "")]
    if shutil.which("pg_config"):
        candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    candidates += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    for cand in filter(None, candidates):
        b = Path(cand)
        if not all((b / tool).exists() for tool in ("initdb", "pg_ctl", "pg_config", *tools)):
            continue
        share = subprocess.run([str(b / "pg_config"), "--sharedir"], capture_output=True, text=True).stdout.strip()
        if (Path(share) / "extension" / f"{extension}.control").exists():
            return b
    return None


@contextlib.contextmanager
def cluster(bindir: Path, prefix: str = "ops-pg-") -> Iterator[SimpleNamespace]:
    """Start a cluster of `bindir` on a free loopback port (scram-sha-256, fsync off) and remove it on exit.
    Yields url (the `postgres` superuser's), bindir, data, and stop/start/restart."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    run_as: dict = {}
    if os.geteuid() == 0:
        try:
            user = _ensure_system_user("opspg")
        except subprocess.CalledProcessError:  # another test process created it at the same moment
            user = pwd.getpwnam("opspg")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    password = secrets.token_urlsafe(18)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    data, port = root / "data", free_port()

    def pg_ctl(*args: str) -> None:
        proc = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", *args],
                              capture_output=True, text=True, **run_as)
        assert proc.returncode == 0, proc.stdout + proc.stderr + (root / "server.log").read_text(errors="replace")[-2000:]

    try:
        initdb = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                                 "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], capture_output=True, text=True,
                                **run_as)
        assert initdb.returncode == 0, initdb.stderr
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl("-o", options, "start")
        yield SimpleNamespace(url=f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres", bindir=bindir,
                              data=data, port=port, restart=lambda: pg_ctl("-o", options, "restart"),
                              stop=lambda: pg_ctl("-m", "fast", "stop"), start=lambda: pg_ctl("-o", options, "start"))
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                           **run_as)
        shutil.rmtree(root, ignore_errors=True)
