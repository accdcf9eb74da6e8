"""The host relay as its own process: started with `python -m ops_pipeline.targets.relay`, it forwards
bytes both ways, is found again by its pid file, and stops on SIGTERM."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

from ops_pipeline.platform.local_stack import free_port
from ops_pipeline.targets.procs import cmdline
from ops_pipeline.targets.relay import RELAY_MARK, HostRelays


class _Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo " + line)


def test_relay_process_forwards_bytes_and_stops(tmp_path):
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    relays = HostRelays(tmp_path / "relays")
    lport, tport = free_port(), upstream.server_address[1]
    lines: list[str] = []
    try:
        relays.ensure("127.0.0.1", lport, "127.0.0.1", tport, lines.append)
        pid = relays.alive("127.0.0.1", lport)
        assert pid and RELAY_MARK in cmdline(pid) and "-m ops_pipeline.targets.relay" in cmdline(pid)
        assert lines == [f"host relay 127.0.0.1:{lport} -> 127.0.0.1:{tport} started (pid {pid})"]
        relays.ensure("127.0.0.1", lport, "127.0.0.1", tport, lines.append)  # already running: nothing started
        assert len(lines) == 1
        with socket.create_connection(("127.0.0.1", lport), timeout=5) as s:
            s.sendall(b"hello\n")
            assert s.makefile("rb").readline() == b"echo hello\n"
        assert relays.stop() == [f"127.0.0.1:{lport}"]
        deadline = time.monotonic() + 10
        while cmdline(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cmdline(pid)
        assert relays.alive("127.0.0.1", lport) is None
    finally:
        relays.stop()
        upstream.shutdown()
        upstream.server_close()
