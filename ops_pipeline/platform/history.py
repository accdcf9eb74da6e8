"""Release history: what is serving in each environment, what is known good, what is bad.

The record is the Dagster instance itself: every release that passes its gate, every failed release
and every rollback is a materialization of the asset `deployments/<environment>`, whose metadata holds
the version, artifact, commit, migrations applied, backup id, gate evidence and the release spec. Its
history in the UI is the audit trail, and rollback decides from it. A version that failed or was
rolled back is bad and is never a rollback target.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import dagster as dg

ASSET_PREFIX = "deployments"

RELEASED = "released"
RELEASE_FAILED = "release_failed"
ROLLED_BACK = "rolled_back"
ROLLBACK_FAILED = "rollback_failed"
EVENTS = (RELEASED, RELEASE_FAILED, ROLLED_BACK, ROLLBACK_FAILED)


def asset_key(environment: str) -> dg.AssetKey:
    return dg.AssetKey([ASSET_PREFIX, environment])


def materialization(environment: str, event: str, version: str, *, run_id: str = "", description: str = "",
                    url: str = "", **fields) -> dg.AssetMaterialization:
    """Build the history entry. `fields` are JSON-able (dicts, lists, strings, numbers)."""
    assert event in EVENTS, event
    metadata: dict = {
        "event": dg.MetadataValue.text(event),
        "version": dg.MetadataValue.text(version),
        "environment": dg.MetadataValue.text(environment),
        "recorded_at": dg.MetadataValue.timestamp(time.time()),
    }
    if run_id:
        metadata["run"] = dg.MetadataValue.dagster_run(run_id)
    if url:
        metadata["url"] = dg.MetadataValue.url(url)
    backup_id = str(fields.get("backup_id") or "")
    if backup_id.startswith("restore-point:") and "restore_point" not in fields:
        # archive mode: the release's safety point is a named restore point, restored by restore_point_in_time
        fields = {**fields, "restore_point": backup_id.split(":", 1)[1]}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            metadata[key] = dg.MetadataValue.json(value)
        elif isinstance(value, bool):
            metadata[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            metadata[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            metadata[key] = dg.MetadataValue.float(value)
        else:
            metadata[key] = dg.MetadataValue.text(str(value))
    return dg.AssetMaterialization(
        asset_key=asset_key(environment),
        description=description or f"{event}: {version}",
        metadata=metadata,
        tags={"ops/event": event},
    )


def _plain(value):
    """MetadataValue -> plain Python."""
    inner = getattr(value, "value", value)
    if hasattr(inner, "data"):  # JsonMetadataValue
        return inner.data
    if hasattr(value, "data"):
        return value.data
    if hasattr(value, "run_id"):
        return value.run_id
    return inner


@dataclass
class HistoryEvent:
    event: str
    version: str
    timestamp: float
    run_id: str
    fields: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return self.fields.get(key, default)


@dataclass
class EnvironmentHistory:
    environment: str
    events: list[HistoryEvent]  # newest first

    @property
    def bad_versions(self) -> set[str]:
        """Versions whose last word is a failure: a failed release, or rolled back from. A later successful release
        of the same version (a failed release resumed, or released again on purpose) clears it."""
        bad = set()
        for e in reversed(self.events):  # oldest first
            if e.event == RELEASE_FAILED:
                bad.add(e.version)
            elif e.event == ROLLED_BACK and e.get("from_version"):
                bad.add(e.get("from_version"))
            elif e.event == RELEASED:
                bad.discard(e.version)
        return bad

    @property
    def serving_version(self) -> str | None:
        """What the record says is serving: the newest release or rollback that completed."""
        for e in self.events:
            if e.event in (RELEASED, ROLLED_BACK):
                return e.version
        return None

    def last_good(self, exclude: set[str] | None = None) -> HistoryEvent | None:
        """The newest successful release (or rollback target) whose version is not bad."""
        skip = self.bad_versions | (exclude or set())
        for e in self.events:
            if e.event in (RELEASED, ROLLED_BACK) and e.version not in skip and e.get("spec"):
                return e
        return None

    def release_of(self, version: str) -> HistoryEvent | None:
        for e in self.events:
            if e.event in (RELEASED, ROLLED_BACK) and e.version == version and e.get("spec"):
                return e
        return None

    def latest(self) -> HistoryEvent | None:
        return self.events[0] if self.events else None

    def summary(self, n: int = 10) -> list[str]:
        return [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e.timestamp))}Z {e.event:<16} {e.version}"
                + (f" (from {e.get('from_version')})" if e.get("from_version") else "")
                for e in self.events[:n]]


def load(instance: dg.DagsterInstance, environment: str, limit: int = 500) -> EnvironmentHistory:
    result = instance.fetch_materializations(asset_key(environment), limit=limit)
    events = []
    for record in result.records:
        mat = record.asset_materialization
        if mat is None:
            continue
        md = {k: _plain(v) for k, v in mat.metadata.items()}
        event = md.pop("event", None)
        version = md.pop("version", None)
        if event not in EVENTS or not version:
            continue
        events.append(HistoryEvent(event=event, version=str(version), timestamp=record.timestamp,
                                   run_id=record.run_id, fields=md))
    return EnvironmentHistory(environment, events)


def environments(instance: dg.DagsterInstance) -> list[str]:
    keys = instance.get_asset_keys(prefix=[ASSET_PREFIX])
    return sorted({k.path[1] for k in keys if len(k.path) == 2})


def spec_json(event: HistoryEvent) -> dict | None:
    spec = event.get("spec")
    if isinstance(spec, str):
        try:
            return json.loads(spec)
        except ValueError:
            return None
    return spec
