"""app.commands: named steps in the spec's order, defaults from the app, the package manager from the lock file,
the release version in every command, allowed install scripts, and the bundle (what goes in, how its production
dependencies are installed). Real npm, pnpm, yarn classic and yarn Berry (from the npm registry), real apps in tmp
folders; no mocks."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from ops_pipeline.platform.packagers import PackagerError, detect, plan_steps, provide, scripts_of
from ops_pipeline.platform.spec import CommandsConfig, ReleaseConfig, ReleaseSpec, validate_release_config
from ops_pipeline.release.ops.artifact import build_bundle
from ops_pipeline.release.ops.tests import INSTALL_STAMP, run_tests

# A build that stamps the version it is given, a lint that needs the build's output, a node:test suite.
SCRIPTS = {
    "build": "node -e \"const fs=require('fs');fs.mkdirSync('out',{recursive:true});"
             "fs.writeFileSync('out/version.txt',process.env.MY_VERSION+' '+process.env.OPS_RELEASE_VERSION)\"",
    "lint": "node -e \"require('fs').accessSync('out/version.txt')\"",
    "test": "node --test --test-reporter=tap",
}
TEST_JS = """const test = require('node:test');
const assert = require('node:assert');
test('ms parses', () => assert.strictEqual(require('ms')('1s'), 1000));
test('version reached the tests', () => assert.strictEqual(process.env.OPS_RELEASE_VERSION, 'v7'));
"""


def make_app(root: Path, scripts: dict | None = None, deps: dict | None = None, dev: dict | None = None,
             files: dict | None = None, **package) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pkg = {"name": "demo", "version": "1.0.0", "private": True, "scripts": SCRIPTS if scripts is None else scripts,
           "dependencies": deps or {}, "devDependencies": dev or {}, **package}
    (root / "package.json").write_text(json.dumps(pkg, indent=2))
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def spec_for(app: Path, version: str = "v7", **app_cfg) -> ReleaseSpec:
    cfg = ReleaseConfig(environment="unit", version=version,
                        app={"name": "demo", "path": str(app), "version_env": "MY_VERSION", **app_cfg})
    assert validate_release_config(cfg) == []
    return ReleaseSpec(config=cfg, version=version, app_dir=str(app))


def run_steps(spec: ReleaseSpec) -> dict:
    with dg.build_op_context() as ctx:
        assert run_tests(ctx, spec) == spec
        md = ctx.get_output_metadata("result")
    return {k: getattr(v, "value", getattr(v, "data", v)) for k, v in md.items()}


def lock_with(app: Path, argv: list[str], env: dict | None = None) -> None:
    """Write the app's lock file (a mutable install by definition: Yarn Berry refuses one when CI=true unless told)."""
    done = subprocess.run(argv, cwd=app, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "YARN_ENABLE_IMMUTABLE_INSTALLS": "false", **(env or {})})
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


# --- the plan: defaults from the app, the spec's order, overrides -------------------------------------------

def test_default_steps_follow_the_scripts_that_exist(tmp_path):
    app = make_app(tmp_path / "a", scripts={"test": "jest", "build": "tsc"}, files={"package-lock.json": "{}"})
    steps = plan_steps(CommandsConfig(), detect(app), scripts_of(app))
    assert [(s.name, s.run, s.tests) for s in steps] == [
        ("install", "npm ci --no-audit --no-fund --prefer-offline", False),
        ("build", "npm run build", False),  # built before lint and test: they may need its output
        ("test", "npm run test", True),
    ]  # no lint script: no lint step


def test_spec_steps_keep_their_order_and_take_defaults_by_name(tmp_path):
    app = make_app(tmp_path / "a", files={"pnpm-lock.yaml": "lockfileVersion: '9.0'\n"})
    cmds = CommandsConfig(steps=[{"name": "install"}, {"name": "lint"}, {"name": "build"}, {"name": "audit"},
                                 {"name": "e2e", "run": "node e2e.js", "junit": "reports/e2e.xml"}],
                          lint="")
    steps = plan_steps(cmds, detect(app), scripts_of(app))
    assert [(s.name, s.run) for s in steps] == [
        ("install", "pnpm install --frozen-lockfile"), ("build", "pnpm run build"), ("audit", "pnpm audit --prod"),
        ("e2e", "node e2e.js"),
    ]
    assert steps[-1].tests and steps[-1].junit == "reports/e2e.xml"  # a step with a report is a test step
    assert not any(s.tests for s in steps[:-1])


def test_a_step_without_command_or_script_is_a_spec_error_before_anything_runs(tmp_path):
    app = make_app(tmp_path / "a", scripts={"test": "x"})
    cfg = ReleaseConfig(app={"path": str(app), "commands": {"steps": [{"name": "install"}, {"name": "typecheck"}],
                                                            "package_manager": "bun", "allow_scripts": ["ok", "no way"]},
                             "bundle_paths": ["../outside"]})
    problems = validate_release_config(cfg)
    assert "app.commands.package_manager: 'bun' is not one of npm, yarn, pnpm (empty: from the lock file)" in problems
    assert "app.commands.allow_scripts: 'no way' is not a package name (name or name@exact-version)" in problems
    assert "app.bundle_paths: '../outside' must be a relative path inside the app folder" in problems
    cfg = ReleaseConfig(app={"path": str(app), "commands": {"steps": [{"name": "install"}, {"name": "typecheck"},
                                                                      {"name": "install"}]}})
    problems = validate_release_config(cfg)
    assert "app.commands.steps[2].name: 'install' appears twice" in problems
    assert any(p.startswith("app.commands.steps[1].run: step 'typecheck' has no `run` and package.json has no "
                            "'typecheck' script") for p in problems)
    assert sorted(p.name for p in app.iterdir()) == ["package.json"]  # nothing installed, nothing written


@pytest.mark.parametrize("files, package, expected", [
    ({"package-lock.json": "{}"}, {}, ("npm", "npm", "")),
    ({"npm-shrinkwrap.json": "{}"}, {}, ("npm", "npm", "")),
    ({}, {}, ("npm", "npm", "")),
    ({"yarn.lock": "# yarn lockfile v1\n"}, {}, ("yarn", "classic", "1.22.22")),
    ({"yarn.lock": "# yarn lockfile v1\n"}, {"packageManager": "yarn@1.22.19"}, ("yarn", "classic", "1.22.19")),
    ({"yarn.lock": "__metadata:\n  version: 8\n"}, {"packageManager": "yarn@4.5.3+sha224.abc"}, ("yarn", "berry", "4.5.3")),
    ({"yarn.lock": "", ".yarnrc.yml": "yarnPath: .yarn/releases/yarn-4.18.1.cjs\n",
      ".yarn/releases/yarn-4.18.1.cjs": "//"}, {}, ("yarn", "berry", "4.18.1")),
    ({"pnpm-lock.yaml": "lockfileVersion: '9.0'\n"}, {}, ("pnpm", "pnpm", "10.34.9")),
    ({"pnpm-lock.yaml": "lockfileVersion: '6.0'\n"}, {}, ("pnpm", "pnpm", "8.15.9")),
    ({"pnpm-lock.yaml": "lockfileVersion: '9.0'\n"}, {"packageManager": "pnpm@9.15.9"}, ("pnpm", "pnpm", "9.15.9")),
])
def test_package_manager_from_the_lock_file(tmp_path, files, package, expected):
    app = make_app(tmp_path / "a", files=files, **package)
    pm = detect(app)
    assert (pm.name, pm.flavor, pm.version) == expected


def test_package_manager_ambiguity_and_a_missing_berry_release_name_the_field(tmp_path):
    app = make_app(tmp_path / "a", files={"package-lock.json": "{}", "yarn.lock": ""})
    with pytest.raises(PackagerError, match=r"^app\.commands\.package_manager: lock files of several package managers"):
        detect(app)
    assert detect(app, "yarn").name == "yarn"
    berry = make_app(tmp_path / "b", files={"yarn.lock": "", ".yarnrc.yml": "nodeLinker: node-modules\n"})
    with pytest.raises(PackagerError, match=r"no committed release .* packageManager"):
        detect(berry)
    gone = make_app(tmp_path / "c", files={"yarn.lock": "", ".yarnrc.yml": "yarnPath: .yarn/releases/yarn-4.0.0.cjs\n"})
    with pytest.raises(PackagerError, match=r"yarnPath '.yarn/releases/yarn-4.0.0.cjs' does not exist"):
        detect(gone)


# --- real runs -------------------------------------------------------------------------------------------------

def test_npm_app_steps_in_order_with_the_version_then_install_skipped(tmp_path):
    app = make_app(tmp_path / "a", deps={"ms": "2.1.3"}, files={"test/ms.test.js": TEST_JS})
    lock_with(app, ["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"])
    spec = spec_for(app, commands={"steps": [{"name": "install"}, {"name": "build"}, {"name": "lint"}, {"name": "test"}]})
    md = run_steps(spec)
    assert list(md["durations_s"]) == ["install", "build", "lint", "test"]  # lint found build's output
    assert all(d > 0 for d in md["durations_s"].values())
    assert (app / "out" / "version.txt").read_text() == "v7 v7"  # app.version_env and OPS_RELEASE_VERSION
    assert (md["tests_total"], md["tests_passed"], md["tests_failed"]) == (2, 2, 0)
    assert (app / "node_modules" / INSTALL_STAMP).is_file()
    both = run_steps(spec_for(app, commands={"steps": [{"name": "test"}, {"name": "e2e", "tests": True,
                                                                          "run": "node --test --test-reporter=tap"}]}))
    assert (both["tests_total"], both["tests_passed"]) == (4, 4)  # two test steps: both counted
    again = run_steps(spec_for(app, version="v8", commands={"steps": [{"name": "install"}, {"name": "build"}]}))
    assert again["durations_s"]["install"] == 0.0  # lock file unchanged: skipped
    assert (app / "out" / "version.txt").read_text() == "v8 v8"


def test_a_build_step_failure_stops_the_release_and_says_which_step(tmp_path):
    app = make_app(tmp_path / "a", scripts={"build": "node -e \"process.exit(3)\"", "test": "node -e 1"})
    with pytest.raises(dg.Failure) as err:
        run_steps(spec_for(app))
    assert err.value.description.startswith("build failed: `build (npm run build)` exited with status 3")
    assert err.value.metadata["failed_step"].value == "build"


def bundle_files(ref: str) -> set[str]:
    root = Path(ref)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if "node_modules" not in p.parts}


def test_default_bundle_is_the_built_app_with_its_dotfiles_and_production_deps(tmp_path):
    app = make_app(tmp_path / "a", deps={"ms": "2.1.3"}, dev={"is-number": "7.0.0"},
                   files={"test/ms.test.js": TEST_JS, ".npmrc": "ignore-scripts=true\n", ".env": "SECRET=x\n",
                          "views/index.html": "<p>hi</p>", "coverage/lcov.info": "", ".git/HEAD": "ref"})
    lock_with(app, ["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"])
    spec = spec_for(app)
    run_steps(spec)
    artifact = build_bundle(spec, print)
    files = bundle_files(artifact.ref)
    assert {".npmrc", "package.json", "package-lock.json", "out/version.txt", "views/index.html",
            "test/ms.test.js"} <= files
    assert not files & {".env", "coverage/lcov.info", ".git/HEAD"}
    deps = Path(artifact.ref) / "node_modules"
    assert (deps / "ms").is_dir() and not (deps / "is-number").exists()  # production dependencies only
    assert build_bundle(spec, print).id == artifact.id  # same content, same artifact, reused


def test_listed_bundle_paths_still_get_package_manager_files(tmp_path):
    app = make_app(tmp_path / "a", scripts={"build": SCRIPTS["build"]},
                   files={".npmrc": "ignore-scripts=true\n", "src/x.js": "", "README.md": ""})
    lock_with(app, ["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"])
    spec = spec_for(app, bundle_paths=["out"])
    run_steps(spec)
    assert bundle_files(build_bundle(spec, print).ref) == {"out", "out/version.txt", ".npmrc", "package.json",
                                                           "package-lock.json"}
    with pytest.raises(dg.Failure, match=r"app.bundle_paths: missing in .*: dist"):
        build_bundle(spec_for(app, bundle_paths=["dist"]), print)


def scripted_dependency(tmp_path: Path) -> str:
    """A dependency whose install script downloads a binary (the host does not resolve)."""
    dep = make_app(tmp_path / "dep", scripts={"postinstall": "node fetch.js"}, name="binary-fetcher",
                   files={"fetch.js": "require('https').get('https://binaries.example-downloads.invalid/x.tgz')"
                                      ".on('error', e => { console.error('download failed: ' + e.message); "
                                      "process.exit(1) })\n"})
    out = subprocess.run(["npm", "pack", "--silent"], cwd=dep, check=True, capture_output=True, text=True)
    return f"file:{dep / out.stdout.strip()}"


def test_the_apps_npmrc_reaches_the_production_install_and_a_download_failure_says_why(tmp_path):
    tarball = scripted_dependency(tmp_path)
    app = make_app(tmp_path / "a", scripts={}, deps={"binary-fetcher": tarball},
                   files={".npmrc": "ignore-scripts=true\n", "index.js": ""})
    lock_with(app, ["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"])
    artifact = build_bundle(spec_for(app), print)  # .npmrc in the bundle: the script did not run
    assert (Path(artifact.ref) / "node_modules" / "binary-fetcher" / "fetch.js").is_file()
    (app / ".npmrc").unlink()
    with pytest.raises(dg.Failure) as err:
        build_bundle(spec_for(app), print)
    text = err.value.description
    assert "the install script of dependency binary-fetcher failed while trying to download" in text
    assert "ENOTFOUND binaries.example-downloads.invalid" in text and "ignore-scripts=true" in text


ESBUILD = "0.25.0"  # a real install script: postinstall `node install.js` checks its platform binary


def test_allow_scripts_lets_a_dependencys_install_script_run_under_a_strict_policy(tmp_path):
    app = make_app(tmp_path / "a", scripts={"test": "node -e \"require('esbuild').transformSync('let x = 1')\""},
                   deps={"esbuild": ESBUILD})
    lock_with(app, ["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"])
    (app / ".npmrc").write_text("strict-allow-scripts=true\n")  # npm 12's default, as a hard error
    with pytest.raises(dg.Failure) as err:
        run_steps(spec_for(app))
    text = err.value.description
    assert text.startswith("install failed:") and "esbuild@0.25.0" in text
    assert "list them in app.commands.allow_scripts" in text
    md = run_steps(spec_for(app, commands={"allow_scripts": ["esbuild"]}))
    assert list(md["durations_s"]) == ["install", "test"]
    artifact = build_bundle(spec_for(app, commands={"allow_scripts": ["esbuild"]}), print)
    assert (Path(artifact.ref) / "node_modules" / "esbuild" / "package.json").is_file()


def test_pnpm_app_from_its_lock_file(tmp_path):
    app = make_app(tmp_path / "a", deps={"ms": "2.1.3"}, dev={"is-number": "7.0.0"},
                   files={"test/ms.test.js": TEST_JS})
    spec = spec_for(app)
    pnpm_env = provide(detect(app, "pnpm"), print, 300)  # the same pnpm the pipeline uses writes the lock file
    lock_with(app, ["pnpm", "install", "--lockfile-only"], pnpm_env)
    assert detect(app).label == "pnpm 10.34.9"
    md = run_steps(spec)
    assert md["package_manager"] == "pnpm 10.34.9" and md["steps"] == ["install", "build", "lint", "test"]
    assert md["tests_passed"] == 2 and (app / "out" / "version.txt").read_text() == "v7 v7"
    deps = Path(build_bundle(spec, print).ref) / "node_modules"
    assert (deps / "ms" / "index.js").is_file() and not (deps / "is-number").exists()
    # the bundle's own copy (hard-linked only with our production-deps cache), not a link into pnpm's store
    assert (deps / ".pnpm" / "ms@2.1.3" / "node_modules" / "ms" / "index.js").stat().st_nlink == 2


def test_pnpm_runs_only_allowed_install_scripts_and_says_which_it_ignored(tmp_path):
    # esbuild's install script puts its native binary in place of the bin/esbuild JavaScript launcher
    check = ("const b = require('fs').readFileSync('node_modules/esbuild/bin/esbuild');\n"
             "if (b.subarray(0, 4).toString('latin1') !== '\\x7fELF') { console.error('not built'); process.exit(1); }\n")
    app = make_app(tmp_path / "a", deps={"esbuild": ESBUILD}, scripts={"test": "node check.js"},
                   files={"check.js": check, ".npmrc": "side-effects-cache=false\n"})  # build here, not from the store
    lock_with(app, ["pnpm", "install", "--lockfile-only"], provide(detect(app, "pnpm"), print, 300))
    with pytest.raises(dg.Failure) as err:
        run_steps(spec_for(app))  # pnpm 10 skips dependencies' build scripts unless allowed
    text = err.value.description
    assert text.startswith("app tests failed (test): `test (pnpm run test)` exited with status 1")
    assert f"dependency install scripts outside its allowed list: esbuild@{ESBUILD}" in text
    assert "list them in app.commands.allow_scripts" in text
    shutil.rmtree(app / "node_modules")
    md = run_steps(spec_for(app, commands={"allow_scripts": ["esbuild"]}))
    assert md["steps"] == ["install", "test"]


def test_yarn_classic_app_from_its_lock_file(tmp_path):
    app = make_app(tmp_path / "a", deps={"ms": "2.1.3"}, dev={"is-number": "7.0.0"},
                   files={"test/ms.test.js": TEST_JS})
    yarn_env = provide(detect(app, "yarn"), print, 300)
    lock_with(app, ["yarn", "install", "--non-interactive"], yarn_env)
    subprocess.run(["rm", "-rf", str(app / "node_modules")], check=True)
    spec = spec_for(app)
    md = run_steps(spec)
    assert md["package_manager"] == "yarn classic 1.22.22" and md["tests_passed"] == 2
    deps = Path(build_bundle(spec, print).ref) / "node_modules"
    assert (deps / "ms").is_dir() and not (deps / "is-number").exists()


@pytest.fixture(scope="session")
def berry_release(tmp_path_factory) -> Path:
    """yarn 4's release file as an app commits it (`yarn set version`): @yarnpkg/cli-dist's bin/yarn.js."""
    d = tmp_path_factory.mktemp("berry")
    out = subprocess.run(["npm", "pack", "@yarnpkg/cli-dist@4.18.1", "--silent"], cwd=d, check=True,
                         capture_output=True, text=True, timeout=300)
    subprocess.run(["tar", "xzf", out.stdout.strip(), "package/bin/yarn.js"], cwd=d, check=True)
    return d / "package" / "bin" / "yarn.js"


def test_yarn_berry_app_with_its_committed_release(tmp_path, berry_release):
    app = make_app(tmp_path / "a", deps={"ms": "2.1.3"}, dev={"is-number": "7.0.0"},
                   files={"test/ms.test.js": TEST_JS,
                          ".yarnrc.yml": "yarnPath: .yarn/releases/yarn-4.18.1.cjs\nnodeLinker: node-modules\n"})
    (app / ".yarn" / "releases").mkdir(parents=True)
    (app / ".yarn" / "releases" / "yarn-4.18.1.cjs").write_bytes(berry_release.read_bytes())
    lock_with(app, ["node", ".yarn/releases/yarn-4.18.1.cjs", "install"])
    subprocess.run(["rm", "-rf", str(app / "node_modules")], check=True)
    spec = spec_for(app)
    md = run_steps(spec)
    assert md["package_manager"] == "yarn Berry 4.18.1 (.yarn/releases/yarn-4.18.1.cjs)" and md["tests_passed"] == 2
    first = build_bundle(spec, print)
    files = bundle_files(first.ref)
    assert {".yarnrc.yml", ".yarn/releases/yarn-4.18.1.cjs", "yarn.lock"} <= files
    deps = Path(first.ref) / "node_modules"
    assert (deps / "ms").is_dir() and not (deps / "is-number").exists()
    assert build_bundle(spec, print).id == first.id  # nothing that changes per install is left in the bundle
