"""App versions for canary tests and bench/canary.py: source edits of a copy of examples/node-api (like
tests/app_variants.py), each released for real. /health and /metrics are never touched: every variant passes the
health checks, so only its real traffic can tell it apart."""

from __future__ import annotations

from pathlib import Path

MARKER = "  app.use(express.json({ limit: '100kb' }));"


def _middleware(app: Path, body: str) -> None:
    src = app / "src" / "app.ts"
    text = src.read_text()
    assert MARKER in text, "examples/node-api/src/app.ts changed: update tests/canary/variants.py"
    hook = ("  app.use((req: Request, res: Response, next: NextFunction) => {\n"
            "    if (req.path === '/health' || req.path === '/metrics') { next(); return; }\n"
            f"    {body}\n  }});\n")
    src.write_text(text.replace(MARKER, hook + MARKER))


def errors_500(every: int = 20):
    """Every `every`-th request of each instance (other than /health and /metrics) answers 500: 5% by default."""

    def edit(app: Path) -> None:
        _middleware(app, "canaryTestCount += 1;\n"
                         f"    if (canaryTestCount % {every} === 0) {{ res.status(500).json({{ error: 'injected' }}); return; }}\n"
                         "    next();")
        src = app / "src" / "app.ts"
        src.write_text(src.read_text().replace("export function createApp", "let canaryTestCount = 0;\n\nexport function createApp", 1))

    return edit


def slower(delay_ms: int):
    """Every request (other than /health and /metrics) is answered `delay_ms` later."""

    def edit(app: Path) -> None:
        _middleware(app, f"res.setHeader('X-Injected-Delay-Ms', '{int(delay_ms)}');\n    setTimeout(next, {int(delay_ms)});")

    return edit
