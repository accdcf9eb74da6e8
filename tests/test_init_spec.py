"""`python -m ops_pipeline.release.init_spec`: a starting spec from an app folder, valid as written."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from ops_pipeline.platform.spec import ReleaseConfig, validate_release_config
from ops_pipeline.release.init_spec import read_app, render_spec

ROOT = Path(__file__).resolve().parent.parent


def spec_of(folder: Path) -> dict:
    text = render_spec(read_app(folder), "staging")
    assert text.startswith("# Release spec for")
    return yaml.safe_load(text)["ops"]["verify_env"]["config"]


def test_spec_for_the_example_app_is_valid_and_names_what_it_found():
    cfg = spec_of(ROOT / "examples" / "node-api")
    assert validate_release_config(ReleaseConfig(**cfg)) == []
    app = cfg["app"]
    assert app["migrations_table"] == "pgmigrations" and app["commands"]["migrate"] == "npm run migrate"
    assert app["database"]["app_vars"] == {"url": "DATABASE_URL"} and app["redis"]["app_vars"] == {"url": "REDIS_URL"}
    assert app["secrets"] == {"JWT_SECRET": "generate"}


def test_split_variables_knex_and_yarn_are_recognised(tmp_path):
    (tmp_path / "package.json").write_text(json.dumps({
        "name": "@acme/Orders-API", "scripts": {"build": "tsc", "start": "node build/index.js", "test": "jest"},
        "dependencies": {"knex": "^3", "pg": "^8", "ioredis": "^5"}}))
    (tmp_path / "yarn.lock").write_text("# yarn lockfile v1\n")
    (tmp_path / "tsconfig.json").write_text('{"compilerOptions": {"outDir": "./build"}}')
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.ts").write_text(
        "export default { host: process.env.DB_SERVER, port: process.env['DB_PORT'], db: process.env.DB_NAME,\n"
        "  user: process.env.DB_USER, pass: process.env.DB_PASS, redis: process.env.REDIS_HOST,\n"
        "  redisPort: process.env.REDIS_PORT, listen: process.env.PORT, key: process.env.API_SIGNING_KEY };\n")
    (src / "app.ts").write_text("app.get('/api/healthz', (req, res) => res.send('ok'));\n")
    cfg = spec_of(tmp_path)
    assert validate_release_config(ReleaseConfig(**cfg)) == []
    app = cfg["app"]
    assert app["name"] == "orders-api" and app["start"] == "yarn start" and app["health_path"] == "/api/healthz"
    assert app["database"]["app_vars"] == {"url": "", "host": "DB_SERVER", "port": "DB_PORT", "database": "DB_NAME",
                                           "user": "DB_USER", "password": "DB_PASS"}
    assert app["redis"] == {"enabled": True, "app_vars": {"url": "", "host": "REDIS_HOST", "port": "REDIS_PORT"}}
    assert app["migrations_table"] == "knex_migrations" and app["commands"]["migrate"] == "npx knex migrate:latest"
    assert app["secrets"] == {"API_SIGNING_KEY": "generate"}


def test_cli_writes_the_file_and_refuses_a_folder_without_package_json(tmp_path):
    out = tmp_path / "spec.yaml"
    ok = subprocess.run([sys.executable, "-m", "ops_pipeline.release.init_spec", str(ROOT / "tests" / "fixtures" / "plain-http-app"),
                         "-e", "qa", "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    cfg = yaml.safe_load(out.read_text())["ops"]["verify_env"]["config"]
    assert cfg["environment"] == "qa" and cfg["app"]["start"] == "npm start"
    assert validate_release_config(ReleaseConfig(**cfg)) == []
    bad = subprocess.run([sys.executable, "-m", "ops_pipeline.release.init_spec", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and "has no package.json" in bad.stderr and not bad.stdout
