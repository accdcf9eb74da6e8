"""HTTP health probes of the released service (httpx)."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg
import httpx
from pydantic import Field


@dataclass
class Probe:
    url: str
    ok: bool  # a 2xx answer (JSON or text)
    status: int | None
    version: str | None  # as reported where the spec's health_version says; None when not reported
    latency_ms: float
    error: str = ""
    body: dict | str | None = None
    at: float = field(default_factory=time.time)
    version_checked: bool = True  # False when the spec turns the version check off

    def healthy_for(self, version: str | None) -> bool:
        return self.ok and (version is None or not self.version_checked or self.version == version)

    def summary(self) -> str:
        if self.error:
            return f"{self.url}: {self.error} ({self.latency_ms:.0f} ms)"
        body = json.dumps(self.body) if isinstance(self.body, dict) else (self.body or "")
        version = f" version={self.version}" if self.version_checked else ""
        return f"{self.url}: HTTP {self.status}{version} ({self.latency_ms:.0f} ms) {body[:200]}"


def reported_version(resp: httpx.Response, body, version_from: str) -> str | None:
    """The version a health answer reports, read where `version_from` says (json:<a.b.c>, header:<Name>)."""
    kind, _, where = version_from.partition(":")
    if kind == "header":
        return resp.headers.get(where)
    if kind == "json":
        value = body
        for key in where.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return None if value is None or isinstance(value, (dict, list)) else str(value)
    return None


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


class HttpProber(dg.ConfigurableResource):
    """Probes health endpoints over HTTP. A probe never raises: any error is a failed probe."""

    user_agent: str = Field("ops-pipeline-health/1", description="User-Agent of probes.")

    def probe(self, url: str, timeout_s: float = 5.0, version_from: str = "json:version",
              client: httpx.Client | None = None) -> Probe:
        """One GET of `url`. Healthy: a 2xx answer; the version is read where `version_from` says (off: not read).
        `client`: a shared client (see `shared_client`) instead of one built for this probe."""
        started = time.monotonic()
        # httpx's timeouts bound each network operation, not the probe: an endpoint that trickles its answer a byte
        # at a time never times out. A watchdog shuts the probe's socket down once `timeout_s` has passed.
        sockets: list[socket.socket] = []

        def trace(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
                sock = info["return_value"].get_extra_info("socket")
                if sock is not None:
                    sockets.append(sock)

        def cut() -> None:
            for sock in sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(timeout_s, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            if client is not None:
                resp = client.get(url, timeout=timeout_s, extensions={"trace": trace})
            else:
                with self.shared_client() as own:
                    resp = own.get(url, timeout=timeout_s, extensions={"trace": trace})
            latency = (time.monotonic() - started) * 1000
            try:
                body = resp.json()
            except ValueError:
                body = resp.text[:500]
            return Probe(url=url, ok=200 <= resp.status_code < 300, status=resp.status_code,
                         version=reported_version(resp, body, version_from), latency_ms=latency,
                         body=body if isinstance(body, (dict, str)) else json.dumps(body)[:500],
                         version_checked=version_from != "off")
        except httpx.HTTPError as exc:
            elapsed = time.monotonic() - started
            error = f"{type(exc).__name__}: {exc}"
            if elapsed >= timeout_s and not isinstance(exc, httpx.TimeoutException):
                error = f"no complete answer within {timeout_s:.1f} s (cut; {error})"
            return Probe(url=url, ok=False, status=None, version=None, latency_ms=elapsed * 1000, error=error[:300])
        finally:
            watchdog.cancel()

    def shared_client(self, max_connections: int = 1) -> httpx.Client:
        """A client whose every probe opens a fresh connection: a kept-alive socket to a dying instance says nothing
        about the service. Building one costs ~10-40 ms of CPU (TLS context): share it across many probes."""
        return httpx.Client(headers={"User-Agent": self.user_agent, "Connection": "close"},
                            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0))

    def wait_healthy(self, url: str, *, version: str | None, successes: int, interval_s: float, timeout_s: float,
                     deadline_s: float, version_from: str = "json:version", stop_reason: Callable[[], str] | None = None,
                     confirmed: Callable[[], bool] | None = None) -> HealthWait:
        """The one "N healthy answers in a row" wait (the release gate, and each new instance of every target).

        Probes `url` every `interval_s` until `successes` consecutive healthy answers reporting `version` (None: any
        version), or `deadline_s`. `stop_reason`, asked before each probe, names why waiting longer is pointless (the
        process vanished, a crash loop, an unhealthy HEALTHCHECK): the wait stops at once with it. `confirmed` must also
        hold when the streak is reached (e.g. the engine's own HEALTHCHECK); until it does, probing goes on."""
        probes: list[Probe] = []
        streak = 0
        end = time.monotonic() + deadline_s
        while True:
            reason = stop_reason() if stop_reason else ""
            if reason:
                return HealthWait(False, probes, reason)
            p = self.probe(url, timeout_s=min(timeout_s, max(0.1, end - time.monotonic())), version_from=version_from)
            probes.append(p)
            streak = streak + 1 if p.healthy_for(version) else 0
            if streak >= successes and (confirmed is None or confirmed()):
                return HealthWait(True, probes)
            if time.monotonic() + interval_s > end:
                return HealthWait(False, probes, f"not healthy within {deadline_s:.0f} s")
            time.sleep(interval_s)


@dataclass
class HealthWait:
    """How a wait for health ended: `ok`, every probe made, and why it stopped when not ok."""

    ok: bool
    probes: list[Probe]
    stopped: str = ""

    @property
    def last(self) -> Probe | None:
        return self.probes[-1] if self.probes else None

    def detail(self) -> str:
        last = f"last probe: {self.last.summary()}" if self.last else "no probe answered"
        return last if self.ok else f"{self.stopped}; {last}"
