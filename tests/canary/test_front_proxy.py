"""The front proxy's canary parts with real nginx and two tiny backends (seconds): weights split the requests, each
request is one JSON line the analysis reads back, and the usual config (least_conn, no access log) is unchanged."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import httpx
import pytest

from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.targets import canary as c
from ops_pipeline.targets.nginx import HostNginx


class Backend(http.server.ThreadingHTTPServer):
    def __init__(self, status: int) -> None:
        status_code = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status_code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def proxy(tmp_path: Path):
    nginx = HostNginx(tmp_path / "nginx", "127.0.0.1", free_port(), 1.0, "canary front proxy test")
    backends = [Backend(200), Backend(500)]
    try:
        yield nginx, backends
    finally:
        nginx.stop()
        for b in backends:
            b.shutdown()


def test_default_config_is_unchanged_least_conn_and_no_access_log(tmp_path):
    conf = HostNginx(tmp_path, "127.0.0.1", 1234, 1.0, "x").render([(4001, "a"), (4002, "b")])
    assert "least_conn;" in conf and "access_log off;" in conf and "weight=" not in conf and "log_format" not in conf


def test_weights_split_the_requests_and_every_request_is_a_json_line(proxy):
    nginx, (stable, canary) = proxy
    servers = [(stable.server_port, "stable"), (canary.server_port, "canary")]
    ws, wc = c.weights(1, 1, 10)
    nginx.reset_access_log()
    nginx.apply(servers, print, weights={stable.server_port: ws, canary.server_port: wc}, access_log=True)
    conf = nginx.conf.read_text()
    assert f"weight={ws} " in conf and f"weight={wc} " in conf and "least_conn;" not in conf
    since = time.time()
    statuses = [httpx.get(f"http://127.0.0.1:{nginx.listen_port}/x", timeout=5).status_code for _ in range(200)]
    time.sleep(0.2)
    lines, offset = nginx.read_access_log(0)
    assert len(lines) == 200 and offset == nginx.access_log.stat().st_size
    groups = {f"127.0.0.1:{stable.server_port}": c.STABLE, f"127.0.0.1:{canary.server_port}": c.CANARY}
    figs = c.figures(c.parse_lines(lines), groups, since - 1)
    # weighted round-robin is exact: 1 in 10 to the canary, and every 500 the client saw is the canary's
    assert (figs[c.CANARY].requests, figs[c.STABLE].requests) == (20, 180)
    assert figs[c.CANARY].errors == statuses.count(500) == 20 and figs[c.STABLE].errors == 0
    assert figs[c.STABLE].p95_ms >= 0 and nginx.read_access_log(offset) == ([], offset)
    # back to the usual config: least_conn, no log written any more
    assert nginx.wait_gone(nginx.apply(servers[:1], print), 10)  # the previous workers (which logged) are gone
    httpx.get(f"http://127.0.0.1:{nginx.listen_port}/x", timeout=5)
    time.sleep(0.2)
    assert "least_conn;" in nginx.conf.read_text() and nginx.read_access_log(offset) == ([], offset)


def test_an_inconclusive_step_holds_and_widens_its_window_until_traffic_comes(proxy):
    """CanaryRollout's judging loop against real nginx records: no traffic at first (inconclusive, held past the
    pause), then enough traffic: the same step passes on its widened window. (The holder of `spec` and `nginx` stands
    in for the PM2 target, whose other parts play no role in judging.)"""
    from types import SimpleNamespace

    from ops_pipeline.platform.spec import ReleaseConfig, ReleaseSpec
    from ops_pipeline.targets.base import RolloutReport
    from ops_pipeline.targets.pm2.canary_rollout import CanaryRollout

    nginx, (stable, _) = proxy
    other = Backend(200)  # a good canary this time
    try:
        cfg = ReleaseConfig(canary={"steps": [{"weight": 50, "pause_s": 1.0}],
                                    # latency is not the point here (two Python backends in this process)
                                    "analysis": {"min_requests": 20, "max_inconclusive_s": 15, "p95_floor_ms": 1000}})
        target = SimpleNamespace(spec=ReleaseSpec(config=cfg, version="v2", app_dir=""), nginx=nginx)
        logged: list[str] = []
        rollout = CanaryRollout(target, "v2", "d", {}, RolloutReport("v2", []), time.monotonic(), logged.append)
        servers = [(stable.server_port, "stable"), (other.server_port, "canary")]
        nginx.reset_access_log()
        nginx.apply(servers, print, weights={stable.server_port: 1, other.server_port: 1}, access_log=True)
        groups = {f"127.0.0.1:{stable.server_port}": c.STABLE, f"127.0.0.1:{other.server_port}": c.CANARY}

        def traffic_later():
            time.sleep(3.0)
            for _ in range(60):
                httpx.get(f"http://127.0.0.1:{nginx.listen_port}/x", timeout=5)

        sender = threading.Thread(target=traffic_later)
        sender.start()
        t0 = time.monotonic()
        result = rollout._judge(1, cfg.canary.steps[0], groups, {"s": stable.server_port}, {"c": other.server_port})
        sender.join()
        assert (result.verdict, result.reasons) == (c.PASS, [])
        assert result.canary.requests >= 20 and result.stable.requests >= 20
        assert result.window_s > 3.0 and time.monotonic() - t0 > 3.0  # held past its 1 s pause
        assert any("inconclusive, holding" in line for line in logged)
    finally:
        other.shutdown()
