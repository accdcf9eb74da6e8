"""A constant-rate HTTP load generator on loopback, for the zero-downtime and rollback benchmarks.

Half the workers keep one connection alive across requests (like a browser or a proxy pool), half open a
fresh connection per request (like a new client). Every request is counted: 2xx, non-2xx, or a connection
error (refused, reset, timeout, read error). It runs in its own process so the measured side's CPU use does
not throttle it unevenly.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int = 0
    ok: int = 0
    non_2xx: int = 0
    errors: int = 0
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # first few failures, for the report

    @property
    def failed(self) -> int:
        return self.non_2xx + self.errors

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
        status, version, error = None, None, None
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
            if conn is not None:
                conn.close()
            conn = None
        with lock:
            out["requests"] += 1
            if error:
                out["errors"] += 1
                if len(out["samples"]) < 10:
                    out["samples"].append(error)
            elif 200 <= status < 300:
                out["ok"] += 1
            else:
                out["non_2xx"] += 1
                if len(out["samples"]) < 10:
                    out["samples"].append(f"HTTP {status}")
            if version:
                out["versions"][version] = out["versions"].get(version, 0) + 1


def _run(host: str, port: int, path: str, workers: int, rate: float, stop_evt, queue) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    out = {"requests": 0, "ok": 0, "non_2xx": 0, "errors": 0, "versions": {}, "samples": []}
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
