"""Host relays: how containers reach services on the host's loopback.

Reaching services on the host's loopback (DATABASE_URL / REDIS_URL of the embedded local stack, or any other
service the operator runs on 127.0.0.1): a container's 127.0.0.1 is its own. Containers reach the host at their
network's gateway address (what Podman also puts in /etc/hosts as `host.containers.internal`). So every URL value
of the app's environment whose host is a loopback address is rewritten to the gateway, and for each such
host:port the target runs a tiny TCP relay (this module, `python -m ops_pipeline.targets.relay
MARK LHOST LPORT THOST TPORT`) on the host, listening on `<gateway>:<port>` only and forwarding to
`127.0.0.1:<port>`. The relay binds with IP_FREEBIND, because the gateway address exists only while a container
is attached to the network (netavark removes the bridge with the last container) and the relay has to outlive
that. Nothing listens on a public interface, PostgreSQL/Redis still require their passwords (the relay only
moves bytes), and the local stack itself is unchanged. The one-off migration container needs none of this: it
runs in the host's network namespace (see DockerEngine.run_once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ops_pipeline.targets.base import LogFn
from ops_pipeline.targets.procs import cmdline

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
DEFAULT_PORTS = {"postgres": 5432, "postgresql": 5432, "redis": 6379, "rediss": 6379, "mysql": 3306, "mongodb": 27017,
                 "amqp": 5672, "http": 80, "https": 443, "nats": 4222}
RELAY_MARK = "ops-pipeline-host-relay"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding ops_pipeline/: the relay runs this same code


def relay_main(argv: list[str]) -> None:
    """TCP relay: listen on LHOST:LPORT (IP_FREEBIND: the address may come and go), forward to THOST:TPORT."""
    _mark, lhost, lport, thost, tport = argv[:5]

    async def pump(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(thost, int(tport)), 10)
        except (TimeoutError, OSError):
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, up_writer), pump(up_reader, client_writer))

    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
        sock.bind((lhost, int(lport)))
        sock.listen(256)
        sock.setblocking(False)
        server = await asyncio.start_server(handle, sock=sock)
        print(f"listening on {lhost}:{lport} -> {thost}:{tport}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())


class HostRelays:
    """Relays `<gateway>:<port>` -> `127.0.0.1:<port>` for containers, one small process per port.

    Detached from the run (they serve containers that outlive it); pid and log files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _files(self, lhost: str, lport: int) -> tuple[Path, Path]:
        return self.root / f"{lhost}_{lport}.pid", self.root / f"{lhost}_{lport}.log"

    def alive(self, lhost: str, lport: int) -> int | None:
        pidfile, _ = self._files(lhost, lport)
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        cmd = cmdline(pid)
        return pid if RELAY_MARK in cmd and f" {lhost} {lport} " in f" {cmd} " else None

    def ensure(self, lhost: str, lport: int, thost: str, tport: int, log: LogFn) -> None:
        if self.alive(lhost, lport):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        pidfile, logfile = self._files(lhost, lport)
        # `sh -c '... &'`: the relay is re-parented to init at once (no zombie, not tied to this run).
        proc = subprocess.run(
            ["/bin/sh", "-c", 'exec </dev/null; "$@" >"$RELAY_LOG" 2>&1 & echo $!', "sh",
             sys.executable, "-s", "-m", __name__, RELAY_MARK, lhost, str(lport), thost, str(tport)],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RELAY_LOG": str(logfile), "PYTHONPATH": str(PACKAGE_ROOT)},
            capture_output=True, text=True, timeout=30, start_new_session=True, cwd="/", check=False)
        pid = int(proc.stdout.strip())
        pidfile.write_text(f"{pid}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = logfile.read_text(errors="replace") if logfile.exists() else ""
            if f"listening on {lhost}:{lport} " in text:
                log(f"host relay {lhost}:{lport} -> {thost}:{tport} started (pid {pid})")
                return
            if not cmdline(pid):
                break
            time.sleep(0.05)
        tail = logfile.read_text(errors="replace")[-1500:] if logfile.exists() else ""
        raise RuntimeError(f"host relay {lhost}:{lport} -> {thost}:{tport} did not start: {tail}")

    def stop(self, lhost: str | None = None) -> list[str]:
        stopped = []
        if not self.root.is_dir():
            return stopped
        for pidfile in self.root.glob("*.pid"):
            host, _, port = pidfile.name[: -len(".pid")].rpartition("_")
            if lhost and host != lhost:
                continue
            pid = self.alive(host, int(port)) if port.isdigit() else None
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                stopped.append(f"{host}:{port}")
            pidfile.unlink(missing_ok=True)
        return stopped


def loopback_to_gateway(app_env: dict[str, str], gateway: str) -> tuple[dict[str, str], list[tuple[str, int]], list[str]]:
    """The app's environment as a container sees it: URL values pointing at the host's loopback are rewritten to
    the network gateway. Returns (env, [(loopback host, port) to relay], [names rewritten])."""
    env: dict[str, str] = {}
    endpoints: list[tuple[str, int]] = []
    rewritten: list[str] = []
    for name, value in app_env.items():
        env[name] = value
        if "://" not in (value or ""):
            continue
        try:
            parts = urlsplit(value)
            host, port = parts.hostname, parts.port
        except ValueError:
            continue
        if host not in LOOPBACK_HOSTS and not (host or "").startswith("127."):
            continue
        port = port or DEFAULT_PORTS.get(parts.scheme.lower())
        if not port:
            continue
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo + '@' if userinfo else ''}{gateway}:{port}"
        env[name] = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        target_host = "127.0.0.1" if host == "localhost" else host
        if (target_host, port) not in endpoints:
            endpoints.append((target_host, port))
        rewritten.append(name)
    return env, endpoints, rewritten


if __name__ == "__main__":
    relay_main(sys.argv[1:])
