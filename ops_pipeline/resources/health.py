"""HTTP health probes of the released service (httpx)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import dagster as dg
import httpx
from pydantic import Field


@dataclass
class Probe:
    url: str
    ok: bool  # HTTP 200 with a JSON body
    status: int | None
    version: str | None
    latency_ms: float
    error: str = ""
    body: dict | None = None
    at: float = field(default_factory=time.time)

    def healthy_for(self, version: str | None) -> bool:
        return self.ok and (version is None or self.version == version)

    def summary(self) -> str:
        if self.error:
            return f"{self.url}: {self.error} ({self.latency_ms:.0f} ms)"
        return f"{self.url}: HTTP {self.status} version={self.version} ({self.latency_ms:.0f} ms) {json.dumps(self.body)[:200] if self.body else ''}"

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


class HttpProber(dg.ConfigurableResource):
    """Probes health endpoints over HTTP. A probe never raises: any error is a failed probe."""

    user_agent: str = Field("ops-pipeline-health/1", description="User-Agent of probes.")

    def probe(self, url: str, timeout_s: float = 5.0) -> Probe:
        started = time.monotonic()
        try:
            # A fresh connection per probe: a kept-alive socket to a dying instance says nothing about the service.
            with httpx.Client(timeout=timeout_s, headers={"User-Agent": self.user_agent, "Connection": "close"}) as client:
                resp = client.get(url)
            latency = (time.monotonic() - started) * 1000
            try:
                body = resp.json()
            except ValueError:
                body = None
            version = body.get("version") if isinstance(body, dict) else None
            return Probe(url=url, ok=resp.status_code == 200 and isinstance(body, dict), status=resp.status_code,
                         version=version, latency_ms=latency, body=body if isinstance(body, dict) else None)
        except httpx.HTTPError as exc:
            return Probe(url=url, ok=False, status=None, version=None, latency_ms=(time.monotonic() - started) * 1000,
                         error=f"{type(exc).__name__}: {exc}"[:300])

    def wait_healthy(self, url: str, *, version: str | None, successes: int, interval_s: float, timeout_s: float,
                     deadline_s: float, should_abort=None) -> tuple[bool, list[Probe]]:
        """Probe until `successes` consecutive healthy answers reporting `version`, or the deadline."""
        probes: list[Probe] = []
        streak = 0
        end = time.monotonic() + deadline_s
        while True:
            p = self.probe(url, timeout_s=min(timeout_s, max(0.1, end - time.monotonic())))
            probes.append(p)
            streak = streak + 1 if p.healthy_for(version) else 0
            if streak >= successes:
                return True, probes
            if time.monotonic() + interval_s > end or (should_abort and should_abort()):
                return False, probes
            time.sleep(interval_s)
