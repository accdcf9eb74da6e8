"""The app's package manager and its named command steps, derived from its folder.

npm, yarn classic, yarn Berry and pnpm, chosen from the lock file (or `app.commands.package_manager`). npm is
the one on this machine. yarn and pnpm are installed from the npm registry, through npm itself, into
`<state>/tools/<package>@<version>` (once; npm verifies every tarball against the registry's integrity), at the
version in package.json's `packageManager` field, else the newest release that reads the lock file. Corepack is
not used: it verifies signatures this registry's metadata does not carry ("No compatible signature found") and
fetches Berry from repo.yarnpkg.com, which is not reachable here; the npm registry is. A Berry release committed
in the repo (`.yarnrc.yml` yarnPath, `.yarn/releases/`) is run as it is, with the machine's node.

The steps are data: `plan_steps()` turns the spec's `app.commands` and the app's package.json into the ordered
list `run_tests` runs, and `commands_problems()` reports every mistake in them before anything runs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ops_pipeline.platform import paths

PACKAGE_MANAGERS = ("npm", "yarn", "pnpm")
LOCK_FILES = {
    "package-lock.json": "npm",
    "npm-shrinkwrap.json": "npm",
    "yarn.lock": "yarn",
    "pnpm-lock.yaml": "pnpm",
}
# Newest release reading each pnpm lockfileVersion (major), used when package.json names no version.
PNPM_FOR_LOCKFILE = {"5": "7.33.7", "6": "8.15.9", "9": "10.34.9"}
PNPM_DEFAULT = "10.34.9"
YARN_CLASSIC_DEFAULT = "1.22.22"
# What the package managers read from the app folder: copied into every release bundle.
PACKAGE_MANAGER_FILES = (
    ".npmrc", ".yarnrc", ".yarnrc.yml", ".yarn/releases", ".yarn/plugins", ".yarn/patches", ".pnpmfile.cjs",
    "pnpm-workspace.yaml", ".nvmrc", ".node-version",
)
STEP_NAME = re.compile(r"^[a-z][a-z0-9_:-]{0,39}$")
NPM_PACKAGE = re.compile(r"^(@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*(@[0-9][0-9A-Za-z.+|-]*)?$")
DEFAULT_ORDER = ("install", "build", "lint", "test")


class PackagerError(ValueError):
    """The app's package manager cannot be determined or provided; the message names the spec field."""


@dataclass(frozen=True)
class PackageManager:
    name: str  # npm | yarn | pnpm
    flavor: str  # npm | classic | berry | pnpm
    version: str = ""  # empty: the machine's npm
    lockfile: str = ""
    release: str = ""  # Berry: the committed release (relative to the app folder)

    @property
    def label(self) -> str:
        what = {"classic": "yarn classic", "berry": "yarn Berry"}.get(self.flavor, self.name)
        return f"{what} {self.version}".strip() + (f" ({self.release})" if self.release else "")

    @property
    def registry_package(self) -> str:
        """The npm package this package manager is installed from ('' when none is needed)."""
        if self.flavor == "pnpm":
            return f"pnpm@{self.version}"
        if self.flavor == "classic":
            return f"yarn@{self.version}"
        if self.flavor == "berry" and not self.release:
            return f"@yarnpkg/cli-dist@{self.version}"
        return ""

    def install(self) -> str:
        if self.flavor == "npm":
            return "npm ci --no-audit --no-fund --prefer-offline" if self.lockfile else "npm install --no-audit --no-fund"
        if self.flavor == "classic":
            return "yarn install --frozen-lockfile --non-interactive"
        if self.flavor == "berry":
            return "yarn install --immutable"
        return "pnpm install --frozen-lockfile"

    def install_production(self) -> str:
        if self.flavor == "npm":
            return ("npm ci --omit=dev --no-audit --no-fund --prefer-offline" if self.lockfile
                    else "npm install --omit=dev --no-audit --no-fund")
        if self.flavor == "classic":
            return "yarn install --production --frozen-lockfile --non-interactive"
        if self.flavor == "berry":
            return "yarn workspaces focus --all --production"
        # copied, not hard-linked from pnpm's global store: the bundle is read-only and must own its files
        return "pnpm install --prod --frozen-lockfile --package-import-method=copy"

    def run_script(self, script: str) -> str:
        return f"npm run {script}" if self.flavor == "npm" else f"{self.name} run {script}"

    def audit(self) -> str:
        return {"npm": "npm audit --omit=dev", "classic": "yarn audit --groups dependencies",
                "berry": "yarn npm audit --environment production", "pnpm": "pnpm audit --prod"}[self.flavor]


def read_package_json(app_dir: Path) -> dict:
    try:
        data = json.loads((app_dir / "package.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def scripts_of(app_dir: Path) -> dict[str, str]:
    scripts = read_package_json(app_dir).get("scripts") or {}
    return {k: v for k, v in scripts.items() if isinstance(v, str)} if isinstance(scripts, dict) else {}


def _yarnrc(app_dir: Path) -> dict:
    try:
        data = yaml.safe_load((app_dir / ".yarnrc.yml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def detect(app_dir: Path, configured: str = "") -> PackageManager:
    """The app's package manager: `configured`, else the one its lock file belongs to (npm without one)."""
    app_dir = Path(app_dir)
    locks = [name for name in LOCK_FILES if (app_dir / name).is_file()]
    declared = str(read_package_json(app_dir).get("packageManager") or "")
    m = re.match(r"^(npm|yarn|pnpm)@([0-9]+\.[0-9]+\.[0-9]+(?:-[0-9A-Za-z.-]+)?)(?:\+\S*)?$", declared)
    declared_name, declared_version = (m.group(1), m.group(2)) if m else ("", "")
    field = "app.commands.package_manager"
    if configured:
        if configured not in PACKAGE_MANAGERS:
            raise PackagerError(f"{field}: {configured!r} is not one of {', '.join(PACKAGE_MANAGERS)}")
        name = configured
    else:
        kinds = sorted({LOCK_FILES[lock] for lock in locks})
        if len(kinds) > 1:
            raise PackagerError(f"{field}: lock files of several package managers in {app_dir} ({', '.join(locks)}); "
                                "set it to the one the app uses")
        name = kinds[0] if kinds else (declared_name or "npm")
    own_locks = [lock for lock in locks if LOCK_FILES[lock] == name]
    lockfile = own_locks[0] if own_locks else ""
    version = declared_version if declared_name == name else ""
    if name == "npm":
        return PackageManager("npm", "npm", "", lockfile)
    if name == "pnpm":
        if not version:
            lock_version = ""
            if lockfile:
                head = (app_dir / lockfile).read_text(errors="replace")[:200]
                lm = re.search(r"lockfileVersion:\s*'?(\d+)", head)
                lock_version = lm.group(1) if lm else ""
            version = PNPM_FOR_LOCKFILE.get(lock_version, PNPM_DEFAULT)
        return PackageManager("pnpm", "pnpm", version, lockfile)
    rc = _yarnrc(app_dir)
    berry = (app_dir / ".yarnrc.yml").is_file() or bool(lockfile and "__metadata:" in
                                                        (app_dir / lockfile).read_text(errors="replace")[:2000])
    if not berry and not (version and not version.startswith("1.")):
        return PackageManager("yarn", "classic", version or YARN_CLASSIC_DEFAULT, lockfile)
    release = str(rc.get("yarnPath") or "")
    if release:
        if not (app_dir / release).is_file():
            raise PackagerError(f"{field}: .yarnrc.yml yarnPath {release!r} does not exist in {app_dir} "
                                "(commit the release: `yarn set version <version>`)")
        rm = re.search(r"yarn-(\d[^/]*)\.c?js$", release)
        return PackageManager("yarn", "berry", rm.group(1) if rm else version, lockfile, release)
    if not version:
        raise PackagerError(f"{field}: yarn Berry (.yarnrc.yml or a Berry yarn.lock) with no committed release "
                            "(.yarnrc.yml yarnPath) and no version in package.json's packageManager field; commit it "
                            "with `yarn set version <version>` or set packageManager: yarn@<version>")
    return PackageManager("yarn", "berry", version, lockfile)


def tool_bin_dir(pm: PackageManager) -> Path | None:
    """Where the package manager's executable is found (prepended to PATH), or None for the machine's npm."""
    if pm.flavor == "npm":
        return None
    if pm.release:
        return paths.state_dir() / "tools" / "yarn-release"
    return paths.state_dir() / "tools" / pm.registry_package.replace("/", "+") / "node_modules" / ".bin"


def provide(pm: PackageManager, log, timeout_s: float) -> dict[str, str]:
    """Make the package manager runnable; returns the variables every app command then needs (PATH, ...)."""
    from ops_pipeline.platform.commands import Command, run  # commands is the runner; packagers stays data

    bin_dir = tool_bin_dir(pm)
    if bin_dir is None:
        return {}
    if pm.release:
        bin_dir.mkdir(parents=True, exist_ok=True)
        shim = bin_dir / "yarn"
        body = '#!/bin/sh\n# the app\'s committed yarn release (OPS_YARN_RELEASE, set per command)\nexec node "$OPS_YARN_RELEASE" "$@"\n'
        if not shim.is_file() or shim.read_text() != body:
            tmp = bin_dir / f".yarn-{os.getpid()}"
            tmp.write_text(body)
            tmp.chmod(0o755)
            tmp.rename(shim)
    else:
        prefix = bin_dir.parent.parent
        if not (bin_dir / pm.name).exists():
            log(f"{pm.label}: installing {pm.registry_package} from the npm registry into {prefix}")
            prefix.mkdir(parents=True, exist_ok=True)
            (prefix / "package.json").write_text('{"private": true}\n')
            # --ignore-scripts: yarn's only script (preinstall) concerns global installs; pnpm has none
            run(Command(["npm", "install", "--no-audit", "--no-fund", "--no-save", "--ignore-scripts", "--prefix", str(prefix),
                         pm.registry_package], timeout_s=timeout_s, label=f"install {pm.registry_package}"), log=log)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "COREPACK_ENABLE_STRICT": "0"}
    if pm.flavor == "berry":
        env["YARN_ENABLE_TELEMETRY"] = "0"
    return env


def per_directory_env(pm: PackageManager, cwd: Path) -> dict[str, str]:
    """Variables that depend on the folder a command runs in (the committed yarn release's absolute path)."""
    return {"OPS_YARN_RELEASE": str(Path(cwd) / pm.release)} if pm.release else {}


def plug_n_play(pm: PackageManager, app_dir: Path) -> bool:
    """yarn Berry without `nodeLinker: node-modules`: dependencies are zips in .yarn/cache loaded through .pnp.cjs."""
    return pm.flavor == "berry" and str(_yarnrc(app_dir).get("nodeLinker") or "pnp") == "pnp"


def production_env(pm: PackageManager, bundle: Path) -> dict[str, str]:
    """Variables of the production install inside a bundle: a Plug'n'Play bundle keeps its own cache (the global
    one would be outside the bundle)."""
    env = per_directory_env(pm, bundle)
    if plug_n_play(pm, bundle):
        env["YARN_ENABLE_GLOBAL_CACHE"] = "false"
    return env


def tidy_bundle(pm: PackageManager, bundle: Path) -> None:
    """Remove what a production install leaves that the app never reads and that differs from one install to the
    next (it would change the content hash of identical bundles)."""
    if pm.flavor == "berry":
        (bundle / ".yarn" / "install-state.gz").unlink(missing_ok=True)


@dataclass(frozen=True)
class Step:
    name: str
    run: str
    tests: bool = False
    junit: str = ""


def plan_steps(commands, pm: PackageManager, scripts: dict[str, str]) -> list[Step]:
    """The ordered steps of `app.commands` for an app with these package.json scripts.

    Raises PackagerError naming the field when a step has no command and none can be derived."""
    overrides = {n: getattr(commands, n) for n in DEFAULT_ORDER if getattr(commands, n) is not None}

    def default_run(name: str, where: str) -> str:
        if name == "install":
            return pm.install()
        if name in scripts:
            return pm.run_script(name)
        if name == "audit":
            return pm.audit()
        raise PackagerError(f"{where}: step {name!r} has no `run` and package.json has no {name!r} script "
                            f"(scripts: {', '.join(sorted(scripts)) or 'none'})")

    steps: list[Step] = []
    if commands.steps:
        for i, s in enumerate(commands.steps):
            where = f"app.commands.steps[{i}].run"
            run = overrides.get(s.name, s.run) if s.name in overrides else (s.run or default_run(s.name, where))
            if not run.strip():
                continue
            tests = s.tests if s.tests is not None else (s.name == "test" or bool(s.junit))
            steps.append(Step(s.name, run, tests, s.junit))
        return steps
    for name in DEFAULT_ORDER:
        if name in overrides:
            run = overrides[name]
        elif name == "install" or name in scripts:
            run = default_run(name, f"app.commands.{name}")
        else:
            continue
        if run.strip():
            steps.append(Step(name, run, name == "test"))
    return steps


def commands_problems(commands, app_dir: Path | None) -> list[str]:
    """Every problem in `app.commands` (and, with the app folder, what it implies), each naming its field."""
    problems: list[str] = []
    if commands.package_manager and commands.package_manager not in PACKAGE_MANAGERS:
        problems.append(f"app.commands.package_manager: {commands.package_manager!r} is not one of "
                        f"{', '.join(PACKAGE_MANAGERS)} (empty: from the lock file)")
    seen: set[str] = set()
    for i, s in enumerate(commands.steps):
        if not STEP_NAME.fullmatch(s.name or ""):
            problems.append(f"app.commands.steps[{i}].name: {s.name!r} must be lower-case letters, digits, '_', ':', '-'")
        elif s.name in seen:
            problems.append(f"app.commands.steps[{i}].name: {s.name!r} appears twice")
        seen.add(s.name)
        if s.junit and (s.junit.startswith("/") or ".." in Path(s.junit).parts):
            problems.append(f"app.commands.steps[{i}].junit: {s.junit!r} must be a relative path inside the app folder")
    for name in commands.allow_scripts:
        if not NPM_PACKAGE.fullmatch(name or ""):
            problems.append(f"app.commands.allow_scripts: {name!r} is not a package name (name or name@exact-version)")
    if app_dir is None or not (app_dir / "package.json").is_file():
        return problems
    try:
        pm = detect(app_dir, commands.package_manager if commands.package_manager in PACKAGE_MANAGERS else "")
        plan_steps(commands, pm, scripts_of(app_dir))
    except PackagerError as exc:
        problems.append(str(exc))
    return problems


# --- install scripts: allowed packages, and what npm / pnpm said about the ones it skipped ---

def allow_scripts_env(pm: PackageManager, allowed: list[str], work_dir: Path) -> dict[str, str]:
    """Variables that let `allowed` dependencies run their install scripts (npm and pnpm).

    npm refuses --allow-scripts (and its npm_config_ variable) in a project install and reads the list from the
    project's package.json allowScripts or an .npmrc; pnpm 10 reads onlyBuiltDependencies from package.json,
    pnpm-workspace.yaml or an .npmrc, and ignores it on the command line and in the environment. Both read the
    user .npmrc named by npm_config_userconfig: the list goes into a copy of the user's own (~/.npmrc), so the
    app's package.json and project .npmrc keep their say."""
    if not allowed or pm.flavor not in ("npm", "pnpm"):
        return {}
    user_rc = Path(os.environ.get("npm_config_userconfig") or os.environ.get("NPM_CONFIG_USERCONFIG")
                   or Path.home() / ".npmrc")
    own = user_rc.read_text() if user_rc.is_file() else ""
    if pm.flavor == "npm":
        lines = [f"allow-scripts={','.join(allowed)}"]
    else:
        lines = [f"only-built-dependencies[]={name}" for name in allowed]
    work_dir.mkdir(parents=True, exist_ok=True)
    rc = work_dir / f"{pm.flavor}-allow-scripts.npmrc"
    rc.touch(mode=0o600)  # the user's .npmrc may hold registry tokens
    rc.write_text(own.rstrip("\n") + ("\n" if own else "") + "\n".join(lines) + "\n")
    return {"npm_config_userconfig": str(rc)}


_NPM_UNREVIEWED = re.compile(r"npm (?:warn|error) install-scripts\s+(?P<pkg>(?:@[^\s@/]+/)?[^\s@]+@\S+)\s+\((?P<what>[^)]*)\)")
_NPM_STRICT = re.compile(r"npm error\s+(?P<pkg>(?:@[^\s@/]+/)?[^\s@]+@[^\s(]+)\s+\(install: ")
_PNPM_IGNORED = re.compile(r"Ignored build scripts:\s*(?P<pkgs>[^│\n]+)")
_NPM_SCRIPT_FAILED = re.compile(r"npm error path .*node_modules/(?P<pkg>(?:@[^/\s]+/)?[^/\s]+)\s*$", re.M)
_DOWNLOAD = re.compile(r"(ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|getaddrinfo|fetch failed|"
                       r"Could not resolve host|socket hang up|self[- ]signed certificate|unable to get local issuer)", re.I)


@dataclass
class ScriptReport:
    skipped: list[str]  # dependencies whose install scripts did not run (or need a decision)
    failed: str = ""  # the dependency whose install script failed
    download: str = ""  # the line showing it tried to reach the network

    def explain(self, pm: PackageManager) -> str:
        parts = []
        if self.failed:
            parts.append(f"the install script of dependency {self.failed} failed"
                         + (f" while trying to download ({self.download.strip()[:160]}): only the npm registry is "
                            "reachable from here; if the app does not need it, skip it with ignore-scripts=true in the "
                            "app's .npmrc (it goes into the release bundle too), or vendor the binary"
                            if self.download else ""))
        if self.skipped:
            fix = ("list them in app.commands.allow_scripts (or the app's package.json allowScripts)"
                   if pm.name in ("npm", "pnpm") else "set dependenciesMeta.<name>.built in package.json")
            parts.append(f"{pm.name} reported dependency install scripts outside its allowed list: "
                         f"{', '.join(self.skipped)} (npm 12 and pnpm 10 skip them, npm 11 warns; --strict-allow-scripts "
                         f"fails); if the app needs them, {fix}")
        return "; ".join(parts)


def install_script_report(output: str) -> ScriptReport:
    skipped: list[str] = []
    for m in _NPM_UNREVIEWED.finditer(output):
        skipped.append(m.group("pkg"))
    for m in _NPM_STRICT.finditer(output):
        skipped.append(m.group("pkg"))
    for m in _PNPM_IGNORED.finditer(output):
        skipped += [p.strip().rstrip(".") for p in m.group("pkgs").split(",") if p.strip().rstrip(".")]
    failed = ""
    fm = _NPM_SCRIPT_FAILED.search(output)
    if fm and "npm error command" in output:
        failed = fm.group("pkg")
    pm_fail = re.search(r"node_modules/(?:\.pnpm/)?(?P<pkg>(?:@[^/\s]+/)?[^/\s:]+)[^\n]*(?:postinstall|install|preinstall)"
                        r"(?:\$| script)?[^\n]*(?:failed|Failed|ELIFECYCLE)", output)
    if not failed and pm_fail:
        failed = pm_fail.group("pkg")
    dm = _DOWNLOAD.search(output)
    download = ""
    if dm:
        line_start = output.rfind("\n", 0, dm.start()) + 1
        line_end = output.find("\n", dm.end())
        download = output[line_start: line_end if line_end >= 0 else len(output)]
    return ScriptReport(list(dict.fromkeys(skipped)), failed, download if failed else "")
