"""Redis: reachability of the application's Redis."""

from __future__ import annotations

import time

import dagster as dg
import redis as redis_client
from pydantic import Field

from ops_pipeline.platform.redaction import mask_url


class RedisError(RuntimeError):
    pass


class RedisResource(dg.ConfigurableResource):
    """The application's Redis, reached by URL."""

    default_timeout_s: float = Field(5.0, description="Socket timeout for checks.")

    def ping(self, url: str, timeout_s: float | None = None) -> dict:
        """PING within the timeout; returns the server version and latency. Errors never carry the password."""
        timeout = timeout_s or self.default_timeout_s
        started = time.monotonic()
        try:
            client = redis_client.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
            try:
                client.ping()
                info = client.info("server")
            finally:
                client.close()
        except ValueError as exc:
            raise RedisError(f"malformed Redis URL {mask_url(url)!r}: {exc}") from None
        except redis_client.RedisError as exc:
            raise RedisError(f"Redis at {mask_url(url)} did not answer PING: {type(exc).__name__}: {mask_url(str(exc))}") from None
        return {"redis_version": info.get("redis_version", "?"), "latency_ms": round((time.monotonic() - started) * 1000, 1)}
