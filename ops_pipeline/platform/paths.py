"""Where ops-pipeline keeps its state on this machine.

Everything lives under one project-local state directory (default `<project>/.ops`, override with
`OPS_STATE_DIR`): the embedded PostgreSQL/Redis, DAGSTER_HOME, release artifacts, per-environment
deploy folders and the local backup store. Nothing is written system-wide.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # ops_pipeline/


def project_root() -> Path:
    """The project checkout: `OPS_PROJECT_ROOT`, else the folder holding this package's workspace.yaml, else cwd."""
    env = os.environ.get("OPS_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    candidate = PACKAGE_DIR.parent
    if (candidate / "workspace.yaml").exists():
        return candidate
    return Path.cwd().resolve()


def state_dir() -> Path:
    env = os.environ.get("OPS_STATE_DIR")
    return Path(env).resolve() if env else project_root() / ".ops"


def resolve(path: str | os.PathLike[str], base: Path | None = None) -> Path:
    """Resolve a configured path: absolute stays, relative is taken from the project root."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else ((base or project_root()) / p).resolve()


def environment_dir(environment: str) -> Path:
    return state_dir() / "envs" / environment


def artifacts_dir() -> Path:
    return state_dir() / "artifacts"


def default_backup_dir() -> Path:
    return state_dir() / "backups"


def link_or_copy(src: str, dst: str) -> str:
    """copy_function for shutil.copytree: a hard link (instant, byte-identical), a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
