"""The embedded stack survives its chosen ports being taken between choosing and binding them.

A CI run failed 26 tests at once because redis-server (daemonized: its parent exits 0) could not bind the port
chosen for it: an outgoing connection had been given the same port as its local end. Here the same thing is
done on purpose: both ports are held by connected (not listening) sockets, exactly what an outgoing
connection looks like, and the stack must still come up, on other ports, and say where.
"""

from __future__ import annotations

import json
import socket

import psycopg
import redis

from ops_pipeline.platform.local_stack import LocalStack, _ephemeral_port_range, free_port


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    low, _ = _ephemeral_port_range()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), ports
    assert len(ports) > 1  # chosen at random, not one fixed port
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def _hold_port_like_an_outgoing_connection(port: int, server: socket.socket) -> socket.socket:
    client = socket.socket()
    client.bind(("127.0.0.1", port))
    client.connect(server.getsockname())
    return client


def test_stack_starts_on_new_ports_when_its_ports_were_taken(state_dir):
    stack = LocalStack(state_dir=str(state_dir / "port-clash-stack"))
    state = stack._state()
    taken_pg, taken_redis = state["pg_port"], state["redis_port"]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    holders = [_hold_port_like_an_outgoing_connection(p, server) for p in (taken_pg, taken_redis)]
    try:
        services = stack.ensure_running()
        assert services.pg_port != taken_pg and services.redis_port != taken_redis
        saved = json.loads((stack.root / "stack.json").read_text())
        assert (saved["pg_port"], saved["redis_port"]) == (services.pg_port, services.redis_port)
        with psycopg.connect(services.database_url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert redis.Redis.from_url(services.redis_url, socket_timeout=2).ping()
        # A second call (another process, a second release) finds them running where the state file says.
        assert stack.ensure_running() == services
    finally:
        for h in holders:
            h.close()
        server.close()
        stack.stop()
