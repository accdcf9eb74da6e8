"""A constant-rate HTTP load generator on loopback, for the zero-downtime and rollback benchmarks.

Half the workers keep one connection alive across requests (like a browser or a proxy pool), half open a
fresh connection per request (like a new client). Every request is counted: 2xx, non-2xx, or a connection
error (refused, reset, timeout, read error). It runs in its own process so the measured side's CPU use does
not throttle it unevenly.

Before reusing an idle keep-alive connection a worker checks whether the server has closed it (readable at
EOF), as urllib3 and browsers do, and opens a new one if so.
A connection error on a *reused* keep-alive connection that the server closed before any byte of the answer
(the race of a server closing an idle connection as the client sends on it) still counts as an error, and is
also counted as `stale_keepalive`. Like browsers and Go's HTTP client (RFC 9112 9.3.1: an idempotent request
may be resent), the worker then resends the GET once on a fresh connection; `resent_ok` counts those that
succeeded. So the report can say both: what a client that never resends sees, and what a browser sees.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import select
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int = 0
    ok: int = 0
    non_2xx: int = 0
    errors: int = 0
    stale_keepalive: int = 0
    resent_ok: int = 0
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    failed_versions: dict = field(default_factory=dict)  # non-2xx answers by the X-App-Version that gave them
    samples: list = field(default_factory=list)  # first few failures, for the report

    @property
    def failed(self) -> int:
        return self.non_2xx + self.errors

    @property
    def unanswered(self) -> int:
        """What a browser would have seen fail: `failed` minus the GETs reset on a stale keep-alive connection (nginx
        1.22 closes idle ones at each reload) and answered when resent once (RFC 9112 9.3.1)."""
        return self.failed - self.resent_ok

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _worker(host: str, port: int, path: str, keepalive: bool, interval: float, stop: threading.Event, out: dict,
            lock: threading.Lock) -> None:
    conn = None
    next_at = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        status, version, error, stale = None, None, None, False
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            # readable while idle: the server closed it (EOF). Reconnect, as urllib3 and browsers check before reuse.
            conn.close()
            conn = None
        reused = conn is not None
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", path, headers={} if keepalive else {"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
            version = resp.getheader("X-App-Version")
            if not keepalive or resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
            del body
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"[:120]
            stale = reused and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
            if conn is not None:
                conn.close()
            conn = None
        resent_ok = stale and _resend(host, port, path)
        with lock:
            out["requests"] += 1
            out["stale_keepalive"] += stale
            out["resent_ok"] += resent_ok
            if error:
                out["errors"] += 1
                if len(out["samples"]) < 10:
                    out["samples"].append(error)
            elif 200 <= status < 300:
                out["ok"] += 1
            else:
                out["non_2xx"] += 1
                out["failed_versions"][version or "?"] = out["failed_versions"].get(version or "?", 0) + 1
                if len(out["samples"]) < 10:
                    out["samples"].append(f"HTTP {status}")
            if version:
                out["versions"][version] = out["versions"].get(version, 0) + 1


def _resend(host: str, port: int, path: str) -> bool:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", path, headers={"Connection": "close"})
        ok = 200 <= conn.getresponse().status < 300
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def _run(host: str, port: int, path: str, workers: int, rate: float, stop_evt, queue) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    out = {"requests": 0, "ok": 0, "non_2xx": 0, "errors": 0, "stale_keepalive": 0, "resent_ok": 0, "versions": {}, "failed_versions": {},
           "samples": []}
    interval = workers / rate
    threads = [threading.Thread(target=_worker, args=(host, port, path, i % 2 == 0, interval, stop, out, lock), daemon=True)
               for i in range(workers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    stop_evt.wait()
    stop.set()
    for t in threads:
        t.join(10)
    out["seconds"] = time.monotonic() - started
    queue.put(out)


class Load:
    """with Load(port, rate=800) as load: ...; load.result"""

    def __init__(self, port: int, *, host: str = "127.0.0.1", path: str = "/items?limit=1", rate: float = 800,
                 workers: int = 16) -> None:
        ctx = mp.get_context("fork")
        self._stop = ctx.Event()
        self._queue = ctx.Queue()
        self._proc = ctx.Process(target=_run, args=(host, port, path, workers, rate, self._stop, self._queue), daemon=True)
        self.result: LoadResult | None = None

    def __enter__(self) -> Load:
        self._proc.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        out = self._queue.get(timeout=60)
        self._proc.join(10)
        self.result = LoadResult(**out)
