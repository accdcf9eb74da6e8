"""What every deploy target offers: what is serving, roll this artifact out, where to probe.

PM2, Docker and Kubernetes differ only behind this small surface. A rollout is always one instance at
a time: start one new instance, wait until it is healthy on its own, then take one old instance out
(drained), repeat. A new instance that never gets healthy stops the rollout with the old ones serving.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class Artifact:
    """The deployable thing `build_image` produced: a release bundle folder or an OCI image."""

    kind: str  # "bundle" | "image"
    id: str  # e.g. node-api-3f2a9c1-dirty-1a2b3c4d5e6f, or the image reference
    ref: str  # bundle path, or image reference (repo:tag) / digest reference
    commit: str
    dirty: bool
    content_hash: str  # sha256 of the bundle's files, or the image digest
    size_bytes: int = 0
    image_id: str = ""
    digest_ref: str = ""  # repo@sha256:... when pushed
    built_s: float = 0.0
    reused: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Artifact:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Instance:
    id: str  # pm_id, container id, pod name
    name: str
    version: str
    status: str  # online / running / starting / errored / ...
    probe_url: str  # this instance's own health URL ("" if it cannot be probed alone)
    restarts: int = 0
    deploy_id: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class RolloutStep:
    action: str  # "started", "healthy", "removed", "failed", "aborted"
    instance: str
    version: str
    seconds: float
    detail: str = ""


@dataclass
class RolloutReport:
    version: str
    previous_versions: list[str]
    steps: list[RolloutStep] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    instances: list[str] = field(default_factory=list)
    standby: dict = field(default_factory=dict)  # Standby.to_json() of what the rollout left warm (empty: none)
    canary: list[dict] = field(default_factory=list)  # each canary step's analysis (figures, verdict), in order

    def add(self, action: str, instance: str, version: str, started: float, detail: str = "") -> None:
        self.steps.append(RolloutStep(action, instance, version, round(time.monotonic() - started, 3), detail))

    @property
    def duration_s(self) -> float:
        return (self.finished_at or time.time()) - self.started_at

    def order(self) -> list[str]:
        return [f"{s.action} {s.instance} ({s.version}) at +{s.seconds:.1f}s" for s in self.steps]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Swap:
    """One step of a rollout: the new instance of `slot` joins as the old instance `retire` leaves. `slot` None: only
    `retire` leaves (more old instances than slots); `retire` None: nothing leaves (more slots than old instances)."""

    slot: int | None
    retire: str | None


def rollout_plan(old: Sequence[str], instances: int) -> list[Swap]:
    """The order of a rollout, decided before anything runs: slot i's new instance takes old[i]'s place, one swap at
    a time, and old instances beyond the slots leave at the end (scale down). Every target follows this plan."""
    plan = [Swap(slot, old[slot] if slot < len(old) else None) for slot in range(instances)]
    return plan + [Swap(None, name) for name in old[instances:]]


@dataclass
class Standby:
    """The previous version's instances kept running out of traffic after a release (the warm standby), and what a
    traffic switch to them left behind: `retiring` (the replaced instances, out of traffic, not stopped yet) and
    `switched` ({at, by, from_version, to_version})."""

    version: str = ""
    instances: list[dict] = field(default_factory=list)  # {name, id, port, deploy_id, rss_bytes}
    made_at: float = 0.0
    expires_at: float = 0.0
    window_s: float = 0.0
    replaced_by: str = ""
    generation: str = ""  # deploy id of the rollout that made it
    rss_measured_at: float = 0.0
    retiring: list[dict] = field(default_factory=list)
    switched: dict = field(default_factory=dict)

    @property
    def rss_bytes(self) -> int:
        return sum(int(i.get("rss_bytes") or 0) for i in self.instances)

    def expired(self, now: float | None = None) -> bool:
        return bool(self.instances) and (now or time.time()) >= self.expires_at

    def available_for(self, version: str, now: float | None = None) -> bool:
        return bool(self.instances) and self.version == version and not self.expired(now)

    def summary(self, now: float | None = None) -> str:
        if not self.instances:
            return "none"
        left = self.expires_at - (now or time.time())
        ports = ", ".join(str(i.get("port")) for i in self.instances)
        when = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
        return (f"{self.version} x{len(self.instances)} out of traffic (ports {ports}), "
                f"{self.rss_bytes / 2**20:.0f} MB RSS, {when}")

    def to_json(self) -> dict:
        return {**asdict(self), "rss_bytes": self.rss_bytes}

    @classmethod
    def from_json(cls, data: dict) -> Standby:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class SwitchResult:
    """A traffic switch to the standby: `ok` when only the standby's version serves now; else `detail` says why not."""

    ok: bool
    version: str
    detail: str
    routed: list[str] = field(default_factory=list)  # instances nginx routes to now
    retiring: list[str] = field(default_factory=list)  # instances taken out by the switch
    stopped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    already: bool = False  # the traffic was already on the standby (an earlier switch): nothing changed

    def to_json(self) -> dict:
        return asdict(self)


class RolloutError(RuntimeError):
    """The rollout stopped. `serving` says what is serving now (the old version, when it could be kept)."""

    def __init__(self, message: str, report: RolloutReport, serving: list[Instance] | None = None,
                 log_tail: str = "") -> None:
        super().__init__(message)
        self.report = report
        self.serving = serving or []
        self.log_tail = log_tail  # the failing instance's last log lines, already redacted


class DeployTarget(ABC):
    """One environment's runtime: PM2 on this host, containers on a Docker Engine, or a Kubernetes Deployment.

    Every target is built the same way, `Target(spec, runtime, prober, redactor)` (`DeployTargets.for_spec` does it:
    `runtime` is the resource of its system), fails with `RolloutError`, waits for each new instance with the one
    health wait (`HttpProber.wait_healthy`), and reports each instance's own health URL in `Instance.probe_url`."""

    kind: str = "?"

    @abstractmethod
    def serving(self) -> list[Instance]:
        """The app's instances as the runtime reports them now (read from the runtime, not remembered)."""

    @abstractmethod
    def prepare(self, artifact: Artifact, version: str, log: LogFn) -> str:
        """Make the artifact available where it runs (release folder, image pulled) without serving it. Returns
        what the instances will run: the release folder, or the image reference."""

    @abstractmethod
    def rollout(self, artifact: Artifact, version: str, app_env: dict[str, str], log: LogFn, *,
                surge_all: bool = False) -> RolloutReport:
        """Replace the serving instances by `version`, one at a time, without dropping requests.

        `surge_all` (rollbacks: speed matters most) starts every new instance at once; old instances are still
        taken out only after new ones are healthy, so no request is dropped. Targets that cannot may ignore it."""

    @abstractmethod
    def stop(self) -> list[str]:
        """Stop everything this environment runs on the target (tests, teardown, `make down`). Returns what stopped."""

    def prune(self, keep_versions: set[str], log: LogFn) -> list[str]:
        """Remove old release material, never anything in `keep_versions`. Returns what was removed."""
        return []

    # ---- warm standby (PM2 target; a target without one keeps these defaults) -------------------------------------
    def standby(self) -> Standby | None:
        """The warm standby of this environment (or what a switch to it left to retire), None when there is none."""
        return None

    def switch_to_standby(self, version: str, log: LogFn, *, retire: bool = True, by: str = "") -> SwitchResult:
        """Route all traffic to the standby of `version` after checking it on its own (one proxy reload); with
        `retire`, the replaced instances are then drained and stopped. Never raises for a missing or unhealthy standby:
        the result says why not, and the caller redeploys."""
        return SwitchResult(False, version, f"the {self.kind} target keeps no warm standby")

    def finish_switch(self, log: LogFn) -> list[str]:
        """Drain and stop the instances a switch took out of traffic. Returns what stopped."""
        return []

    def retire_standby(self, log: LogFn, reason: str, *, only_expired: bool = False, generation: str = "") -> list[str]:
        """Stop the standby (only once expired, with `only_expired`; only that one, with `generation`). Returns what
        stopped."""
        return []

    def serving_versions(self) -> set[str]:
        return {i.version for i in self.serving() if i.status in ("online", "running", "healthy")}
