#!/usr/bin/env python3
"""Run container HEALTHCHECKs on schedule for a Podman engine that cannot do it itself.

Podman 4.3 schedules healthchecks with systemd transient timers (`systemd-run`). On a
host without systemd (this one: PID 1 is not systemd) the service logs
  "unable to get systemd connection to add healthchecks: dial unix /run/systemd/private"
and no check ever runs: State.Health.Status stays "starting" forever. A check only runs
when someone calls `podman healthcheck run NAME` or GET /libpod/containers/NAME/healthcheck;
podman then applies Retries/StartPeriod/Timeout and stores the result, which the
Docker-compatible API reports as State.Health (Status/FailingStreak/Log).

This daemon does what the systemd timers would do: it polls the API socket for running
containers, reads each one's Healthcheck config once, and triggers the check every
Interval (first one Interval after start, as Docker does). Stdlib only.

usage: healthcheck-runner.py --socket /path/podman.sock [--poll 1.0] [--service-pid PID]
It exits when the service pid (if given) is gone or the socket stays unreachable for 60s.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import sys
import time
import urllib.parse

API = "/v4.0.0/libpod"
DEFAULT_INTERVAL_NS = 30 * 10**9   # Docker's default interval


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def call(sock_path, method, url, timeout=30.0):
    conn = UnixHTTPConnection(sock_path, timeout)
    try:
        conn.request(method, url)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body
    finally:
        conn.close()


def log(msg):
    print(time.strftime("%Y-%m-%dT%H:%M:%S"), msg, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between container listings")
    ap.add_argument("--service-pid", type=int, default=0)
    args = ap.parse_args()

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__("flag", True))

    # key (id, StartedAt) -> {"name", "interval", "timeout", "next", "running": Future|None, "last"}
    tracked = {}
    unreachable_since = None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    filters = urllib.parse.quote(json.dumps({"status": ["running"]}))
    log(f"healthcheck runner started (socket {args.socket}, poll {args.poll}s)")

    while not stop["flag"]:
        if args.service_pid:
            try:
                os.kill(args.service_pid, 0)
            except ProcessLookupError:
                log(f"podman service pid {args.service_pid} is gone; exiting")
                break
            except PermissionError:
                pass
        try:
            status, body = call(args.socket, "GET", f"{API}/containers/json?filters={filters}", timeout=15)
            if status != 200:
                raise OSError(f"list containers: HTTP {status}")
            containers = json.loads(body or b"[]") or []
            unreachable_since = None
        except (OSError, http.client.HTTPException, ValueError) as e:
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > 60:
                log(f"API unreachable for 60s ({e}); exiting")
                break
            time.sleep(args.poll)
            continue

        now = time.monotonic()
        seen = set()
        for c in containers:
            key = (c["Id"], c.get("StartedAt"))
            seen.add(key)
            if key in tracked:
                continue
            try:
                st, b = call(args.socket, "GET", f"{API}/containers/{c['Id']}/json", timeout=15)
                hc = (json.loads(b).get("Config") or {}).get("Healthcheck") if st == 200 else None
            except (OSError, http.client.HTTPException, ValueError):
                continue   # retry next round
            test = (hc or {}).get("Test") or []
            if not test or test[0] == "NONE":
                tracked[key] = None
                continue
            interval = (hc.get("Interval") or DEFAULT_INTERVAL_NS) / 1e9
            timeout = (hc.get("Timeout") or DEFAULT_INTERVAL_NS) / 1e9
            name = (c.get("Names") or [c["Id"][:12]])[0]
            tracked[key] = {"name": name, "interval": interval, "timeout": timeout,
                            "next": now + interval, "running": None, "last": None}
            log(f"tracking {name}: every {interval:g}s")

        for key in [k for k in tracked if k not in seen]:
            t = tracked.pop(key)
            if t:
                log(f"untracking {t['name']} (not running)")

        for key, t in tracked.items():
            if not t:
                continue
            fut = t["running"]
            if fut is not None and fut.done():
                t["running"] = None
                try:
                    st, b = fut.result()
                    result = json.loads(b).get("Status") if st == 200 else f"HTTP {st}"
                except Exception as e:   # noqa: BLE001 - report and keep going
                    result = f"error: {e}"
                if result != t["last"]:
                    log(f"{t['name']}: {t['last']} -> {result}")
                    t["last"] = result
            if t["running"] is None and now >= t["next"]:
                t["next"] = now + t["interval"]
                t["running"] = pool.submit(call, args.socket, "GET",
                                           f"{API}/containers/{key[0]}/healthcheck",
                                           t["timeout"] + 30)
        time.sleep(args.poll)

    pool.shutdown(wait=False, cancel_futures=True)
    log("healthcheck runner stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
