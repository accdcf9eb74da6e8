"""PM2 target: one PM2 process per instance on this host, each on its own port, behind an nginx front proxy.

(Over 400 lines: the PM2 CLI, release folders, the rollout with its drain and its recovery are one system's
behaviour; the front proxy and the process helpers are in ../nginx.py and ../procs.py, the warm standby in
./standby.py.)

Layout per environment (`<state>/envs/<env>/` by default):

    app/releases/<version>/   hard-linked copy of the release bundle (+ release.json)
    app/current -> releases/<version>   what should be serving (moved after a rollout succeeds)
    pm2/                      PM2_HOME (the PM2 daemon of this environment)
    nginx/                    the nginx front proxy (config, pid, logs): it owns the public port
    instances/<slot>/         a folder per slot kept across releases ({instance_dir} in app.instance_env)
    logs/                     one log file per instance

The app owes the pipeline only this: listen on the port given in `app.port_env`, answer `app.health_path`. Each
instance gets its own port and is probed there on its own; nginx (`least_conn`, as in the seed) routes public traffic
only to instances that passed that check. A rollout is a surge, one slot at a time: start the new instance, wait
until it answers healthy on its own port (a broken version never sees a public request), then one nginx reload puts
it in and takes one old instance out; the old instance is stopped only after nginx's previous workers finished their
requests and no connection to it is left (so an app with no SIGINT handling loses nothing). A new instance that
never gets healthy is deleted and the old ones keep serving. State is read back from PM2 (`pm2 jlist`).

Warm standby (`target.standby_s` > 0): the old instances a successful rollout retires leave nginx but are not
stopped; they are the standby for that window, recorded in `<env>/standby.json` with their measured memory
(./standby.py: the state file and the standby's methods, mixed into this class). `serving()` is only what is in traffic; `standby()` is the standby. Retirement has one path, `_drain`, and the
standby is decided there. `switch_to_standby` is the one traffic switch: the standby answers healthy on its own ports
(the rollout's N-in-a-row check), then one nginx reload routes only to it, `current` moves, and the replaced instances
drain and stop (at once, or later with `finish_switch`). One standby generation: the next rollout's first retirement
stops the previous one, and `retire_standby` stops an expired one without a release.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
from pydantic import Field

from ops_pipeline.platform import paths
from ops_pipeline.platform.commands import CommandError, which
from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.platform.prober import HealthWait, HttpProber
from ops_pipeline.platform.redaction import Redactor
from ops_pipeline.platform.spec import ReleaseSpec
from ops_pipeline.targets.base import Artifact, DeployTarget, Instance, LogFn, RolloutError, RolloutReport, rollout_plan
from ops_pipeline.targets.nginx import HostNginx, NginxError
from ops_pipeline.targets.pm2.canary_rollout import CanaryRollout
from ops_pipeline.targets.pm2.standby import Pm2Standby, StandbyStore
from ops_pipeline.targets.procs import established_to

BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")


class Pm2Resource(dg.ConfigurableResource):
    """PM2, the Node.js process manager (cluster mode). One PM2 daemon per environment."""

    pm2_bin: str = Field("", description="pm2 executable (default: tools/node_modules/.bin/pm2, then PATH).")

    def binary(self) -> str:
        if self.pm2_bin:
            return self.pm2_bin
        found = which("pm2", [paths.project_root() / "tools" / "node_modules" / ".bin"])
        if not found:
            raise FileNotFoundError("pm2 not found: run `make setup` (installs tools/node_modules) or set pm2_bin")
        return found


class Pm2Target(Pm2Standby, DeployTarget):
    kind = "pm2"

    def __init__(self, spec: ReleaseSpec, runtime: Pm2Resource, prober: HttpProber,
                 redactor: Redactor | None = None) -> None:
        self.spec = spec
        self.pm2_bin = runtime.binary()
        self.prober = prober
        self.redactor = redactor or Redactor()
        cfg = spec.target.pm2
        env_dir = spec.env_dir()
        self.home = Path(cfg.home) if cfg.home else env_dir / "pm2"
        self.deploy_root = Path(cfg.deploy_root) if cfg.deploy_root else env_dir / "app"
        self.releases = self.deploy_root / "releases"
        self.current = self.deploy_root / "current"
        self.logs = env_dir / "logs"
        self.app_files = env_dir / "pm2-apps"
        self.instance_dirs = env_dir / "instances"
        self.nginx = HostNginx(env_dir / "nginx", spec.target.host, spec.target.port, cfg.drain_s,
                               f"{spec.app.name} in {spec.environment} (PM2 target)")
        self.standby_store = StandbyStore(env_dir)
        self._generation = ""  # deploy id of the rollout in progress (the standby it makes is that generation)

    # ---- PM2 CLI ------------------------------------------------------------------------------
    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # A clean environment: the app gets its own variables, not the orchestrator's (AWS keys, ...).
        env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        env["PM2_HOME"] = str(self.home)
        env.setdefault("HOME", str(self.home))
        if extra:
            env.update(extra)
        return env

    def pm2(self, *args: str, extra_env: dict[str, str] | None = None, log: LogFn | None = None, check: bool = True,
            timeout_s: float = 120) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        import subprocess

        try:
            proc = subprocess.run([self.pm2_bin, *args], env=self._env(extra_env), capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise CommandError(f"`pm2 {' '.join(args[:2])}` did not answer within {timeout_s:.0f} s "
                               "(is the PM2 daemon of this environment alive?)") from None
        out = self.redactor(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise CommandError(f"`pm2 {' '.join(args)}` exited with status {proc.returncode}: {out[-1500:]}")
        if log and out.strip() and args[0] not in ("jlist",):
            for line in out.strip().splitlines()[-5:]:
                if line.strip() and not line.startswith(("│", "┌", "└", "├")):
                    log(f"pm2: {line.strip()}")
        return proc.stdout

    def _jlist(self) -> list[dict]:
        if not self.daemon_alive():
            return []  # no daemon (or a stale pid file): nothing is running; `pm2 jlist` would spawn one just to ask
        out = self.pm2("jlist", check=False, timeout_s=30)
        start = out.find("[")
        try:
            return json.loads(out[start:]) if start >= 0 else []
        except json.JSONDecodeError:
            return []

    def daemon_alive(self) -> bool:
        pidfile = self.home / "pm2.pid"
        if not pidfile.exists():
            return False
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
            return True
        except (ValueError, ProcessLookupError):
            return False

    # ---- state --------------------------------------------------------------------------------
    def serving(self) -> list[Instance]:
        """The instances in traffic: every instance of the app in PM2 but the standby and those a switch took out."""
        state = self.standby_store.read()
        out = {i.get("name") for i in state.instances + state.retiring}
        return [i for i in self._instances() if i.name not in out]

    def _instances(self) -> list[Instance]:
        """Every instance of the app in this environment's PM2, in traffic or not."""
        instances = []
        for p in self._jlist():
            env = p.get("pm2_env", {})
            if env.get("OPS_APP") != self.spec.app.name or env.get("OPS_ENV") != self.spec.environment:
                continue
            port = env.get("OPS_PORT")
            status = env.get("status", "?")
            instances.append(
                Instance(
                    id=str(p.get("pm_id")),
                    name=p.get("name", ""),
                    version=env.get(self.spec.app.version_env, env.get("APP_VERSION", "?")),
                    status=status,
                    probe_url=f"http://127.0.0.1:{port}{self.spec.app.health_path}" if port else "",
                    restarts=int(env.get("restart_time", 0) or 0),
                    deploy_id=env.get("OPS_DEPLOY_ID", ""),
                    extra={"pid": p.get("pid"), "slot": env.get("OPS_SLOT"), "release_dir": env.get("pm_cwd", ""),
                           "port": int(port) if port else None},
                )
            )
        return sorted(instances, key=lambda i: (i.extra.get("slot") or "", int(i.id)))

    def current_version(self) -> str | None:
        try:
            return json.loads((self.current / "release.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None

    # ---- release folders ----------------------------------------------------------------------
    def release_dir(self, version: str) -> Path:
        return self.releases / version

    def prepare(self, artifact: Artifact, version: str, log: LogFn) -> str:
        dest = self.release_dir(version)
        if (dest / "release.json").exists():
            data = json.loads((dest / "release.json").read_text())
            if data.get("artifact_id") == artifact.id:
                log(f"release folder {dest} already holds {artifact.id}")
                return str(dest)
            raise RolloutError(
                f"release folder {dest} already holds another artifact ({data.get('artifact_id')}); versions are immutable",
                RolloutReport(version, []),
            )
        src = Path(artifact.ref)
        if not src.is_dir():
            raise RolloutError(f"artifact {artifact.id} not found at {src} (was it pruned?)", RolloutReport(version, []))
        self.releases.mkdir(parents=True, exist_ok=True)
        tmp = self.releases / f".{version}.{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        # Hard links: instant and the bundle stays byte-identical to the built artifact.
        shutil.copytree(src, tmp, copy_function=paths.link_or_copy, symlinks=True)
        (tmp / "release.json").write_text(json.dumps({
            "version": version, "artifact_id": artifact.id, "commit": artifact.commit, "dirty": artifact.dirty,
            "content_hash": artifact.content_hash, "created_at": time.time(),
        }, indent=2))
        tmp.rename(dest)
        log(f"release folder {dest} ready in {time.monotonic() - started:.2f} s")
        return str(dest)

    def _switch_current(self, version: str) -> None:
        tmp = self.deploy_root / f".current.{uuid.uuid4().hex[:8]}"
        tmp.symlink_to(Path("releases") / version)
        tmp.replace(self.current)  # atomic rename over the old link

    def artifacts_in_use(self) -> set[str]:
        """Ids of the artifacts the release folders were made from."""
        ids = set()
        for record in self.releases.glob("*/release.json") if self.releases.is_dir() else []:
            try:
                ids.add(json.loads(record.read_text())["artifact_id"])
            except (OSError, ValueError, KeyError):
                pass
        return ids

    def prune(self, keep_versions: set[str], log: LogFn) -> list[str]:
        keep_n = self.spec.target.pm2.keep_releases
        self._prune_instance_files(log)
        if not self.releases.is_dir():
            return []
        dirs = sorted((d for d in self.releases.iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: d.stat().st_mtime, reverse=True)
        protected = set(keep_versions) | {i.version for i in self._instances()}  # the standby's folder is in use
        cur = self.current_version()
        if cur:
            protected.add(cur)
        removed = []
        kept = 0
        for d in dirs:
            if d.name in protected:
                continue
            kept += 1
            if kept + len(protected) > keep_n:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        if removed:
            log(f"pruned release folders: {', '.join(removed)} (kept {keep_n}, protected {', '.join(sorted(protected))})")
        return removed

    def _prune_instance_files(self, log: LogFn) -> None:
        """Every rollout writes one PM2 app file and one log file per instance (named by its deploy): without this,
        both stayed forever, 4 files per release/rollback cycle. App files of instances no longer serving are
        removed (PM2 keeps its own copy of a started definition); logs of the serving instances and of the newest
        keep_releases x instances others are kept, for what a removed version printed."""
        serving = self._instances()  # the standby's and retiring instances' files are kept too
        live = {i.deploy_id for i in serving if i.deploy_id}
        if not live:  # nothing serves (or PM2 did not answer): keep everything
            return
        for f in self.app_files.glob("*.json") if self.app_files.is_dir() else []:
            if f.name.rsplit("-", 1)[0] not in live:
                f.unlink(missing_ok=True)
        serving_logs = {self._logfile(i.name).name for i in serving}
        logs = sorted((f for f in self.logs.glob("*.log") if f.name not in serving_logs) if self.logs.is_dir() else [],
                      key=lambda f: f.stat().st_mtime, reverse=True)
        old = logs[self.spec.target.pm2.keep_releases * max(1, self.spec.target.instances):]
        for f in old:
            f.unlink(missing_ok=True)
        if old:
            log(f"pruned {len(old)} log file(s) of removed instances")

    def _logfile(self, name: str) -> Path:
        return self.logs / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"

    # ---- rollout ------------------------------------------------------------------------------
    def _instance_name(self, slot: int, version: str, deploy_id: str) -> str:
        # Unique per rollout: `pm2 start` of an existing name restarts that process instead of adding one.
        return f"{self.spec.app.name}-{self.spec.environment}-{slot}@{version}+{deploy_id[:6]}"

    def _process(self, version: str) -> dict:
        """What PM2 runs: the spec's start command through a shell (exec'd, so signals reach the app), else node."""
        app = self.spec.app
        release = self.release_dir(version)
        cwd = release / app.start_dir if app.start_dir else release
        if app.start:
            return {"script": "/bin/sh", "args": ["-c", f"exec {app.start}"], "interpreter": "none", "cwd": str(cwd)}
        return {"script": str(release / app.entrypoint), "cwd": str(cwd)}

    def _start_instance(self, slot: int, version: str, deploy_id: str, app_env: dict[str, str], log: LogFn) -> tuple[str, int]:
        app = self.spec.app
        cfg = self.spec.target.pm2
        port = free_port()
        name = self._instance_name(slot, version, deploy_id)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.app_files.mkdir(parents=True, exist_ok=True)
        instance_dir = self.instance_dirs / str(slot)
        instance_dir.mkdir(parents=True, exist_ok=True)
        logfile = self._logfile(name)
        # Non-secret settings go in the app file; secrets only travel in the CLI's environment, so they
        # are never written to disk by us. (No `env` block may shadow them: PM2 lets it win.)
        public_env = {
            "OPS_APP": app.name,
            "OPS_ENV": self.spec.environment,
            "OPS_SLOT": str(slot),
            "OPS_DEPLOY_ID": deploy_id,
            "OPS_PORT": str(port),
            app.version_env: version,
            app.port_env: str(port),
            "SHUTDOWN_TIMEOUT_MS": str(int(app.shutdown_timeout_s * 1000)),
            **{k: v.format(slot=slot, port=port, instance_dir=instance_dir) for k, v in app.instance_env.items()},
        }
        if app.instance_port_env:
            public_env[app.instance_port_env] = str(port)
        definition = {
            "apps": [{
                "name": name,
                **self._process(version),
                "exec_mode": "fork",
                "instances": 1,
                "kill_timeout": int(cfg.kill_timeout_s * 1000),
                "max_memory_restart": cfg.max_memory_restart,
                "autorestart": True,
                "exp_backoff_restart_delay": 200,
                "merge_logs": True,
                "out_file": str(logfile),
                "error_file": str(logfile),
                "log_date_format": "YYYY-MM-DDTHH:mm:ss.SSSZ",
                "env": public_env,
            }]
        }
        app_file = self.app_files / f"{deploy_id}-{slot}.json"
        app_file.write_text(json.dumps(definition, indent=2))
        self.pm2("start", str(app_file), extra_env={**app_env, **public_env}, log=log, timeout_s=60)
        return name, port

    def _find(self, name: str, deploy_id: str) -> Instance | None:
        for i in self._instances():
            if i.name == name and i.deploy_id == deploy_id:
                return i
        return None

    def _wait_instance_healthy(self, name: str, deploy_id: str, port: int, version: str,
                               deadline_s: float | None = None) -> HealthWait:
        next_state_check = time.monotonic() + 1.5

        def stop_reason() -> str:
            # Ask PM2 (a node CLI start, ~0.3 s) only when the instance is slow to answer, then every 2 s.
            nonlocal next_state_check
            if time.monotonic() < next_state_check:
                return ""
            next_state_check = time.monotonic() + 2.0
            inst = self._find(name, deploy_id)
            if inst is None:
                return "the process disappeared from PM2"
            if inst.status == "errored" or inst.restarts >= 2:
                return f"crash loop: status {inst.status}, {inst.restarts} restarts"
            return ""

        return self.prober.wait_healthy(
            f"http://127.0.0.1:{port}{self.spec.app.health_path}", version=version, successes=2, interval_s=0.1,
            timeout_s=min(self.spec.gate.request_timeout_s, 2.0),
            deadline_s=deadline_s or self.spec.target.pm2.listen_timeout_s,
            version_from=self.spec.app.health_version, stop_reason=stop_reason)

    def _log_tail(self, name: str, lines: int = 20) -> str:
        logfile = self._logfile(name)
        try:
            text = logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return self.redactor("\n".join(text))

    def _delete(self, inst: Instance, log: LogFn) -> None:
        self._delete_id(inst.id, log)

    def _delete_id(self, pm_id: str, log: LogFn) -> None:
        # PM2 sends SIGINT, waits kill_timeout for the app to drain, then SIGKILL.
        self.pm2("delete", str(pm_id), log=log, check=False, timeout_s=self.spec.target.pm2.kill_timeout_s + 30)

    @staticmethod
    def _upstream(members: dict[str, int]) -> list[tuple[int, str]]:
        return [(port, name) for name, port in sorted(members.items(), key=lambda kv: kv[1])]

    def _route(self, members: dict[str, int], log: LogFn, weights: dict[str, int] | None = None,
               access_log: bool = False) -> set[int]:
        """nginx routes to exactly `members` from now on (a canary step: split by `weights`, name -> nginx weight, and
        logged per request); returns the previous worker generation (still finishing)."""
        by_port = {members[n]: w for n, w in (weights or {}).items() if n in members}
        try:
            return self.nginx.apply(self._upstream(members), log, weights=by_port, access_log=access_log)
        except NginxError as exc:
            raise RolloutError(f"front proxy: {exc}", RolloutReport(self.spec.version, [])) from None

    def rollout(self, artifact: Artifact, version: str, app_env: dict[str, str], log: LogFn, *,
                surge_all: bool = False, on_canary_step=None, on_canary_hold=None) -> RolloutReport:
        """The rolling deploy; with `canary.steps` in the spec (and a version serving), the canary rollout
        (canary_rollout.py); `on_canary_step(StepAnalysis)` hears each step's verdict, `on_canary_hold(StepAnalysis)`
        may hold a passed step and returns why to stop ("" carries on). Rollbacks (`surge_all`) take no canary steps.
        The rollout holds the environment's standby lock: a sensor's traffic switch never touches it."""
        with self.standby_store.rollout():
            report = self._rollout(artifact, version, app_env, log, surge_all=surge_all,
                                   on_canary_step=on_canary_step, on_canary_hold=on_canary_hold)
            report.standby = self._seal_standby(report, log)
            return report

    def _rollout(self, artifact: Artifact, version: str, app_env: dict[str, str], log: LogFn, *,
                 surge_all: bool = False, on_canary_step=None, on_canary_hold=None) -> RolloutReport:
        self.prepare(artifact, version, log)
        deploy_id = uuid.uuid4().hex[:12]
        self._generation = deploy_id
        old = [i for i in self.serving()]
        previous = self.current_version()
        host, port = self.spec.target.host, self.spec.target.port
        if not self.nginx.master_pid() and _port_in_use(host, port):
            raise RolloutError(f"target.port: {host}:{port} is already in use by a process that is not part of "
                               f"environment '{self.spec.environment}'; nothing was started", RolloutReport(version, []))
        report = RolloutReport(version=version, previous_versions=sorted({i.version for i in old}))
        started = time.monotonic()
        # The front proxy routes to what serves now: it is started on the first release (or after a reboot).
        members = {i.name: i.extra["port"] for i in old if i.extra.get("port") and i.status == "online"}
        self._route(members, log)
        log(f"rolling out {version} to {self.spec.target.instances} instance(s) on PM2 behind nginx {host}:{port} "
            f"({'all new instances at once' if surge_all else 'one at a time'}); serving now: "
            f"{', '.join(f'{i.name}[{i.status}]' for i in old) or 'nothing'}")
        try:
            if self.spec.config.canary.enabled and not surge_all and members:
                new = CanaryRollout(self, version, deploy_id, app_env, report, started, log, on_canary_step,
                                    on_canary_hold).run(old, members)
            else:
                if self.spec.config.canary.enabled and not surge_all:
                    log("canary: no version is serving yet, so there is nothing to compare with: rolling deploy")
                new = self._surge(version, deploy_id, old, members, app_env, report, started, log, surge_all=surge_all)
        except (RolloutError, CommandError, OSError) as exc:
            detail = str(exc)
            tail = getattr(exc, "log_tail", "")  # CommandError/OSError have none
            withdrawn = [i for i in self.serving() if i.deploy_id == deploy_id]
            for inst in withdrawn:
                members.pop(inst.name, None)
            if withdrawn:
                old_workers = self._route(members, log)
                self.nginx.wait_gone(old_workers, self.spec.target.pm2.drain_s)
            for inst in withdrawn:
                self._delete(inst, log)
                report.add("removed", inst.name, version, started, "new instance withdrawn")
            recovery = self._ensure_serving(previous, members, app_env, report, started, log) \
                if previous and previous != version else ""
            report.finished_at = time.time()
            serving = self.serving()
            raise RolloutError(
                f"{detail}; rollout of {version} stopped. {recovery}"
                f"{len(serving)} instance(s) still serving {', '.join(sorted({i.version for i in serving})) or 'nothing'}"
                + (f"\n{tail}" if tail else ""),
                report,
                serving,
            ) from None
        self._switch_current(version)
        self.pm2("save", check=False)
        report.instances = list(new)
        report.finished_at = time.time()
        return report

    def _surge(self, version: str, deploy_id: str, old: list[Instance], members: dict[str, int], app_env: dict[str, str],
               report: RolloutReport, started: float, log: LogFn, surge_all: bool = False) -> list[str]:
        """One slot at a time: a new instance must be healthy on its own port before one nginx reload puts it in and
        takes one old instance out; the old one then drains and stops in the background while the next new one
        starts (at most one drain at a time). With `surge_all`, every new instance starts at once and old ones leave
        as new ones turn healthy."""
        new: list[str] = []
        plan = rollout_plan([i.name for i in old], self.spec.target.instances)
        leaving = {i.name: i for i in old}
        slots = [step.slot for step in plan if step.slot is not None]
        routing = threading.Lock()
        with ThreadPoolExecutor(max_workers=1) as drainer, ThreadPoolExecutor(max_workers=len(slots)) as starter:
            drains = []

            def swap(name: str | None, port: int | None, victim: Instance | None, what: str) -> None:
                with routing:
                    if name:
                        members[name] = port
                    if victim:
                        members.pop(victim.name, None)
                    old_workers = self._route(members, log)
                if victim:
                    drains.append(drainer.submit(self._drain, victim, old_workers, report, started, log, what))

            try:
                pending = [starter.submit(self._surge_slot, slot, version, deploy_id, app_env, report, started, log)
                           for slot in slots] if surge_all else []
                for step in plan:
                    victim = leaving[step.retire] if step.retire else None
                    if step.slot is None:  # more old instances than slots (scale down)
                        swap(None, None, victim, "drained and stopped (scale down)")
                        continue
                    if surge_all:
                        name, port = pending.pop(0).result()
                    else:
                        name, port = self._surge_slot(step.slot, version, deploy_id, app_env, report, started, log)
                    new.append(name)
                    swap(name, port, victim, "drained and stopped")
            finally:
                for d in drains:
                    d.result()
        return new

    def _drain(self, victim: Instance, old_workers: set[int], report: RolloutReport, started: float, log: LogFn,
               what: str) -> None:
        """Out of nginx already: wait until nginx's previous workers finished their requests and no connection to the
        instance is left (at most drain_s), then stop it. The one retirement path of a rollout: with a standby
        window, an instance of the version being replaced is kept running out of traffic instead (`_keep_standby`)."""
        if self._keeps_standby(victim, report):
            self._keep_standby(victim, report, started, log)
            return
        waited, left, drained = self._wait_drained(victim.extra.get("port"), old_workers)
        self._delete(victim, log)
        detail = (f"{what}: drained in {waited:.2f} s" if drained and not left
                  else f"{what}: drain cut after {waited:.1f} s ({left} connection(s) left)")
        report.add("removed", victim.name, victim.version, started, detail)
        log(f"removed {victim.name} ({victim.version}): {detail}")

    def _wait_drained(self, port: int | None, old_workers: set[int]) -> tuple[float, int, bool]:
        """Wait until nginx's previous workers finished and no connection to `port` is left, at most drain_s. Returns
        (seconds waited, connections left, whether the old workers finished)."""
        t0 = time.monotonic()
        drain_s = self.spec.target.pm2.drain_s
        drained = self.nginx.wait_gone(old_workers, drain_s)
        while port and established_to(port) and time.monotonic() - t0 < drain_s:
            time.sleep(0.05)
        return time.monotonic() - t0, established_to(port) if port else 0, drained

    def _surge_slot(self, slot: int, version: str, deploy_id: str, app_env: dict[str, str], report: RolloutReport,
                    started: float, log: LogFn) -> tuple[str, int]:
        name, port = self._start_instance(slot, version, deploy_id, app_env, log)
        report.add("started", name, version, started, f"own port {port}, not in the front proxy yet")
        wait = self._wait_instance_healthy(name, deploy_id, port, version)
        detail = wait.detail()
        if not wait.ok:
            report.add("failed", name, version, started, detail)
            raise RolloutError(f"new instance {name} never became healthy on its own port ({detail}); it never "
                               "received public traffic", report,
                               log_tail=f"last log lines of {name}:\n{self._log_tail(name)}")
        report.add("healthy", name, version, started, detail)
        log(f"{name} healthy on its own port ({detail})")
        return name, port

    def _ensure_serving(self, version: str, members: dict[str, int], app_env: dict[str, str], report: RolloutReport,
                        started: float, log: LogFn) -> str:
        """After a failed rollout: if the previous version lost its instances (the PM2 daemon died), start them again."""
        alive = [i for i in self.serving() if i.version == version and i.status == "online"]
        if alive:
            return ""
        if not (self.release_dir(version) / "release.json").exists():
            return f"the previous version {version} is not serving and its release folder is gone. "
        log(f"no instance of {version} survived (PM2 daemon lost?): starting them again")
        deploy_id = uuid.uuid4().hex[:12]
        try:
            restarted = self._surge(version, deploy_id, [], members, app_env, report, started, log)
        except (RolloutError, CommandError, OSError) as exc:
            return f"restarting {version} failed too: {str(exc)[:300]}. "
        self._switch_current(version)
        self.pm2("save", check=False)
        return f"PM2 had lost every instance of {version}; restarted {len(restarted)} of them. "

    def stop(self) -> list[str]:
        """Stop this environment's front proxy, PM2 daemon and every instance (tests, teardown, `make down`)."""
        done = ["nginx"] if self.nginx.stop() else []
        if self.home.exists():
            done += [f"{i.name} ({i.version})" for i in self._instances()]
            self.pm2("kill", check=False, timeout_s=60)
            done.append("PM2 daemon")
        self.standby_store.clear()
        return done


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0
