"""The `dg` CLI in this project: its project settings agree with workspace.yaml, and `dg check defs` (what
`make validate`, .ci/run and the workflow run) passes without a warning."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.conftest import ROOT


def test_dg_project_settings_name_the_same_code_location_as_workspace_yaml():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dg_cfg = pyproject["tool"]["dg"]
    (entry,) = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    assert dg_cfg["directory_type"] == "project"
    assert dg_cfg["project"]["root_module"] == "ops_pipeline"
    # `dg dev` / `dg launch` load this module under this location name (without it, dg names the location after
    # the checkout folder, and the daemon of `make ui` would not find the runs of workspace.yaml's location)
    assert dg_cfg["project"]["code_location_target_module"] == entry["python_module"]["module_name"]
    assert dg_cfg["project"]["code_location_name"] == entry["python_module"]["location_name"]
    assert pyproject["tool"]["dagster"]["code_location_name"] == entry["python_module"]["location_name"]
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("dagster-dg-cli")]
    dagster = [d for d in pyproject["project"]["dependencies"] if d.startswith("dagster==")]
    assert pins == [f"dagster-dg-cli=={dagster[0].split('==')[1]}"]  # in lockstep with dagster


def test_dg_check_defs_passes_without_warnings():
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run([str(bin_dir / "dg"), "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully." in out.stdout
    assert "Warning" not in out.stdout + out.stderr and "warning" not in out.stdout + out.stderr
