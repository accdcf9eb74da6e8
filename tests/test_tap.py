"""Test counts and failing test names: node's TAP and spec reporters, jest, mocha, JUnit XML."""

import json
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
from ops_pipeline.release.ops.tests import parse_tap, run_tests
from ops_pipeline.release.test_reports import parse_jest, parse_junit_xml, parse_mocha, parse_node_spec, read_report

NODE_TAP = """TAP version 13
# Subtest: config validation
    # Subtest: lists every missing variable
    ok 1 - lists every missing variable
      ---
      duration_ms: 1.2
      ...
    # Subtest: rejects a short secret
    not ok 2 - rejects a short secret
      ---
      error: 'expected 503'
      ...
    1..2
not ok 1 - config validation
# Subtest: health
ok 2 - health
# Subtest: skipped one
ok 3 - skipped one # SKIP no database
1..3
# tests 4
# suites 1
# pass 2
# fail 1
# cancelled 0
# skipped 1
# todo 0
"""


def test_node_tap_counts_and_leaf_failure_names():
    rep = parse_tap(NODE_TAP)
    assert (rep.total, rep.passed, rep.failed, rep.skipped) == (4, 2, 1, 1)
    assert rep.failures == ["config validation > rejects a short secret"]


def test_plain_tap_without_summary_is_counted_from_lines():
    rep = parse_tap("1..3\nok 1 - a\nnot ok 2 - b\nok 3 - c # SKIP later\n")
    assert (rep.total, rep.passed, rep.failed, rep.skipped) == (3, 1, 1, 1)
    assert rep.failures == ["b"]


# --- jest, mocha, node's spec reporter and JUnit XML ---------------------------------------------------------
# tests/fixtures/test_reports/ holds the output of real runs of one suite (6 tests: 3 pass, 2 fail, 1 skipped)
# under jest 30.5.2, mocha 12.0.3 (spec and xunit reporters), jest-junit 16.0.0 and node 20.20.2 (spec and junit
# reporters); the tests below the fixtures run jest and mocha for real through run_tests.

FIXTURES = Path(__file__).parent / "fixtures" / "test_reports"
FAILING = ["math > division > divides by zero to Infinity", "strings > uppercases"]


@pytest.mark.parametrize("fixture, parse, failures", [
    ("jest-30.5.2.txt", parse_jest, FAILING),
    ("mocha-12.0.3.txt", parse_mocha, FAILING),
    ("jest-junit-16.0.0.xml", parse_junit_xml, ["math division divides by zero to Infinity", "strings uppercases"]),
    ("mocha-12.0.3-xunit.xml", parse_junit_xml, ["math division > divides by zero to Infinity", "strings > uppercases"]),
])
def test_captured_runner_output_counts_and_failing_names(fixture, parse, failures):
    data = (FIXTURES / fixture).read_bytes()
    rep = parse(data if fixture.endswith(".xml") else data.decode())
    assert (rep.total, rep.passed, rep.failed, rep.skipped) == (6, 3, 2, 1)
    assert rep.failures == failures


def test_node_spec_and_junit_reporters():
    spec = parse_node_spec((FIXTURES / "node-20.20.2-spec.txt").read_text())
    junit = parse_junit_xml((FIXTURES / "node-20.20.2-junit.xml").read_bytes())
    for rep in (spec, junit):
        assert (rep.total, rep.passed, rep.failed, rep.skipped) == (3, 1, 1, 1)
    assert spec.failures == ["divides by zero"] and junit.failures == ["math > division > divides by zero"]


def test_read_report_picks_the_format_the_output_has():
    assert read_report((FIXTURES / "jest-30.5.2.txt").read_text()).format == "jest"
    assert read_report((FIXTURES / "mocha-12.0.3.txt").read_text()).format == "mocha"
    assert read_report(NODE_TAP).format == "tap"
    assert read_report("Tests:       1127 passed, 1127 total\n").passed == 1127  # the "0 passed of 0"
    assert not read_report("no tests here").found


RUNNERS = {"jest": "30.5.2", "mocha": "12.0.3"}


@pytest.fixture(scope="session")
def runners_app(tmp_path_factory) -> Path:
    """A throwaway Node project with jest and mocha installed from the npm registry (once per session)."""
    app = tmp_path_factory.mktemp("runners")
    (app / "package.json").write_text(json.dumps({"name": "runners", "version": "1.0.0", "private": True}))
    (app / "test").mkdir()
    (app / "test" / "math.test.js").write_text(
        "const assert = require('node:assert');\n"
        "describe('math', () => {\n"
        "  it('adds', () => { assert.strictEqual(1 + 1, 2); });\n"
        "  it('subtracts', () => { assert.strictEqual(3 - 1, 2); });\n"
        "  describe('division', () => {\n"
        "    it('divides by zero to Infinity', () => { assert.strictEqual(1 / 0, 0); });\n"
        "  });\n"
        "  it.skip('multiplies later', () => {});\n"
        "});\n"
        "describe('strings', () => {\n"
        "  it('joins', () => { assert.strictEqual(['a', 'b'].join(''), 'ab'); });\n"
        "  it('uppercases', () => { assert.strictEqual('a'.toUpperCase(), 'a'); });\n"
        "});\n")
    (app / "big").mkdir()
    (app / "big" / "many.test.js").write_text(
        "describe('many', () => {\n"
        "  test.each(Array.from({ length: 1127 }, (_, i) => i))('case %i', (i) => { expect(i + 0).toBe(i); });\n"
        "});\n")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts",
                    *(f"{p}@{v}" for p, v in RUNNERS.items())], cwd=app, check=True, capture_output=True, timeout=600)
    return app


def run_step(app: Path, step: dict) -> dict:
    cfg = ReleaseConfig(environment="unit", version="v1", app={"name": "runners", "path": str(app),
                                                               "commands": {"steps": [step]}})
    spec = ReleaseSpec(config=cfg, version="v1", app_dir=str(app))
    with dg.build_op_context() as ctx:
        run_tests(ctx, spec)
        return {k: getattr(v, "value", getattr(v, "data", v)) for k, v in ctx.get_output_metadata("result").items()}


def failing_step(app: Path, step: dict) -> dg.Failure:
    with pytest.raises(dg.Failure) as err:
        run_step(app, step)
    return err.value


@pytest.mark.xdist_group("node-test-runners")
def test_real_jest_run_counts_and_names_failing_tests(runners_app):
    failure = failing_step(runners_app, {"name": "test", "run": "npx jest test/"})
    assert failure.description.startswith("app tests failed (test): 2 of 6 failed: "
                                          "math > division > divides by zero to Infinity; strings > uppercases")
    assert failure.metadata["tests_passed"].value == 3 and failure.metadata["tests_skipped"].value == 1
    md = run_step(runners_app, {"name": "test", "run": "npx jest big/"})
    assert (md["tests_total"], md["tests_passed"], md["test_report_format"]) == (1127, 1127, "jest")


@pytest.mark.xdist_group("node-test-runners")
def test_real_mocha_run_from_its_output_and_from_its_xunit_report(runners_app):
    failure = failing_step(runners_app, {"name": "unit", "run": "npx mocha test/", "tests": True})
    assert failure.description.startswith("app tests failed (unit): 2 of 6 failed: "
                                          "math > division > divides by zero to Infinity; strings > uppercases")
    report = "reports/mocha.xml"
    failure = failing_step(runners_app, {"name": "test", "junit": report,
                                         "run": f"mkdir -p reports && npx mocha test/ --reporter xunit "
                                                f"--reporter-option output={report}"})
    assert failure.metadata["tests_total"].value == 6
    assert "2 of 6 failed: math division > divides by zero to Infinity; strings > uppercases" in failure.description
