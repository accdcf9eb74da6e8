"""A real PostgreSQL 15 server (Debian's, as the unprivileged `opspg` user: tests/pg15.py) archiving its WAL with a
real pgBackRest into a local repository, with a first full backup taken."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from ops_pipeline.backup import archiving
from ops_pipeline.backup.pgbackrest import PgBackRest, Repository
from tests import pg15

pytestmark = pytest.mark.xdist_group("pg15")


_MADE: list[str] = []


@pytest.fixture(autouse=True)
def _remove_folders():
    """Every folder a test made with _folder is removed after it."""
    yield
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)


def _folder(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    _MADE.append(path)
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        user = pwd.getpwnam("opspg")
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


@contextlib.contextmanager
def archiving_server(*, cipher_key: str = "", retention_full: int = 2, archive_timeout_s: int = 60,
                     full_backup: bool = True) -> Iterator[SimpleNamespace]:
    bindir = pg15.bindir_with("amcheck", tools=("pg_amcheck",))
    if bindir is None or not shutil.which("pgbackrest"):
        pytest.skip("needs Debian's postgresql-15 and pgbackrest (.ci/run and make setup install them)")
    with pg15.cluster(bindir, prefix="ops-pitr-") as server:
        repo, conf = _folder("ops-pitr-repo-"), _folder("ops-pitr-conf-")
        lines: list[str] = []
        try:
            live = archiving.discover_server(server.url)
            tool = PgBackRest("test", live, Repository(repo, retention_full=retention_full, cipher_key=cipher_key),
                              conf, log=lines.append)
            tool.write_config()
            ready = archiving.enable_archiving(server.url, tool, archive_timeout_s=archive_timeout_s, log=lines.append)
            assert not ready  # archive_mode needs the restart below
            server.restart()
            tool.stanza_create()
            tool.check()
            if full_backup:
                tool.backup("full")
            yield SimpleNamespace(server=server, url=server.url, live=live, tool=tool, repo=repo, conf=conf,
                                  lines=lines, bindir=bindir)
        finally:
            for leftover in _restored_folders(server.data):
                pg_ctl = f"{bindir}/pg_ctl"
                os.system(f"runuser -u opspg -- {pg_ctl} -D {leftover} -m immediate stop >/dev/null 2>&1"
                          if os.geteuid() == 0 else f"{pg_ctl} -D {leftover} -m immediate stop >/dev/null 2>&1")
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(conf, ignore_errors=True)


def _restored_folders(data_dir) -> list[str]:
    parent = os.path.dirname(str(data_dir))
    return [os.path.join(parent, d) for d in os.listdir(parent)
            if "_pitr_" in d and os.path.exists(os.path.join(parent, d, "postmaster.pid"))]


@pytest.fixture
def archived():
    with archiving_server() as a:
        yield a
