"""The result cache of the prediction jobs, against a real Redis, the worker's own job function
and context (model runtime, guarded image fetcher) and a loopback image server.

Its key is the image's content, the model version, the label config's target and the threshold:
the same bytes at a new URL are a hit, new bytes at the same URL a miss, and a change of any
other part of the key a miss. Hits are counted by the worker's own metrics
(``sam2unet_cache_hits_total`` on /metrics) and by the ``cached`` flag of each reply.
"""

from __future__ import annotations

import dataclasses
import shutil
import uuid

import pytest
import redis

import worker.runtime
from backend.app import create_app
from contracts.jobs import PredictItem, PredictPayload, decode_reply
from contracts.settings import Settings
from labelstudio.labelconfig import parse_label_config, target_to_json
from modelstore.registry import ModelRegistry
from tests.backend.test_metrics import scrape, value
from tests.support.protocol import fixture, red_circle
from tests.support.services import LabelStudioLikeFiles, png_bytes, service_env
from worker import jobs
from worker.process import make_context

CFG = fixture("post_setup.json")["json"]["schema"]


class Cache:
    """One worker's job context on a copy of the test model registry, and a /metrics client."""

    def __init__(self, redis_url: str, model_dir, files: LabelStudioLikeFiles) -> None:
        self.conn = redis.Redis.from_url(redis_url)
        self.settings = Settings.from_env(service_env(redis_url, model_dir))
        assert self.settings.cache_ttl > 0 and self.settings.threshold == 0.5
        self.context = make_context(self.settings, self.conn)
        self.metrics = create_app(self.settings, self.conn).test_client()
        self.files = files

    def hits(self) -> float:
        return value(scrape(self.metrics), "sam2unet_cache_hits_total")

    def predict(self, url: str, label_config: str = CFG) -> tuple[dict, bool, float]:
        """One task through the worker's job function: (its result, cached?, hits counted)."""
        reply_key = f"test:reply:{uuid.uuid4().hex}"
        payload = PredictPayload(
            items=(PredictItem(0, url, 1),),
            target=target_to_json(parse_label_config(label_config)),
            reply_key=reply_key,
        )
        before = self.hits()
        worker.runtime.install_context(self.context)
        jobs.predict(payload.to_json())
        _, (result,) = decode_reply(self.conn.lpop(reply_key))
        assert result.error is None, result
        return result.to_json(), result.cached, self.hits() - before


def rles(result: dict) -> list:
    return [item["value"]["rle"] for item in result["result"]]


@pytest.fixture
def cache(redis_url, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(worker.runtime, "_context", None)  # put back after the test
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    files = LabelStudioLikeFiles(tmp_path / "files")
    yield Cache(redis_url, models, files)
    files.close()


def test_the_key_is_the_image_content_not_its_url(cache):
    files = cache.files
    first = png_bytes(red_circle(seed=1))
    a = f"{files.url}/{files.add('upload/1/a.png', first)}"
    b = f"{files.url}/{files.add('upload/1/b.png', first)}"

    fresh, cached, hits = cache.predict(a)
    assert not cached and hits == 0
    again, cached, hits = cache.predict(b)  # the same bytes at a new URL
    assert cached and hits == 1
    assert rles(again) == rles(fresh)

    files.add("upload/1/a.png", png_bytes(red_circle(h=48, w=80, seed=2)))  # new bytes, same URL
    changed, cached, hits = cache.predict(a)
    assert not cached and hits == 0
    assert changed["result"][0]["original_height"] == 48  # the new image's own result
    assert cache.predict(a)[1:] == (True, 1)  # and that one is cached from now on
    assert cache.predict(b)[1:] == (True, 1)  # beside the first image's


def test_model_version_label_config_and_threshold_are_part_of_the_key(cache):
    files = cache.files
    url = f"{files.url}/{files.add('upload/2/x.png', png_bytes(red_circle(seed=3)))}"
    base, cached, _ = cache.predict(url)
    assert not cached and cache.predict(url)[1:] == (True, 1)

    # another label config: another label name for the same model channel
    other_cfg = CFG.replace('value="Foreground"', 'value="Object"')
    relabelled, cached, hits = cache.predict(url, other_cfg)
    assert not cached and hits == 0
    assert relabelled["result"][0]["value"]["brushlabels"] == ["Object"]
    assert cache.predict(url, other_cfg)[1:] == (True, 1)

    # another threshold: the same worker code with SAM2UNET_THRESHOLD changed
    lower = dataclasses.replace(cache.settings, threshold=0.2)
    cache.context = make_context(lower, cache.conn)
    _, cached, hits = cache.predict(url)
    assert not cached and hits == 0
    assert cache.predict(url)[1:] == (True, 1)
    cache.context = make_context(cache.settings, cache.conn)
    assert cache.predict(url)[1:] == (True, 1)  # the first threshold's entry is still there

    # another model version: the registry's pointer moves, the worker loads it before the job
    registry = ModelRegistry(cache.settings.model_dir, cache.conn)
    held = registry.current()
    # a new trained version (the registry's other one, v1, was never trained: it answers
    # without the model, so nothing of it is cached)
    loaded = registry.load(held)
    other = registry.create_version(
        loaded.model, loaded.config, loaded.base, parent=held, source="test"
    ).name
    assert base["model_version"] == held
    registry.promote(other, reason="test")
    moved, cached, hits = cache.predict(url)
    assert not cached and hits == 0
    assert moved["model_version"] == other
    assert cache.predict(url)[1:] == (True, 1)
