"""Retention: grandfather-father-son over verified backups only, never below a floor of verified backups."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ops_pipeline.backup.common import LogFn
from ops_pipeline.backup.store import BackupStore


@dataclass
class RetentionPolicy:
    daily: int = 7
    weekly: int = 4
    monthly: int = 6
    floor: int = 3
    keep_pre_release: int = 10


@dataclass
class RetentionPlan:
    keep: dict[str, list[str]] = field(default_factory=dict)  # backup id -> reasons
    delete: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # incomplete folders old enough to remove


def plan_retention(manifests: list[dict], policy: RetentionPolicy, *, incomplete: list[tuple[str, float]] = (),
                   now: float | None = None, orphan_age_s: float = 86400) -> RetentionPlan:
    """Grandfather-father-son over verified backups only. Never deletes the newest verified backup and never
    leaves fewer than `floor` verified backups."""
    now = now or time.time()
    verified = sorted((m for m in manifests if m.get("verified")), key=lambda m: m["finished_at"], reverse=True)
    plan = RetentionPlan()

    def keep(m: dict, why: str) -> None:
        plan.keep.setdefault(m["id"], []).append(why)

    if verified:
        keep(verified[0], "newest verified")
    for label, n, bucket in (
        ("daily", policy.daily, lambda d: d.strftime("%Y-%m-%d")),
        ("weekly", policy.weekly, lambda d: "%d-W%02d" % d.isocalendar()[:2]),
        ("monthly", policy.monthly, lambda d: d.strftime("%Y-%m")),
    ):
        seen: list[str] = []
        for m in verified:
            b = bucket(datetime.fromtimestamp(m["finished_at"], UTC))
            if b in seen:
                continue
            if len(seen) >= n:
                break
            seen.append(b)
            keep(m, f"{label} {b}")
    pre = [m for m in verified if m.get("trigger") == "pre-release"][: policy.keep_pre_release]
    for m in pre:
        keep(m, f"pre-release {m.get('release_version') or ''}".strip())
    for m in verified[: policy.floor]:
        keep(m, f"floor ({policy.floor} newest)")
    plan.delete = [m["id"] for m in verified if m["id"] not in plan.keep]
    plan.orphans = [bid for bid, mtime in incomplete if now - mtime > orphan_age_s]
    return plan


def apply_retention(store: BackupStore, scope: str, plan: RetentionPlan, log: LogFn) -> list[str]:
    deleted = []
    for bid in plan.delete + plan.orphans:
        store.delete_backup(scope, bid)
        deleted.append(bid)
        log(f"deleted backup {bid}")
    return deleted
