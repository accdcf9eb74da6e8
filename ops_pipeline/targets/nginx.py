"""The front proxy on the host: nginx with its own prefix, config and pid file, in front of a target's instances.

The generated config listens on the environment's public address and routes to `upstream app_servers
{ least_conn; server 127.0.0.1:<port>; ... }` (weighted round-robin during a canary step, whose weights must give its
share). Every change is written, checked with `nginx -t`, then applied by
starting nginx or by a graceful `nginx -s reload`; `apply` returns the previous worker generation so the caller
can wait until it has finished its in-flight requests (`wait_gone`) before stopping an instance it took out.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ops_pipeline.targets.base import LogFn
from ops_pipeline.targets.canary import LOG_FORMAT
from ops_pipeline.targets.procs import children, cmdline

KEEPALIVE_MIN_TIMEOUT_SINCE = (1, 27, 4)


class NginxError(RuntimeError):
    pass


class HostNginx:
    """The environment's load balancer: Debian's nginx on the host, with its own prefix, config and pid file.

    `label` names the app, environment and target in the generated config's header."""

    def __init__(self, root: Path, listen_host: str, listen_port: int, drain_s: float, label: str) -> None:
        self.root = root
        self.conf = root / "nginx.conf"
        self.pidfile = root / "nginx.pid"
        self.error_log = root / "error.log"
        self.access_log = root / "access.log"
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.drain_s = drain_s
        self.label = label
        self._version: tuple[int, ...] | None = None

    @property
    def version(self) -> tuple[int, ...]:
        """nginx's version, from `nginx -v` ("nginx version: nginx/1.22.1"); (0,) when it cannot be read."""
        if self._version is None:
            try:
                out = subprocess.run([self.binary(), "-v"], capture_output=True, text=True, timeout=10, check=False)
                text = (out.stderr + out.stdout).split("/", 1)[-1].split()[0]
                self._version = tuple(int(x) for x in text.split("."))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                self._version = (0,)
        return self._version

    @staticmethod
    def binary() -> str:
        found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
        if not found:
            raise NginxError("nginx not found on this host (Debian: apt-get install nginx-light or nginx)")
        return found

    def _nginx(self, *args: str, conf: Path | None = None, timeout_s: float = 30) -> subprocess.CompletedProcess:
        argv = [self.binary(), "-p", f"{self.root}/", "-e", str(self.error_log), "-c", str(conf or self.conf), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False,
                              env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})

    def master_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if cmdline(pid).startswith("nginx: master") else None

    def workers(self) -> dict[int, str]:
        pid = self.master_pid()
        return {p: c for p, c in children(pid).items() if "worker process" in c} if pid else {}

    def render(self, servers: list[tuple[int, str]], weights: dict[int, int] | None = None,
               access_log: bool = False) -> str:
        """The whole config. `weights` (port -> nginx weight) splits the requests between servers (a canary step);
        `access_log` writes one JSON line per request to access.log (canary analysis), else nothing is logged."""
        r = self.root
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        weights = weights or {}
        lines = [f"        server 127.0.0.1:{port}{f' weight={weights[port]}' if port in weights else ''} "
                 f"max_fails=2 fail_timeout=5s;  # {comment}" for port, comment in servers]
        if not lines:
            lines = ["        server 127.0.0.1:9 down;  # no instance in service yet"]
        upstream = "\n".join(lines)
        # A graceful reload makes the old workers close idle client keep-alive connections at once; a client that
        # sends on one at that moment sees the connection closed without an answer (HTTP allows it to resend an
        # idempotent request; not every client does). nginx >= 1.27.4 can keep such a connection for one more
        # request and answer it with `Connection: close` (keepalive_min_timeout). Debian 12 ships 1.22.
        min_timeout = "    keepalive_min_timeout 1s;\n" if self.version >= KEEPALIVE_MIN_TIMEOUT_SINCE else ""
        # least_conn sends a request to any idle server before a busy one whatever its weight (a canary at weight 1
        # beside busy stable servers at 9 got 31% instead of 10%): weighted round-robin keeps a canary step's share.
        balance = ("        # weighted round-robin: a canary step's share (least_conn would favour idle servers)"
                   if weights else "        least_conn;")
        log_directives = (f"    log_format canary escape=json '{LOG_FORMAT}';\n    access_log {r}/access.log canary;\n"
                          if access_log else "    access_log off;\n")
        return f"""# Generated by ops-pipeline for {self.label}. Every rollout rewrites it: do not edit.
{user}worker_processes auto;
worker_shutdown_timeout {max(1, int(self.drain_s))}s;
pid {r}/nginx.pid;
error_log {r}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
{log_directives}    server_tokens off;
    keepalive_timeout 65s;
{min_timeout}    client_body_temp_path {r}/tmp/body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    upstream app_servers {{
{balance}
{upstream}
        keepalive 32;
    }}

    server {{
        listen {self.listen_host}:{self.listen_port};

        location / {{
            proxy_pass http://app_servers;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_cache_bypass $http_upgrade;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""

    def _prepare_dirs(self) -> None:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            try:
                nobody = pwd.getpwnam("nobody")
                for d in [tmp, *tmp.iterdir()]:
                    os.chown(d, nobody.pw_uid, nobody.pw_gid)
            except KeyError:
                pass

    def _error_tail(self) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-8:])
        except OSError:
            return ""

    def apply(self, servers: list[tuple[int, str]], log: LogFn, weights: dict[int, int] | None = None,
              access_log: bool = False) -> set[int]:
        """Make nginx route to exactly `servers` [(published port, comment)] (with `weights`, see `render`): write,
        `nginx -t`, then start it or reload it gracefully. Returns the pids of the previous worker generation (they
        finish in-flight requests and exit); empty when nothing had to be reloaded."""
        self._prepare_dirs()
        text = self.render(servers, weights, access_log)
        pid = self.master_pid()
        if pid and self.conf.exists() and self.conf.read_text() == text:
            return set()
        candidate = self.root / "nginx.conf.new"
        candidate.write_text(text)
        test = self._nginx("-t", "-q", conf=candidate)
        if test.returncode != 0:
            raise NginxError(f"`nginx -t` rejected the generated config {candidate}: {(test.stderr or test.stdout).strip()[-1500:]}")
        os.replace(candidate, self.conf)
        ports = ", ".join(f"{p}" + (f" (weight {weights[p]})" if weights and p in weights else "")
                          for p, _ in servers) or "none"
        if not pid:
            started = self._nginx()
            if started.returncode != 0:
                raise NginxError(f"nginx did not start ({self.listen_host}:{self.listen_port}): "
                                 f"{(started.stderr or started.stdout).strip()[-1500:]}")
            deadline = time.monotonic() + 10
            while not self.workers() and time.monotonic() < deadline:
                time.sleep(0.05)
            log(f"nginx started on {self.listen_host}:{self.listen_port} (pid {self.master_pid()}), upstream: {ports}")
            return set()
        before = set(self.workers())
        reload = self._nginx("-s", "reload")
        if reload.returncode != 0:
            raise NginxError(f"`nginx -s reload` failed: {(reload.stderr or reload.stdout).strip()[-1500:]}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            current = self.workers()
            if any(p not in before and "shutting down" not in c for p, c in current.items()):
                log(f"nginx reloaded, upstream: {ports}")
                return before
            time.sleep(0.02)
        raise NginxError(f"nginx did not start new workers within 15 s of the reload: {self._error_tail()}")

    def reset_access_log(self) -> None:
        """Start a new access log (the previous canary's records are dropped): it is written only while a canary
        runs, and the next canary removes it, so it never holds more than one canary's requests."""
        self.access_log.unlink(missing_ok=True)

    def read_access_log(self, offset: int) -> tuple[list[bytes], int]:
        """The complete lines written since byte `offset`, and the offset after them (a partial last line waits)."""
        try:
            with open(self.access_log, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        return data[:end].splitlines(), offset + end

    def wait_gone(self, pids: set[int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            left = pids & set(self.workers())
            if not left:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self) -> bool:
        pid = self.master_pid()
        if not pid:
            return False
        self._nginx("-s", "quit")
        deadline = time.monotonic() + 15
        while cmdline(pid).startswith("nginx: master") and time.monotonic() < deadline:
            time.sleep(0.1)
        if cmdline(pid).startswith("nginx: master"):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return True
