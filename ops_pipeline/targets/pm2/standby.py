"""The warm standby of the PM2 target: its state file and its methods (`Pm2Standby`, part of `Pm2Target`).

The state file: `<env>/standby.json`, next to the processes it describes.

PM2 cannot tell a standby instance from a serving one (a running process's environment cannot be changed), so the
target records which of its instances are out of traffic: the standby (the previous version, kept warm after a
release) and, after a traffic switch, the replaced instances still to be drained and stopped (`retiring`). Every
change is a read-modify-write under an exclusive flock on `<env>/standby.lock` (the run process and the sensor's
process may both change it), written to a temporary file and renamed over the old one, so a reader without the
lock (`read`) sees the old state or the new one, never half of it.

`<env>/rollout.lock` is held by a rollout for its whole length: a traffic switch asked for by a sensor takes it
without waiting and refuses when it is held, so a release in progress is never touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from ops_pipeline.platform.commands import CommandError
from ops_pipeline.targets.base import Instance, LogFn, RolloutError, RolloutReport, Standby, SwitchResult


class StandbyStore:
    def __init__(self, env_dir: Path) -> None:
        self.path = env_dir / "standby.json"
        self.lock_path = env_dir / "standby.lock"
        self.rollout_lock_path = env_dir / "rollout.lock"

    def read(self) -> Standby:
        try:
            return Standby.from_json(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return Standby()

    def _write(self, state: Standby) -> None:
        tmp = self.path.with_name(f".standby.{uuid.uuid4().hex[:8]}.json")
        tmp.write_text(json.dumps(state.to_json(), indent=2))
        os.replace(tmp, self.path)

    @contextmanager
    def locked(self) -> Iterator[Standby]:
        """The state, for a change: written back (atomically) when the block ends without an exception."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                yield state
                self._write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def rollout(self) -> Iterator[None]:
        """Held for a whole rollout (waits for another rollout of this environment to finish)."""
        self.rollout_lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rollout_lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def unless_rolling_out(self) -> Iterator[bool]:
        """True (and the rollout lock held for the block) when no rollout of this environment runs; False at once if
        one does."""
        self.rollout_lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rollout_lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class Pm2Standby:
    """The standby's part of `Pm2Target` (a mixin: it uses the target's PM2, nginx and rollout helpers). Retirement
    decides in `_drain` (`_keeps_standby`); `switch_to_standby` is the one traffic switch."""

    def standby(self) -> Standby | None:
        if not self.daemon_alive():  # its processes died with the PM2 daemon (`make down`, a reboot)
            return None
        state = self.standby_store.read()
        return state if state.instances or state.retiring else None

    def _keeps_standby(self, victim: Instance, report: RolloutReport) -> bool:
        return (self.spec.target.standby_s > 0 and bool(self._generation) and victim.version != report.version
                and victim.status == "online")

    def _keep_standby(self, victim: Instance, report: RolloutReport, started: float, log: LogFn) -> None:
        """`victim` (out of nginx already) joins this rollout's standby; the first one replaces the previous standby
        generation, which is stopped (one standby generation at a time)."""
        window = self.spec.target.standby_s
        with self.standby_store.locked() as state:
            previous = []
            if state.generation != self._generation:
                previous = state.instances + state.retiring
                state.__init__(version=victim.version, generation=self._generation, replaced_by=report.version,
                               made_at=time.time(), window_s=window)
            state.instances.append({"name": victim.name, "id": victim.id, "port": victim.extra.get("port"),
                                    "deploy_id": victim.deploy_id, "rss_bytes": 0})
            state.expires_at = time.time() + window
        report.add("standby", victim.name, victim.version, started,
                   f"out of the front proxy, kept running as the warm standby for {window:.0f} s")
        log(f"{victim.name} ({victim.version}) out of traffic, kept warm as the standby for {window:.0f} s")
        self._stop_records(previous, log, "previous standby generation replaced")

    def _stop_records(self, records: list[dict], log: LogFn, why: str) -> list[str]:
        """Stop the instances named in standby records that PM2 still runs (looked up by name: a pm_id is reused after
        a PM2 daemon restart, a name carries its deploy id)."""
        names = {r.get("name") for r in records}
        stopped = []
        for inst in [i for i in self._instances() if i.name in names] if names else []:
            self._wait_drained(inst.extra.get("port"), set())  # e.g. taken out of nginx a moment ago
            self._delete(inst, log)
            stopped.append(inst.name)
            log(f"stopped {inst.name} ({inst.version}): {why}")
        return stopped

    def _seal_standby(self, report: RolloutReport, log: LogFn) -> dict:
        """After a successful rollout: the standby's memory, measured (PM2's monit of each process, RSS); a previous
        standby generation that this rollout did not replace (no window, nothing retired) is stopped."""
        stale: list[dict] = []
        if self.spec.target.standby_s <= 0 and not self.standby_store.path.exists():
            return {}
        rss = {p.get("name"): int((p.get("monit") or {}).get("memory") or 0) for p in self._jlist()}
        with self.standby_store.locked() as state:
            if state.generation != self._generation:
                stale = state.instances + state.retiring
                state.__init__()
            else:
                for rec in state.instances:
                    rec["rss_bytes"] = rss.get(rec["name"], 0)
                state.rss_measured_at = time.time()
            sealed = Standby.from_json(state.to_json())
        if stale:
            self._stop_records(stale, log, "previous standby not replaced by this rollout")
            self.pm2("save", check=False)
        if sealed.instances:
            log(f"warm standby: {sealed.summary()}")
            return sealed.to_json()
        return {}

    def switch_to_standby(self, version: str, log: LogFn, *, retire: bool = True, by: str = "") -> SwitchResult:
        t0 = time.monotonic()
        with self.standby_store.unless_rolling_out() as free:
            if not free:
                return SwitchResult(False, version, "a rollout of this environment is in progress: it is never touched",
                                    seconds=round(time.monotonic() - t0, 3))
            try:
                result = self._switch_or_explain(version, log, by, t0)
            except (RolloutError, CommandError, OSError) as exc:
                result = SwitchResult(False, version, f"switch failed: {exc}")
            if result.ok and retire:
                result.stopped = self.finish_switch(log)
        result.seconds = round(time.monotonic() - t0, 3)
        return result

    def _switch_or_explain(self, version: str, log: LogFn, by: str, t0: float) -> SwitchResult:
        with self.standby_store.locked() as state:
            if not state.instances and state.switched.get("to_version") == version:  # idempotent
                return SwitchResult(True, version, f"traffic already on the standby of {version} (switched by "
                                    f"{state.switched.get('by') or '?'})", already=True,
                                    retiring=[r["name"] for r in state.retiring])
            return self._switch_locked(state, version, log, by, t0)

    def _switch_locked(self, state: Standby, version: str, log: LogFn, by: str, t0: float) -> SwitchResult:
        """The switch itself, under the state lock and the rollout lock: check, one reload, record."""

        def no(detail: str) -> SwitchResult:
            return SwitchResult(False, version, detail, seconds=round(time.monotonic() - t0, 3))

        if not state.instances:
            return no(f"no warm standby (target.standby_s is {self.spec.target.standby_s:g})"
                      if self.spec.target.standby_s <= 0 else "no warm standby (none kept, or already stopped)")
        if state.version != version:
            return no(f"the standby is {state.version}, not {version}")
        if state.expired():
            return no(f"the standby of {version} expired at {time.strftime('%H:%M:%S', time.gmtime(state.expires_at))}Z")
        everything = self._instances()
        by_name = {i.name: i for i in everything}
        standby = [by_name.get(r["name"]) for r in state.instances]
        missing = [r["name"] for r, i in zip(state.instances, standby) if i is None or i.status != "online"]
        if missing:
            return no(f"standby instance(s) not online in PM2: {', '.join(missing)}")
        checks: list = []
        with ThreadPoolExecutor(max_workers=len(standby)) as pool:
            checks = list(pool.map(lambda i: (i, self._wait_instance_healthy(
                i.name, i.deploy_id, i.extra["port"], version, deadline_s=min(self.spec.target.pm2.listen_timeout_s, 5.0))),
                standby))
        sick = [f"{i.name}: {w.detail()}" for i, w in checks if not w.ok]
        if sick:
            return no(f"standby of {version} not healthy on its own port(s): {'; '.join(sick)}")
        out = {r["name"] for r in state.instances + state.retiring}
        in_traffic = [i for i in everything if i.name not in out]
        keep = [i for i in in_traffic if i.version == version and i.status == "online" and i.extra.get("port")]
        leaving = [i for i in in_traffic if i not in keep]
        members = {i.name: i.extra["port"] for i in standby + keep}
        old_workers = self._route(members, log)  # the one nginx reload: from now on only `version` serves
        self._wait_not_accepting(old_workers)
        self._switch_current(version)
        state.retiring += [{"name": i.name, "id": i.id, "port": i.extra.get("port"), "deploy_id": i.deploy_id,
                            "version": i.version} for i in leaving]
        state.switched = {"at": time.time(), "by": by, "from_version": ",".join(sorted({i.version for i in leaving})),
                          "to_version": version, "old_workers": sorted(old_workers)}
        state.instances = []
        log(f"traffic switched to the warm standby of {version} ({', '.join(members)}) in "
            f"{time.monotonic() - t0:.2f} s; out of traffic: {', '.join(i.name for i in leaving) or 'nothing'}")
        return SwitchResult(True, version, f"switched to the standby of {version}", routed=sorted(members),
                            retiring=[i.name for i in leaving])

    def _wait_not_accepting(self, old_workers: set[int], timeout_s: float = 3.0) -> None:
        """nginx answers a reload once its new workers run; each old worker closes its listening sockets when it
        handles the master's QUIT, a moment later, and retitles itself "shutting down" as it does. Until then it may
        still accept a new connection (and route it to the old upstream): wait for that, so a switch is complete when
        it returns."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            workers = self.nginx.workers()
            if all(pid not in workers or "shutting down" in workers[pid] for pid in old_workers):
                return
            time.sleep(0.005)

    def finish_switch(self, log: LogFn) -> list[str]:
        state = self.standby_store.read()
        if not state.retiring:
            return []
        by_name = {i.name: i for i in self._instances()}
        old_workers = set(state.switched.get("old_workers") or [])
        stopped = []
        for rec in state.retiring:
            inst = by_name.get(rec["name"])
            if inst is not None:
                waited, left, _ = self._wait_drained(rec.get("port"), old_workers)
                self._delete(inst, log)
                stopped.append(inst.name)
                log(f"removed {inst.name} ({inst.version}) after the switch: drained in {waited:.2f} s"
                    + (f" ({left} connection(s) left)" if left else ""))
        with self.standby_store.locked() as now:
            now.retiring = [r for r in now.retiring if r["name"] not in {x["name"] for x in state.retiring}]
        self.pm2("save", check=False)
        return stopped

    def retire_standby(self, log: LogFn, reason: str, *, only_expired: bool = False, generation: str = "") -> list[str]:
        with self.standby_store.locked() as state:
            if (generation and state.generation != generation) or (only_expired and not state.expired()):
                victims = []
            else:
                victims, state.instances = state.instances, []
        stopped = self._stop_records(victims, log, reason) if victims else []
        stopped += self.finish_switch(log)
        if victims:
            self.pm2("save", check=False)
        return stopped
