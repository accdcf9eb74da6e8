"""Source edits that turn a copy of examples/node-api into a different (often bad) release of it.

Each returns a function applied to the copy's folder; the release then builds, tests and ships the edited
source for real. The example app itself has no fault switches.
"""

from __future__ import annotations

from pathlib import Path

HEALTH_MARKER = "export async function runHealthChecks(deps: HealthDeps): Promise<HealthResult> {"


def _inject_health(app: Path, condition: str, prelude: str = "") -> None:
    src = app / "src" / "health.ts"
    text = src.read_text()
    assert HEALTH_MARKER in text, "examples/node-api/src/health.ts changed: update tests/app_variants.py"
    answer = ("return { statusCode: 503, body: { uptime: process.uptime(), timestamp: Date.now(), database: 'error', "
              "redis: 'ok', version: deps.version }, failures: { database: 'injected regression' } };")
    text = text.replace(HEALTH_MARKER, f"{HEALTH_MARKER}\n  if ({condition}) {{ {answer} }}")
    src.write_text(prelude + text)


def health_always_503(app: Path) -> None:
    """A release whose /health answers 503 from the start (it never becomes healthy)."""
    _inject_health(app, "deps.version !== ''")


def health_503_when_file_exists(path: Path):
    """A release that is healthy until `path` exists (then 503): a regression that shows up after promotion."""

    def edit(app: Path) -> None:
        _inject_health(app, f"existsSync({str(path)!r})", prelude="import { existsSync } from 'node:fs';\n")

    return edit


def health_503_after_uptime(seconds: float):
    """A release that is healthy for its first `seconds` of uptime, then answers 503."""

    def edit(app: Path) -> None:
        _inject_health(app, f"process.uptime() > {seconds}")

    return edit


def crash_on_start(app: Path) -> None:
    """A release whose process exits right after start (crash loop under a process manager)."""
    src = app / "src" / "server.ts"
    src.write_text("setTimeout(() => { console.error('fatal: injected crash on start'); process.exit(1); }, 300);\n"
                   + src.read_text())


def failing_test(name: str = "checkout total includes tax"):
    def edit(app: Path) -> None:
        (app / "tests" / "zz_release_blocker.test.ts").write_text(
            "import { test } from 'node:test';\nimport assert from 'node:assert/strict';\n"
            f"test({name!r}, () => {{ assert.equal(1 + 1, 3); }});\n")

    return edit


def migration_failing_half_way(app: Path) -> None:
    """A migration that creates a table, then fails (inside the migration transaction)."""
    (app / "migrations" / "1800000000000_half-way.js").write_text(
        "exports.up = (pgm) => {\n  pgm.createTable('audit_log', { id: 'id', note: 'text' });\n"
        "  pgm.sql('SELECT 1/0');\n};\nexports.down = () => {};\n")


def slow_migration(seconds: float):
    """A migration that takes `seconds` (pg_sleep), for faults during a migration."""

    def edit(app: Path) -> None:
        (app / "migrations" / "1800000000001_slow.js").write_text(
            "exports.up = (pgm) => {\n  pgm.createTable('slow_marker', { id: 'id' });\n"
            f"  pgm.sql('SELECT pg_sleep({seconds})');\n}};\nexports.down = (pgm) => {{ pgm.dropTable('slow_marker'); }};\n")

    return edit


def combine(*edits):
    def edit(app: Path) -> None:
        for e in edits:
            e(app)

    return edit
