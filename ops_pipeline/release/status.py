"""What is serving where, and stopping it, for every environment of this machine.

    python -m ops_pipeline.release.status [ENVIRONMENT ...]        what serves each environment (default: all of them)
    python -m ops_pipeline.release.status --down [ENVIRONMENT ...] stop each environment's PM2 daemon and nginx front proxy

The environments are the folders `<state>/envs/<environment>` (`OPS_STATE_DIR`) and those the release history of
the local Dagster instance knows. Used by `make demo`, `make status` and `make down`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg

from ops_pipeline.platform import history, paths
from ops_pipeline.platform.commands import which
from ops_pipeline.platform.prober import HttpProber
from ops_pipeline.platform.spec import ReleaseSpec, SpecError


def environments(instance: dg.DagsterInstance | None = None) -> list[str]:
    """Every environment with a folder in the state folder, plus those the instance's release history names."""
    envs_dir = paths.state_dir() / "envs"
    names = {p.name for p in envs_dir.iterdir() if p.is_dir()} if envs_dir.is_dir() else set()
    if instance is not None:
        names.update(history.environments(instance))
    return sorted(names)


def report(environment: str, instance: dg.DagsterInstance) -> tuple[int, str]:
    hist = history.load(instance, environment)
    lines = [f"environment: {environment}"]
    latest = hist.latest()
    if latest is None:
        return 1, f"environment '{environment}': nothing released yet"
    serving = hist.serving_version
    record = hist.release_of(serving) if serving else None
    spec = history.spec_json(record) if record else None
    status = 0
    if latest.event not in (history.RELEASED, history.ROLLED_BACK):
        status = 1
        lines.append(f"last event:  {latest.event} of {latest.version} - {latest.get('reason', '')[:300]}")
    try:
        release_spec = ReleaseSpec.from_json(spec, version=serving) if spec else None
    except SpecError as exc:
        release_spec, status = None, 1
        lines.append(f"serving:     {serving}, whose release record is invalid: {'; '.join(exc.problems)}")
    if release_spec:
        target = release_spec.target
        probe = HttpProber().probe(release_spec.health_url, timeout_s=5, version_from=release_spec.app.health_version)
        lines.append(f"serving:     {serving} ({target.kind.value} x{target.instances})")
        lines.append(f"url:         {release_spec.public_url}")
        lines.append(f"health:      {'HTTP ' + str(probe.status) if probe.status else probe.error} "
                     f"version={probe.version} {probe.body or ''}")
        if not probe.ok:
            status = 1
        standby = _standby(release_spec)
        if standby:
            lines.append(f"standby:     {standby}")
    lines.append("history (newest first):")
    lines += [f"  {s}" for s in hist.summary(6)]
    return status, "\n".join(lines)


def _standby(spec: ReleaseSpec) -> str:
    """The warm standby (version, instances, measured memory, time left), from the target's state file."""
    from ops_pipeline.targets.resource import DeployTargets

    try:
        standby = DeployTargets.with_defaults().for_spec(spec).standby()
    except Exception as exc:  # noqa: BLE001 - the report goes on without it
        return f"unknown ({type(exc).__name__}: {str(exc)[:200]})"
    if standby is None:
        return ""
    parts = [standby.summary()] if standby.instances else []
    if standby.retiring:
        parts.append(f"{len(standby.retiring)} instance(s) taken out of traffic by a switch, not stopped yet")
    return "; ".join(parts)


def report_all(instance: dg.DagsterInstance, names: list[str] | None = None) -> tuple[int, str]:
    """The report of each environment (all of them when `names` is empty); non-zero if any is not healthy."""
    names = names or environments(instance)
    if not names:
        return 1, f"no environment in {paths.state_dir() / 'envs'} and none in the release history"
    results = [report(name, instance) for name in names]
    return max(code for code, _ in results), "\n\n".join(text for _, text in results)


def _is_nginx(pid: int) -> bool:
    try:
        return b"nginx" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop(environment: str) -> list[str]:
    """Stop what runs for one environment on this machine: its nginx front proxy (graceful: SIGQUIT to the master
    named in `<env>/nginx/nginx.pid`) and its PM2 daemon (`pm2 kill` with PM2_HOME `<env>/pm2`). Returns what was
    stopped."""
    env_dir = paths.environment_dir(environment)
    done = []
    pid_file = env_dir / "nginx" / "nginx.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and _is_nginx(pid):  # a stale pid file may name another process now
        try:
            os.kill(pid, signal.SIGQUIT)
            done.append(f"nginx (pid {pid})")
        except ProcessLookupError:
            pass
    pm2_home = env_dir / "pm2"
    if pm2_home.is_dir():
        pm2 = which("pm2", [paths.project_root() / "tools" / "node_modules" / ".bin"])
        if (pm2_home / "pm2.pid").exists() and pm2:
            subprocess.run([pm2, "kill"], env={**os.environ, "PM2_HOME": str(pm2_home)}, capture_output=True,
                           timeout=60)
            done.append("PM2 daemon")
    return done


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops_pipeline.release.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("environments", nargs="*", help="environment names (default: every environment)")
    parser.add_argument("--down", action="store_true", help="stop the environments instead of reporting on them")
    args = parser.parse_args(argv)
    if args.down:
        for name in args.environments or environments():
            stopped = stop(name)
            print(f"{name}: stopped {', '.join(stopped)}" if stopped else f"{name}: nothing running")
        return 0
    with dg.DagsterInstance.get() as instance:
        code, text = report_all(instance, args.environments)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
