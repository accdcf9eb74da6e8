"""A starting release spec from an app folder: `python -m ops_pipeline.release.init_spec <app folder> [-e ENV] [-o FILE]`.

Reads package.json (name, scripts, dependencies), the lock file (package manager), the migration tool (from the
dependencies), the source's `process.env.X` names (database, Redis, port and secret variables), health-looking
routes, tsconfig's outDir and a Dockerfile (EXPOSE, CMD, HEALTHCHECK), and writes a commented run config for the
release job. Everything it guessed says so in a comment: the user finishes it, `make validate SPEC=...` checks it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ops_pipeline.platform.spec import ENV_NAME

# dependency -> (tool, the table where it records applied migrations, a migrate command)
MIGRATION_TOOLS = {
    "node-pg-migrate": ("node-pg-migrate", "pgmigrations", "npx node-pg-migrate up"),
    "knex": ("knex", "knex_migrations", "npx knex migrate:latest"),
    "sequelize-cli": ("Sequelize", "SequelizeMeta", "npx sequelize-cli db:migrate"),
    "sequelize": ("Sequelize", "SequelizeMeta", "npx sequelize-cli db:migrate"),
    "typeorm": ("TypeORM", "migrations", "npx typeorm migration:run -d <your data source>"),
    "db-migrate": ("db-migrate", "migrations", "npx db-migrate up"),
    "umzug": ("umzug", "SequelizeMeta", "<your umzug script>"),
    "prisma": ("Prisma", "_prisma_migrations", "npx prisma migrate deploy"),
    "@prisma/client": ("Prisma", "_prisma_migrations", "npx prisma migrate deploy"),
}
LOCK_FILES = {"pnpm-lock.yaml": "pnpm", "yarn.lock": "yarn", "package-lock.json": "npm", "npm-shrinkwrap.json": "npm"}
# process.env.X, process.env['X'], env.X (a destructured or passed-in env), and helpers such as intVar('X')
ENV_REF = re.compile(r"\benv(?:\.([A-Z][A-Z0-9_]*)|\[\s*['\"]([A-Z][A-Z0-9_]*)['\"]\s*\])"
                     r"|[A-Za-z]+Var\(\s*['\"]([A-Z][A-Z0-9_]*)['\"]")
HEALTH_ROUTE = re.compile(r"['\"`](/(?:api/)?(?:v\d/)?(?:health|healthz|healthcheck|ping|status|ready|live)[a-z/]*)['\"`]")
SOURCE_SUFFIXES = {".js", ".cjs", ".mjs", ".ts", ".mts", ".cts"}
SKIP_DIRS = {"node_modules", ".git", "dist", "build", "coverage", ".next"}

DB_PARTS = {
    "host": ("DB_HOST", "DB_SERVER", "DATABASE_HOST", "POSTGRES_HOST", "PGHOST", "DB_HOSTNAME"),
    "port": ("DB_PORT", "DATABASE_PORT", "POSTGRES_PORT", "PGPORT"),
    "database": ("DB_NAME", "DB_DATABASE", "DATABASE_NAME", "POSTGRES_DB", "PGDATABASE"),
    "user": ("DB_USER", "DB_USERNAME", "DATABASE_USER", "DATABASE_USERNAME", "POSTGRES_USER", "PGUSER"),
    "password": ("DB_PASS", "DB_PASSWORD", "DATABASE_PASSWORD", "POSTGRES_PASSWORD", "PGPASSWORD"),
    "tls": ("DB_SSL", "DATABASE_SSL", "PGSSL", "DB_TLS"),
}
DB_URLS = ("DATABASE_URL", "POSTGRES_URL", "PG_URL", "DB_URL", "PG_CONNECTION_STRING", "DATABASE_URI")
REDIS_PARTS = {"host": ("REDIS_HOST",), "port": ("REDIS_PORT",), "password": ("REDIS_PASSWORD", "REDIS_PASS"),
               "database": ("REDIS_DB",), "user": ("REDIS_USER", "REDIS_USERNAME"), "tls": ("REDIS_TLS",)}
REDIS_URLS = ("REDIS_URL", "REDIS_URI", "REDIS_CONNECTION_STRING")


@dataclass
class AppFacts:
    folder: Path
    name: str
    package_manager: str
    scripts: dict[str, str]
    migration: tuple[str, str, str] | None
    env_names: list[str]
    health_paths: list[str]
    build_dir: str
    docker: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _sources(folder: Path):
    for path in folder.rglob("*"):
        if path.suffix in SOURCE_SUFFIXES and not SKIP_DIRS.intersection(path.relative_to(folder).parts) and path.is_file():
            yield path


def read_app(folder: Path) -> AppFacts:
    """Facts about the app in `folder`; raises FileNotFoundError / ValueError with a clear message."""
    pkg_file = folder / "package.json"
    if not pkg_file.is_file():
        raise FileNotFoundError(f"{folder} has no package.json: not a Node app folder")
    try:
        pkg = json.loads(pkg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{pkg_file} is not valid JSON: {exc}") from None
    deps = {**pkg.get("devDependencies", {}), **pkg.get("dependencies", {})}
    name = re.sub(r"[^a-z0-9-]+", "-", str(pkg.get("name", folder.name)).split("/")[-1].lower()).strip("-")[:40] or "app"
    manager = next((pm for lock, pm in LOCK_FILES.items() if (folder / lock).exists()), "npm")
    notes = []
    if not any((folder / lock).exists() for lock in LOCK_FILES):
        notes.append("no lock file: installs are not reproducible; commit one (npm install --package-lock-only)")
    migration = next((MIGRATION_TOOLS[d] for d in MIGRATION_TOOLS if d in deps), None)
    if migration and migration[0] == "Prisma":
        notes.append("Prisma downloads its engines at install time; that needs network access to its own servers")
    env_names: list[str] = []
    health: list[str] = []
    for path in _sources(folder):
        text = path.read_text(errors="replace")
        env_names += ["".join(groups) for groups in ENV_REF.findall(text)]
        health += HEALTH_ROUTE.findall(text)
    build_dir = "dist"
    tsconfig = folder / "tsconfig.json"
    if tsconfig.exists():
        match = re.search(r'"outDir"\s*:\s*"([^"]+)"', tsconfig.read_text())
        if match:
            build_dir = match.group(1).lstrip("./").rstrip("/") or "dist"
    elif "build" not in pkg.get("scripts", {}):
        build_dir = ""
    docker = {}
    dockerfile = folder / "Dockerfile"
    if dockerfile.exists():
        text = dockerfile.read_text(errors="replace")
        for key in ("EXPOSE", "CMD", "HEALTHCHECK"):
            found = re.findall(rf"^\s*{key}\s+(.+)$", text, flags=re.MULTILINE | re.IGNORECASE)
            if found:
                docker[key] = found[-1].strip()
        health += HEALTH_ROUTE.findall(docker.get("HEALTHCHECK", ""))
    return AppFacts(folder=folder, name=name, package_manager=manager, scripts=dict(pkg.get("scripts", {})),
                    migration=migration, env_names=sorted(set(env_names)), health_paths=list(dict.fromkeys(health)),
                    build_dir=build_dir, docker=docker, notes=notes)


def _pick(names: list[str], candidates: tuple[str, ...]) -> str:
    return next((c for c in candidates if c in names), "")


def _given(app_vars: dict[str, str]) -> dict[str, str]:
    """Only the variables found; `url: ''` stays explicit for parts-only apps (the default is a URL variable)."""
    return {k: v for k, v in app_vars.items() if v or k == "url"}


def _start_command(facts: AppFacts) -> str:
    if "start:prod" in facts.scripts:
        return f"{facts.package_manager} run start:prod"
    if "start" in facts.scripts:
        return f"{facts.package_manager} start"
    cmd = facts.docker.get("CMD", "")
    if cmd.startswith("["):
        try:
            return " ".join(json.loads(cmd))
        except json.JSONDecodeError:
            pass
    return cmd or "node server.js"


def render_spec(facts: AppFacts, environment: str = "staging") -> str:
    names = facts.env_names
    db_vars = {part: _pick(names, cands) for part, cands in DB_PARTS.items()}
    db_vars["url"] = _pick(names, DB_URLS)
    if not any(db_vars.values()):
        db_vars["url"] = "DATABASE_URL"
        facts.notes.append("no database variable found in the source: DATABASE_URL assumed")
    redis_vars = {part: _pick(names, cands) for part, cands in REDIS_PARTS.items()}
    redis_vars["url"] = _pick(names, REDIS_URLS)
    uses_redis = any(redis_vars.values())
    port_env = "PORT" if "PORT" in names else next((n for n in names if n.endswith("PORT") and not n.startswith(("DB", "REDIS", "PG", "DATABASE", "POSTGRES"))), "PORT")
    claimed = {v for v in [*db_vars.values(), *redis_vars.values(), port_env, "NODE_ENV"] if v}
    secrets = [n for n in names if n not in claimed and re.search(r"SECRET|TOKEN|KEY|PASSWORD|PASS$", n)]
    health = facts.health_paths[0] if facts.health_paths else "/health"
    steps = [s for s in ("lint", "test", "build") if s in facts.scripts]
    migrate_script = next((s for s in ("migrate", "db:migrate", "migrate:latest", "migrate:up", "migration:run")
                           if s in facts.scripts), "")
    migrate = (f"{facts.package_manager} run {migrate_script}" if migrate_script
               else facts.migration[2] if facts.migration else "true")
    config = {
        "environment": environment,
        "production": False,
        "embedded_services": True,
        "app": {
            "name": facts.name,
            "path": str(facts.folder),
            "start": _start_command(facts),
            "port_env": port_env,
            "health_path": health,
            "health_version": "off",
            "required_env": [],
            "secret_env": [],
            "jwt_secret_env": "",
            "node_env_var": "NODE_ENV" if "NODE_ENV" in names else "",
            "env": {"NODE_ENV": "production"} if "NODE_ENV" in names else {},
            "secrets": {n: "generate" for n in secrets},
            "migrations_table": facts.migration[1] if facts.migration else "",
            "database": {"app_vars": _given(db_vars)},
            "redis": {"enabled": uses_redis, **({"app_vars": _given(redis_vars)} if uses_redis else {})},
            "commands": {**{s: "" for s in ("lint", "test", "build") if s not in steps}, "migrate": migrate},
        },
        "target": {"kind": "pm2", "instances": 2, "port": 3100},
    }
    body = yaml.safe_dump({"ops": {"verify_env": {"config": config}}}, sort_keys=False, default_flow_style=False)
    found = [
        f"package manager: {facts.package_manager} (from the lock file)",
        f"scripts: {', '.join(sorted(facts.scripts)) or 'none'}; run by the release: {', '.join(['install', *steps])}",
        f"migration tool: {facts.migration[0] + ' (table ' + facts.migration[1] + ')' if facts.migration else 'none found: migrate is a no-op'}",
        f"variables the source reads: {', '.join(names) or 'none found'}",
        f"health path: {health}{' (guessed: no health route found in the source)' if not facts.health_paths else ''}",
        f"build output: {facts.build_dir or 'none'}",
        *(f"Dockerfile {k}: {v}" for k, v in facts.docker.items()),
        *(f"NOTE: {n}" for n in facts.notes),
    ]
    header = "\n".join([
        f"# Release spec for {facts.name}, written by `python -m ops_pipeline.release.init_spec` from {facts.folder}.",
        "# What was found:",
        *(f"#   - {line}" for line in found),
        "# To finish: check the start command, the health path and the variables below; secrets marked `generate` get",
        "# a random value kept per environment (not allowed in production: use env:NAME or file:/path); set",
        "# health_version to json:<field> or header:<Name> if the health answer reports the version.",
        "",
    ])
    return header + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops_pipeline.release.init_spec", description=__doc__.splitlines()[0])
    parser.add_argument("app_dir", help="the app folder (holds package.json)")
    parser.add_argument("-e", "--environment", default="staging", help="environment name (default: staging)")
    parser.add_argument("-o", "--output", help="write the spec here (default: standard output)")
    args = parser.parse_args(argv)
    if not ENV_NAME.match(args.environment):
        print(f"--environment: {args.environment!r} is not a valid environment name", file=sys.stderr)
        return 2
    try:
        facts = read_app(Path(args.app_dir).resolve())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render_spec(facts, args.environment)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; check it, then: make validate SPEC={args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
