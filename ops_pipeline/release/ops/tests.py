"""run_tests: the app's own command steps (install, build, lint, test, ... in the spec's order), streamed into
the run log, timed, with the test step's counts and failing test names read from its output or JUnit report."""

import hashlib
from pathlib import Path

import dagster as dg

from ops_pipeline.platform import paths
from ops_pipeline.platform.app_env import secret_names
from ops_pipeline.platform.commands import Command, CommandError, run
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.packagers import (
    PackageManager,
    PackagerError,
    Step,
    allow_scripts_env,
    detect,
    install_script_report,
    per_directory_env,
    plan_steps,
    provide,
    scripts_of,
)
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import ReleaseSpec
from ops_pipeline.release.test_reports import TestReport, parse_tap, read_report

__all__ = ["INSTALL_STAMP", "TestReport", "command_env", "package_manager", "parse_tap", "run_tests"]

INSTALL_STAMP = ".ops-install-stamp"
RELEASE_VERSION_ENV = "OPS_RELEASE_VERSION"


def _install_stamp(app_dir: Path, command: str) -> str:
    h = hashlib.sha256(command.encode())
    for lock in ("package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml"):
        p = app_dir / lock
        if p.exists():
            h.update(lock.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def package_manager(spec: ReleaseSpec) -> PackageManager:
    try:
        return detect(Path(spec.app_dir), spec.app.commands.package_manager)
    except PackagerError as exc:
        raise failure(str(exc)) from None


def command_env(spec: ReleaseSpec, pm: PackageManager | None = None, log=None) -> tuple[dict[str, str], list[str]]:
    """The environment of the app's commands: CI mode, the release version (app.version_env and
    OPS_RELEASE_VERSION), the package manager on PATH and the allowed install scripts. Tests never see the
    environment's secrets (a test suite must not touch production data)."""
    env = {"CI": "true", "NODE_ENV": "test", "FORCE_COLOR": "0", "NO_COLOR": "1", RELEASE_VERSION_ENV: spec.version}
    if spec.app.version_env:
        env[spec.app.version_env] = spec.version
    if pm is not None:
        env.update(provide(pm, log or (lambda _m: None), spec.app.commands.timeout_s))
        work = paths.state_dir() / "tools" / "npmrc" / spec.app.name
        env.update(allow_scripts_env(pm, list(spec.app.commands.allow_scripts), work))
    return env, sorted(secret_names(spec.app))


@dg.op(
    description=(
        "Runs the app's command steps (install, build, lint, test, ... as the spec orders them) in its folder with the "
        "release version in their environment, streaming their output into the run log. Records each step's "
        "duration and the test counts; a failure names the failing tests. The install is skipped when the lock file "
        "has not changed since the last one."
    ),
    tags={"stage": "test"},
)
def run_tests(context: dg.OpExecutionContext, spec: ReleaseSpec) -> ReleaseSpec:
    app_dir = Path(spec.app_dir)
    cmds = spec.app.commands
    pm = package_manager(spec)
    try:
        steps = plan_steps(cmds, pm, scripts_of(app_dir))
    except PackagerError as exc:
        raise failure(str(exc)) from None
    context.log.info(f"package manager: {pm.label}; steps: {' -> '.join(s.name for s in steps) or 'none'}")
    try:
        extra_env, hidden = command_env(spec, pm, context.log.info)
    except CommandError as exc:
        raise failure(f"providing {pm.label} failed: {exc}") from None
    extra_env.update(per_directory_env(pm, app_dir))
    redactor = Redactor()
    durations: dict[str, float] = {}
    report = TestReport()
    install_notes = ""

    def failure_md(name: str) -> dict:
        return {"durations_s": dg.MetadataValue.json(durations), "failed_step": name, "package_manager": pm.label}

    def execute(step: Step) -> None:
        nonlocal report, install_notes
        context.log.info(f"{step.name}: $ {step.run}")
        junit = app_dir / step.junit if step.junit else None
        if junit is not None and junit.exists():
            junit.unlink()  # never read a previous run's report
        cmd = Command(step.run, cwd=str(app_dir), env=extra_env, unset=tuple(hidden), timeout_s=cmds.timeout_s,
                      label=f"{step.name} ({step.run})")
        try:
            result = run(cmd, log=context.log.info, redactor=redactor)
        except CommandError as exc:
            durations[step.name] = round(exc.result.duration_s, 2) if exc.result else 0.0
            context.log.info(f"{step.name}: failed after {durations[step.name]:.2f} s")
            md = failure_md(step.name)
            if step.tests and exc.result is not None:
                rep = read_report(exc.result.output, junit)
                md.update(_report_md(rep))
                if rep.found:
                    names = "; ".join(rep.failures[:20]) or "see the test output above"
                    what = f"{rep.failed} of {rep.total} failed: {names}"
                else:  # the runner stopped before reporting (or its output is in no format we read)
                    what = str(exc)
                raise failure(f"app tests failed ({step.name}): {what}" + (f"\n{install_notes}" if install_notes else ""),
                    metadata=md) from None
            why = ""
            if exc.result is not None:
                scripts = install_script_report(exc.result.output)
                why = scripts.explain(pm) if step.name.startswith("install") else ""
            why = why or install_notes
            raise failure(f"{step.name} failed: {exc}" + (f"\n{why}" if why else ""),
                             metadata=md) from None
        durations[step.name] = round(result.duration_s, 2)
        context.log.info(f"{step.name}: done in {result.duration_s:.2f} s")
        if step.name.startswith("install"):
            note = install_script_report(result.output).explain(pm)
            if note:
                install_notes = note
                context.log.warning(note)
        if step.tests:
            report = report.plus(read_report(result.output, junit))

    stamp_file = app_dir / "node_modules" / INSTALL_STAMP
    for step in steps:
        stamp = install_stamp(app_dir, pm, step.run, cmds.allow_scripts) if step.name == "install" else ""
        if stamp and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
            context.log.info("install: lock file unchanged since the last install, skipped")
            durations["install"] = 0.0
            continue
        execute(step)
        if stamp and stamp_file.parent.is_dir():
            stamp_file.write_text(stamp)
    md = {**_report_md(report), "durations_s": dg.MetadataValue.json(durations),
          "steps": dg.MetadataValue.json([s.name for s in steps]), "package_manager": pm.label}
    if report.format:
        md["test_report_format"] = report.format
    context.add_output_metadata(md)
    context.log.info(f"tests: {report.passed} passed, {report.failed} failed, {report.skipped} skipped of {report.total}"
                     + (f" ({report.format})" if report.format else ""))
    return spec


def install_stamp(app_dir: Path, pm: PackageManager, install_command: str, allow_scripts=()) -> str:
    """What run_tests records after an install (a later release with the same lock file skips it)."""
    return _install_stamp(app_dir, f"{pm.label}\0{install_command}\0{','.join(allow_scripts)}")


def _report_md(rep: TestReport) -> dict:
    return {
        "tests_total": rep.total,
        "tests_passed": rep.passed,
        "tests_failed": rep.failed,
        "tests_skipped": rep.skipped,
        "failing_tests": dg.MetadataValue.json(rep.failures),
    }
