"""Test counts and failing test names from what the app's test runner printed or wrote.

Read: TAP (node:test's `--test-reporter=tap`, tap, mocha's tap reporter), node:test's spec reporter, jest's
default reporter, mocha's default `spec` reporter, and JUnit XML reports (jest-junit, mocha-junit-reporter,
node's `--test-reporter=junit`, ...) read with the standard library's ElementTree. `read_report()` takes the
first format that recognises the output.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TestReport:
    total: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    todo: int = 0
    failures: list[str] = field(default_factory=list)
    format: str = ""

    __test__ = False  # not a pytest test class

    @property
    def found(self) -> bool:
        return self.total > 0 or bool(self.failures)

    def plus(self, other: "TestReport") -> "TestReport":
        """Both reports together (an app with unit and e2e test steps)."""
        if not self.found:
            return other
        if not other.found:
            return self
        formats = ", ".join(dict.fromkeys(f for f in (self.format, other.format) if f))
        return TestReport(self.total + other.total, self.passed + other.passed, self.failed + other.failed,
                          self.skipped + other.skipped, self.todo + other.todo,
                          list(dict.fromkeys(self.failures + other.failures)), formats)


# What each runner calls a count -> the TestReport field
_COUNT_FIELDS = {"tests": "total", "total": "total", "pass": "passed", "passed": "passed", "fail": "failed",
                 "failed": "failed", "skipped": "skipped", "skip": "skipped", "todo": "todo"}


def _set_count(report: TestReport, key: str, n: int) -> None:
    if key in _COUNT_FIELDS:
        setattr(report, _COUNT_FIELDS[key], n)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_TAP_LINE = re.compile(r"^(?P<indent>\s*)(?P<ok>not ok|ok)\s+\d+\s*(?:-\s*)?(?P<name>[^#]*?)\s*(?:#\s*(?P<directive>\w+).*)?$")
_TAP_COUNT = re.compile(r"^#\s*(tests|pass|fail|skipped|skip|todo|cancelled)\s+(\d+)\s*$")


def parse_tap(output: str) -> TestReport:
    """Counts and failing test names from TAP (node:test's `--test-reporter=tap`, tap, mocha-tap, ...).

    Nested subtests are indented; a failing test is named with its parents: `suite > test`.
    Failing parents whose children failed are not listed again.
    """
    report = TestReport(format="tap")
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
            counted = True
            _set_count(report, m.group(1), int(m.group(2)))
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


_JEST_TESTS = re.compile(r"^Tests:\s+(?P<parts>.*\d+ total)\s*$", re.M)
_JEST_FAIL = re.compile(r"^\s{2}● (?P<name>.+?)\s*$", re.M)


def parse_jest(output: str) -> TestReport:
    """jest's default reporter: the `Tests:` summary line and the `● suite › test` headers of failures."""
    report = TestReport(format="jest")
    text = _ANSI.sub("", output)
    summaries = _JEST_TESTS.findall(text)
    if not summaries:
        return report
    for part in summaries[-1].split(","):
        m = re.match(r"\s*(\d+)\s+(\w+)", part)
        if m:
            _set_count(report, m.group(2), int(m.group(1)))
    names = []
    current_file = ""
    for line in text.splitlines():
        fm = re.match(r"^FAIL\s+(\S+)", line)
        if fm:
            current_file = fm.group(1)
            continue
        m = _JEST_FAIL.match(line)
        if not m or m.group("name").startswith("Console"):
            continue
        name = m.group("name").replace(" › ", " > ")
        if name == "Test suite failed to run":
            name = f"{current_file}: test suite failed to run" if current_file else name
        names.append(name)
    report.failures = list(dict.fromkeys(names))
    return report


_MOCHA_COUNT = re.compile(r"^\s*(?P<n>\d+) (?P<key>passing|failing|pending)\b", re.M)
_MOCHA_FAIL_HEAD = re.compile(r"^\s*(?P<i>\d+)\) (?P<title>.+?)\s*$")


def parse_mocha(output: str) -> TestReport:
    """mocha's default `spec` reporter: `N passing` / `N failing` / `N pending` and the numbered failure titles."""
    report = TestReport(format="mocha")
    text = _ANSI.sub("", output)
    counts = {m.group("key"): int(m.group("n")) for m in _MOCHA_COUNT.finditer(text)}
    if "passing" not in counts and "failing" not in counts:
        return report
    report.passed = counts.get("passing", 0)
    report.failed = counts.get("failing", 0)
    report.skipped = counts.get("pending", 0)
    report.total = report.passed + report.failed + report.skipped
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*\d+ failing\b", line)), None)
    names: list[str] = []
    if start is not None:
        i = start + 1
        while i < len(lines):
            m = _MOCHA_FAIL_HEAD.match(lines[i])
            if not m:
                i += 1
                continue
            # "1) Suite" then indented title lines; the last one ends with ':'
            parts = [m.group("title")]
            j = i + 1
            while not parts[-1].endswith(":") and j < len(lines) and lines[j].strip() and j - i < 20:
                parts.append(lines[j].strip())
                j += 1
            parts[-1] = parts[-1].rstrip(":")
            names.append(" > ".join(parts))
            i = j
    report.failures = names[: report.failed] if report.failed else names
    return report


_NODE_SPEC_COUNT = re.compile(r"^ℹ (tests|pass|fail|skipped|todo|cancelled) (\d+)\s*$", re.M)


def parse_node_spec(output: str) -> TestReport:
    """node:test's `spec` reporter (the default on a terminal and from Node 22): its `ℹ tests N` summary and the
    `✖ name` lines under `failing tests:`."""
    report = TestReport(format="node-spec")
    text = _ANSI.sub("", output)
    counts = _NODE_SPEC_COUNT.findall(text)
    if not any(k == "tests" for k, _ in counts):
        return report
    for key, n in counts:
        _set_count(report, key, int(n))
    tail = text.split("failing tests:", 1)
    if len(tail) == 2:
        report.failures = list(dict.fromkeys(m.group(1) for m in re.finditer(r"^\s*✖ (.+?)(?: \([\d.]+m?s\))?\s*$",
                                                                               tail[1], re.M)))
    return report


def parse_junit_xml(xml_text: str | bytes) -> TestReport:
    """A JUnit XML report: <testsuites>/<testsuite> (nested or not)/<testcase> with <failure>, <error> or <skipped>.

    A failing test is named `suite > ... > test`: from its classname when that says more than its name (mocha's
    xunit), else from the nested suites around it (node:test's junit, whose classname is always "test")."""
    report = TestReport(format="junit")
    root = ET.fromstring(xml_text)
    names: list[str] = []

    def walk(element: ET.Element, suites: list[str]) -> None:
        for child in element:
            if child.tag == "testsuite":
                walk(child, [*suites, (child.get("name") or "").strip()])
            elif child.tag == "testcase":
                count(child, suites)

    def count(case: ET.Element, suites: list[str]) -> None:
        report.total += 1
        if case.find("failure") is None and case.find("error") is None:
            if case.find("skipped") is not None:
                report.skipped += 1
            else:
                report.passed += 1
            return
        report.failed += 1
        cls, name = (case.get("classname") or "").strip(), (case.get("name") or "").strip()
        if cls == name:  # jest-junit: both are the full title
            prefix = []
        elif cls and cls != "test" and cls not in name:
            prefix = [cls]
        else:
            prefix = [s for s in suites[1:] if s and s not in name]
        names.append(" > ".join([*prefix, name]))

    if root.tag == "testcase":
        count(root, [])
    else:
        walk(root, [(root.get("name") or "").strip()])  # the root's own name (a runner's label) is not a suite
    if report.total == 0:  # suite-level summaries only
        for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
            report.total += int(suite.get("tests") or 0)
            report.failed += int(suite.get("failures") or 0) + int(suite.get("errors") or 0)
            report.skipped += int(suite.get("skipped") or 0)
        report.passed = max(0, report.total - report.failed - report.skipped)
    report.failures = list(dict.fromkeys(names))
    return report


def read_report(output: str, junit_file: Path | None = None) -> TestReport:
    """The report of one test step: its JUnit XML file when it wrote one, else the first format its output has."""
    if junit_file is not None and junit_file.is_file():
        return parse_junit_xml(junit_file.read_bytes())
    for parse in (parse_tap, parse_jest, parse_mocha, parse_node_spec):
        report = parse(output)
        if report.found:
            return report
    return TestReport()
