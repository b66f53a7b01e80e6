"""Connections every service opens the same way."""

from __future__ import annotations

import redis


def redis_client(url: str) -> redis.Redis:
    """A Redis client that fails fast when the server is down (no hang)."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=2.0, socket_timeout=10.0, health_check_interval=15
    )
