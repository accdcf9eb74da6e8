"""What every benchmark sets up first: its own state folder, a Dagster home, and an installed copy of the example app.

`isolated_state` must run before anything from ops_pipeline is imported: ops_pipeline reads OPS_STATE_DIR."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def isolated_state(prefix: str, reuse_env: str = "") -> Path:
    """A new world-traversable temp folder (the `opspg` server user must reach it) as OPS_STATE_DIR, telemetry off.
    `reuse_env`: the name of a variable holding the folder, so that child processes re-importing the benchmark
    (multiprocess step workers) find the same one."""
    if reuse_env and os.environ.get(reuse_env):
        state = Path(os.environ[reuse_env])
    else:
        state = Path(tempfile.mkdtemp(prefix=prefix))
        if reuse_env:
            os.environ[reuse_env] = str(state)
    state.chmod(0o755)
    os.environ["OPS_STATE_DIR"] = str(state)
    os.environ["OPS_PROJECT_ROOT"] = str(ROOT)
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    return state


def dagster_home(state: Path) -> Path:
    """<state>/dagster_home with the project's local instance config (queue, limits, telemetry off)."""
    home = state / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "config" / "dagster.yaml", home / "dagster.yaml")
    return home


def copy_example_app(dest: Path) -> Path:
    """A copy of examples/node-api without its build outputs and dependencies (see npm_ci)."""
    shutil.copytree(ROOT / "examples" / "node-api", dest, ignore=shutil.ignore_patterns("node_modules", "dist", ".test-dist"))
    return dest


def npm_ci(app: Path) -> None:
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"], cwd=app, check=True)
