"""run_tests: the app's own install / lint / test / build, streamed into the run log, counted and timed."""

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from ops_pipeline.app_env import secret_names
from ops_pipeline.commands import Command, CommandError, run
from ops_pipeline.redaction import Redactor
from ops_pipeline.spec import ReleaseSpec

INSTALL_STAMP = ".ops-install-stamp"


@dataclass
class TestReport:
    total: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    todo: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.total > 0 or bool(self.failures)


_TAP_LINE = re.compile(r"^(?P<indent>\s*)(?P<ok>not ok|ok)\s+\d+\s*(?:-\s*)?(?P<name>[^#]*?)\s*(?:#\s*(?P<directive>\w+).*)?$")
_TAP_COUNT = re.compile(r"^#\s*(tests|pass|fail|skipped|skip|todo|cancelled)\s+(\d+)\s*$")


def parse_tap(output: str) -> TestReport:
    """Counts and failing test names from TAP (node:test's `--test-reporter=tap`, tap, mocha-tap, ...).

    Nested subtests are indented; a failing test is named with its parents: `suite > test`.
    Failing parents whose children failed are not listed again.
    """
    report = TestReport()
    stack: list[tuple[int, str]] = []  # (indent, name) of "Subtest:" headers seen
    failures: list[tuple[int, str]] = []
    counted = False
    for line in output.splitlines():
        sub = re.match(r"^(\s*)# Subtest:\s*(.*)$", line)
        if sub:
            indent = len(sub.group(1))
            stack = [s for s in stack if s[0] < indent] + [(indent, sub.group(2).strip())]
            continue
        m = _TAP_COUNT.match(line.strip())
        if m and not line.startswith((" ", "\t")):
            key, n = m.group(1), int(m.group(2))
            counted = True
            if key == "tests":
                report.total = n
            elif key == "pass":
                report.passed = n
            elif key == "fail":
                report.failed = n
            elif key in ("skipped", "skip"):
                report.skipped = n
            elif key == "todo":
                report.todo = n
            continue
        t = _TAP_LINE.match(line)
        if not t:
            continue
        indent = len(t.group("indent"))
        directive = (t.group("directive") or "").lower()
        if t.group("ok") == "not ok" and directive not in ("skip", "todo"):
            parents = [name for (i, name) in stack if i < indent]
            name = t.group("name").strip()
            failures.append((indent, " > ".join([*parents, name]) if parents else name))
        if not counted and indent == 0:
            report.total += 1
            if t.group("ok") == "ok":
                report.passed += 1 if directive not in ("skip", "todo") else 0
                report.skipped += 1 if directive == "skip" else 0
            elif directive not in ("skip", "todo"):
                report.failed += 1
    # Keep leaves: drop a failure that is a prefix (parent) of another one.
    names = [n for _, n in failures]
    report.failures = [n for n in dict.fromkeys(names) if not any(o != n and o.startswith(n + " > ") for o in names)]
    return report


def _install_stamp(app_dir: Path, command: str) -> str:
    h = hashlib.sha256(command.encode())
    for lock in ("package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml"):
        p = app_dir / lock
        if p.exists():
            h.update(lock.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def command_env(spec: ReleaseSpec) -> tuple[dict[str, str], list[str]]:
    """Tests never see the environment's secrets (a test suite must not touch production data)."""
    return {"CI": "true", "NODE_ENV": "test", "FORCE_COLOR": "0", "NO_COLOR": "1"}, sorted(secret_names(spec.app))


@dg.op(
    description=(
        "Runs the app's install, lint, test and build commands in its folder, streaming their output into the run "
        "log. Records test counts and step durations; a failure names the failing tests. The install is skipped "
        "when the lock file has not changed since the last one."
    ),
    tags={"stage": "test"},
)
def run_tests(context: dg.OpExecutionContext, spec: ReleaseSpec) -> ReleaseSpec:
    app_dir = Path(spec.app_dir)
    cmds = spec.app.commands
    extra_env, hidden = command_env(spec)
    redactor = Redactor()
    durations: dict[str, float] = {}
    report = TestReport()

    def step(name: str, command: str) -> str:
        if not command.strip():
            context.log.info(f"{name}: no command configured, skipped")
            return ""
        context.log.info(f"{name}: $ {command}")
        cmd = Command(command, cwd=str(app_dir), env=extra_env, unset=tuple(hidden), timeout_s=cmds.timeout_s,
                      label=f"{name} ({command})")
        try:
            result = run(cmd, log=context.log.info, redactor=redactor)
        except CommandError as exc:
            durations[name] = round(exc.result.duration_s, 2) if exc.result else 0.0
            failure_md = {"durations_s": dg.MetadataValue.json(durations), "failed_step": name}
            if name == "test" and exc.result is not None:
                rep = parse_tap(exc.result.output)
                failure_md.update(_report_md(rep))
                names = "; ".join(rep.failures[:20]) or "see the test output above"
                raise dg.Failure(
                    description=f"app tests failed: {rep.failed} of {rep.total} failed: {names}",
                    metadata=failure_md, allow_retries=False,
                ) from None
            raise dg.Failure(description=f"{name} failed: {exc}", metadata=failure_md, allow_retries=False) from None
        durations[name] = round(result.duration_s, 2)
        return result.output

    stamp_file = app_dir / "node_modules" / INSTALL_STAMP
    stamp = _install_stamp(app_dir, cmds.install)
    if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        context.log.info("install: lock file unchanged since the last install, skipped")
        durations["install"] = 0.0
    else:
        step("install", cmds.install)
        if stamp_file.parent.is_dir():
            stamp_file.write_text(stamp)
    step("lint", cmds.lint)
    out = step("test", cmds.test)
    report = parse_tap(out)
    step("build", cmds.build)
    context.add_output_metadata({**_report_md(report), "durations_s": dg.MetadataValue.json(durations)})
    context.log.info(f"tests: {report.passed} passed, {report.failed} failed, {report.skipped} skipped of {report.total}")
    return spec


def _report_md(rep: TestReport) -> dict:
    return {
        "tests_total": rep.total,
        "tests_passed": rep.passed,
        "tests_failed": rep.failed,
        "tests_skipped": rep.skipped,
        "failing_tests": dg.MetadataValue.json(rep.failures),
    }
