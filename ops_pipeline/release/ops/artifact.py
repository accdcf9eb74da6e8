"""build_image: the deployable artifact, named by the git commit (short SHA + dirty flag).

On the PM2 target it is an immutable release bundle: the app folder as its build left it (or the configured
bundle paths), its package manager's files, and production-only dependencies installed with that package
manager, in `<state>/artifacts/<app>-<sha>[-dirty]-<content hash>/`, read-only, with the sha256 of its content
recorded. The same content is never built twice. On container targets it is an OCI image
built through the Docker Engine API and pushed to the registry.
"""

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path

import dagster as dg

from ops_pipeline.platform import paths
from ops_pipeline.platform.commands import Command, CommandError, run
from ops_pipeline.platform.failures import failure
from ops_pipeline.platform.packagers import (
    LOCK_FILES,
    PACKAGE_MANAGER_FILES,
    PackageManager,
    install_script_report,
    production_env,
    tidy_bundle,
)
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import DeployTargetKind, ReleaseSpec
from ops_pipeline.release.ops.tests import command_env, package_manager
from ops_pipeline.targets.base import Artifact
from ops_pipeline.targets.docker.engine import DockerEngine, ImageBuildError


def content_hash(root: Path) -> tuple[str, int, int]:
    """sha256 over every file's relative path, mode and bytes (sorted), plus symlink targets. (hash, bytes, files)"""
    h = hashlib.sha256()
    total = files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                h.update(f"L {rel} -> {os.readlink(p)}\n".encode())
                continue
            h.update(f"F {rel} {st.st_mode & 0o111:o} {st.st_size}\n".encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            total += st.st_size
            files += 1
        for name in sorted(dirnames):
            p = Path(dirpath) / name
            if p.is_symlink():
                h.update(f"L {p.relative_to(root).as_posix()} -> {os.readlink(p)}\n".encode())
    return h.hexdigest(), total, files


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(p.stat().st_mode & ~0o222)


# Left out of the default bundle (the whole app folder): dependencies are installed into the bundle for production,
# and these are version control, local secrets, test output and caches, never the running app.
BUNDLE_EXCLUDE = ("node_modules", ".git", ".hg", ".svn", ".env", ".env.*", "coverage", ".nyc_output", ".test-dist",
                  ".cache", ".ops", ".turbo", ".pnpm-store", ".yarn/cache", ".yarn/unplugged", ".yarn/install-state.gz",
                  ".DS_Store", "*.log")
# Paths of a listed bundle that may be absent without failing the build.
OPTIONAL_BUNDLE_PATHS = ("ecosystem.config.js", "package-lock.json")


def bundle_entries(app_dir: Path, bundle_paths: list[str], pm: PackageManager) -> list[str]:
    """Relative paths copied into the bundle: `bundle_paths` (or the whole folder) plus package.json, the lock file
    and the package manager's own files, which the production install and the app's runtime read."""
    always = ["package.json", *([pm.lockfile] if pm.lockfile else []), *PACKAGE_MANAGER_FILES]
    if bundle_paths:
        listed = list(bundle_paths)
    else:
        listed = sorted(p.name for p in app_dir.iterdir() if not _excluded(p.name))
    inside = lambda p: any(p == entry or p.startswith(entry.rstrip("/") + "/") for entry in listed)  # noqa: E731
    return [*dict.fromkeys(listed), *(p for p in dict.fromkeys(always) if (app_dir / p).exists() and not inside(p))]


def _excluded(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, pat) or ("/" not in pat and fnmatch.fnmatchcase(name, pat)) for pat in BUNDLE_EXCLUDE)


def _copy_into(app_dir: Path, rel: str, staging: Path, whole_folder: bool) -> None:
    src = app_dir / rel
    dst = staging / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not src.is_symlink():
        def ignore(directory: str, names: list[str]) -> list[str]:
            base = Path(directory).relative_to(app_dir).as_posix()
            return [n for n in names if _excluded(f"{base}/{n}" if base != "." else n)]

        shutil.copytree(src, dst, symlinks=True, ignore=ignore if whole_folder else None, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)


def _deps_key(spec: ReleaseSpec, pm: PackageManager, command: str, staging: Path) -> str:
    h = hashlib.sha256(f"{pm.label}\0{command}\0{','.join(spec.app.commands.allow_scripts)}".encode())
    for name in ("package.json", *LOCK_FILES, *PACKAGE_MANAGER_FILES):
        p = staging / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def install_production(spec: ReleaseSpec, staging: Path, store: Path, log, redactor: Redactor | None,
                       pm: PackageManager, command: str) -> None:
    """Runtime dependencies into the bundle with the app's package manager. Keyed by the lock file, the package
    manager's files and the command, like a container layer: an unchanged key reuses the previous install
    (hard links) instead of installing again."""
    key = _deps_key(spec, pm, command, staging)
    cache = store / ".deps" / key[:24] / "node_modules"
    if cache.is_dir():
        shutil.copytree(cache, staging / "node_modules", copy_function=paths.link_or_copy, symlinks=True)
        log(f"production dependencies unchanged (key {key[:12]}): reused, no install")
        return
    extra_env, hidden = command_env(spec, pm, log)
    extra_env["NODE_ENV"] = "production"
    extra_env.update(production_env(pm, staging))
    log(f"production dependencies with {pm.label}: $ {command}")
    try:
        run(Command(command, cwd=str(staging), env=extra_env, unset=tuple(hidden),
                    timeout_s=spec.app.commands.timeout_s, label="install production dependencies"),
            log=log, redactor=redactor)
    except CommandError as exc:
        why = install_script_report(exc.result.output).explain(pm) if exc.result is not None else ""
        raise CommandError(f"{exc}" + (f"\n{why}" if why else ""), exc.result) from None
    tidy_bundle(pm, staging)
    if (staging / "node_modules").is_dir():
        tmp = cache.parent.parent / f".tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(staging / "node_modules", tmp / "node_modules", copy_function=paths.link_or_copy,
                            symlinks=True)
        except BaseException:  # e.g. a full disk: no half-filled cache entry left behind
            if tmp.exists():
                _force_rmtree(tmp)
            raise
        cache.parent.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(cache.parent)
        except OSError:  # another build filled the cache first
            _force_rmtree(tmp)


def build_bundle(spec: ReleaseSpec, log, redactor: Redactor | None = None) -> Artifact:
    app_dir = Path(spec.app_dir)
    app = spec.app
    pm = package_manager(spec)
    started = time.monotonic()
    store = paths.artifacts_dir()
    store.mkdir(parents=True, exist_ok=True)
    staging = store / f".staging-{uuid.uuid4().hex[:10]}"
    staging.mkdir()
    try:
        missing = [p for p in app.bundle_paths if not (app_dir / p).exists()]
        required_missing = [p for p in missing if p not in OPTIONAL_BUNDLE_PATHS]
        if required_missing:
            raise failure(f"app.bundle_paths: missing in {app_dir}: {', '.join(required_missing)} "
                             "(did the build command produce them?)")
        entries = bundle_entries(app_dir, list(app.bundle_paths), pm)
        for rel in entries:
            if (app_dir / rel).exists() or (app_dir / rel).is_symlink():
                _copy_into(app_dir, rel, staging, whole_folder=not app.bundle_paths)
        production = app.commands.install_production
        production = pm.install_production() if production is None else production
        if production.strip():
            install_production(spec, staging, store, log, redactor, pm, production)
        digest, size, files = content_hash(staging)
        commit = spec.commit or "nogit"
        artifact_id = f"{app.name}-{commit}{'-dirty' if spec.dirty else ''}-{digest[:12]}"
        final = store / artifact_id
        reused = final.is_dir() and (store / f"{artifact_id}.json").exists()
        if reused:
            shutil.rmtree(staging, ignore_errors=True)
            os.utime(store / f"{artifact_id}.json")  # counts as new for the retention (prune_artifacts)
            log(f"artifact {artifact_id} already built (same content), reused")
        else:
            if final.exists():
                _force_rmtree(final)
            _make_read_only(staging)
            staging.rename(final)
        artifact = Artifact(kind="bundle", id=artifact_id, ref=str(final), commit=commit, dirty=spec.dirty,
                            content_hash=f"sha256:{digest}", size_bytes=size, built_s=round(time.monotonic() - started, 2),
                            reused=reused)
        if not reused:
            _write_registration(store / f"{artifact_id}.json", {**artifact.to_json(), "files": files,
                                                                "created_at": time.time()}, final)
        return artifact
    except CommandError as exc:
        if _no_space(exc) or _no_space_in(exc.result.output if exc.result is not None else ""):
            raise failure(_no_space_message(store, exc)) from None
        raise failure(f"building the release bundle failed: {exc}") from None
    except OSError as exc:  # shutil.Error (a copytree's collected errors) is an OSError too
        if _no_space(exc):
            raise failure(_no_space_message(store, exc)) from None
        raise
    finally:
        if staging.exists():
            _force_rmtree(staging)


def _write_registration(path: Path, record: dict, final: Path) -> None:
    """`<id>.json` registers a built artifact: written to a temporary name and renamed into place, so a full disk
    never leaves a truncated registration beside a complete-looking folder (the next build would reuse it). When it
    cannot be written, the unregistered folder is removed too."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if final.exists():
            _force_rmtree(final)
        raise


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _no_space_in(str(exc))


def _no_space_in(text: str) -> bool:
    return "ENOSPC" in text or "No space left on device" in text or "Disk quota exceeded" in text


def _no_space_message(store: Path, exc: BaseException) -> str:
    try:
        usage = shutil.disk_usage(store)
        room = f"{usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB"
    except OSError:
        room = "free space unknown"
    detail = str(exc).strip().splitlines()
    return (f"building the release bundle failed: no space left on the artifacts disk ({store}, {room}; ENOSPC). "
            "Nothing was registered and the staging folder was removed; free space there (or point OPS_STATE_DIR at a "
            f"larger disk) and release again.\n{detail[-1][:300] if detail else ''}")


def prune_artifacts(app_name: str, keep_n: int, in_use: set[str], log) -> list[str]:
    """Retention of the app's release bundles: the newest `keep_n` (by their record's time; a reused artifact counts
    as new) and every one a release folder in `in_use` holds are kept, the rest is removed, record first (an
    artifact without its record is never reused). Without it every new version's bundle stayed forever."""
    store = paths.artifacts_dir()
    if not store.is_dir():
        return []
    name = re.compile(re.escape(app_name) + r"-[^-]+(-dirty)?-[0-9a-f]{12}\.json")
    records = sorted((p for p in store.iterdir() if name.fullmatch(p.name)), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for record in records[keep_n:]:
        artifact_id = record.name[:-len(".json")]
        if artifact_id in in_use:
            continue
        try:
            record.unlink(missing_ok=True)
            if (store / artifact_id).exists():
                _force_rmtree(store / artifact_id)
        except OSError as exc:
            log(f"artifact {artifact_id} not pruned: {exc}")
            continue
        removed.append(artifact_id)
    if removed:
        log(f"pruned artifacts: {', '.join(removed)} (kept the newest {keep_n} and those of the release folders)")
    return removed


def _force_rmtree(path: Path) -> None:
    def onerror(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o755)
        os.chmod(p, 0o755)
        func(p)

    shutil.rmtree(path, onerror=onerror)


@dg.op(
    description=(
        "Builds the deployable artifact named by the git commit (short SHA + dirty flag): an immutable release "
        "bundle with its content hash on the PM2 target, an OCI image (built through the Docker Engine API, tagged "
        "with the commit and the version, pushed, digest recorded) on container targets."
    ),
    tags={"stage": "build"},
)
def build_image(context: dg.OpExecutionContext, spec: ReleaseSpec, docker_engine: DockerEngine) -> Artifact:
    if spec.target.kind == DeployTargetKind.pm2:
        artifact = build_bundle(spec, context.log.info)
    else:
        try:
            artifact = docker_engine.build_release_image(spec, context.log.info)
        except ImageBuildError as exc:
            raise failure(str(exc)) from None
    md = {
        "artifact": artifact.id,
        "kind": artifact.kind,
        "ref": artifact.ref,
        "commit": f"{artifact.commit}{' (dirty)' if artifact.dirty else ''}",
        "content_hash": artifact.content_hash,
        "size_bytes": artifact.size_bytes,
        "build_s": artifact.built_s,
        "reused": artifact.reused,
    }
    if artifact.digest_ref:
        md["digest_ref"] = artifact.digest_ref
    if artifact.image_id:
        md["image_id"] = artifact.image_id
    context.add_output_metadata(md)
    context.log.info(f"artifact {artifact.id} ({artifact.size_bytes / 1e6:.1f} MB) {'reused' if artifact.reused else 'built'} "
                     f"in {artifact.built_s:.1f} s")
    return artifact
