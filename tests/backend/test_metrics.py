"""Metrics on the Flask app and a real Redis: histogram buckets, failure reasons, the trainer
and pre-annotation gauges, basic auth and 503 without Redis (with the services running:
tests/system/test_metrics_stack.py)."""

from __future__ import annotations

import base64
import time

import pytest
import redis
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from backend.app import create_app
from backend.metrics import RedisCollector
from contracts import metrics
from contracts import preannotate as runs
from contracts.jobs import QUEUE_BACKGROUND
from contracts.settings import Settings
from launcher.redis_server import EmbeddedRedis, free_port
from tests.support.protocol import fixture

CFG = fixture("post_setup.json")["json"]["schema"]


@pytest.fixture(scope="module")
def own_redis():
    with EmbeddedRedis() as server:
        yield server


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.content_type.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_until(client, done, timeout: float = 10.0) -> tuple[dict, int]:
    """Scrape until ``done(samples)``: a worker records a job's metrics right after it has
    delivered the job's results, so they can land a moment after the /predict answer.
    Returns the last scrape and how many scrapes were made."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        samples = scrape(client)
        n += 1
        if done(samples) or time.monotonic() > deadline:
            return samples, n
        time.sleep(0.02)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_histogram_observations_become_cumulative_buckets(own_redis):
    conn = redis.Redis.from_url(own_redis.url)
    h = metrics.HistogramDef("sam2unet_test_seconds", "test", ("kind",), (0.1, 1.0, 10.0))
    conn.delete(h.key)
    with conn.pipeline() as pipe:
        for v in (0.05, 0.1, 0.5, 3.0, 50.0, -1.0):  # a bound itself counts as "<= bound"
            h.observe(pipe, v, "a")
        h.observe(pipe, 2.0, "b")
        pipe.execute()
    fields = {k.decode(): v.decode() for k, v in conn.hgetall(h.key).items()}
    fam = RedisCollector._histogram(h, fields, HistogramMetricFamily)
    got = {(s.name, s.labels.get("kind"), s.labels.get("le")): s.value for s in fam.samples}
    assert got[("sam2unet_test_seconds_bucket", "a", "0.1")] == 3  # -1 (clamped to 0), .05, .1
    assert got[("sam2unet_test_seconds_bucket", "a", "1.0")] == 4
    assert got[("sam2unet_test_seconds_bucket", "a", "10.0")] == 5
    assert got[("sam2unet_test_seconds_bucket", "a", "+Inf")] == 6
    assert got[("sam2unet_test_seconds_count", "a", None)] == 6
    assert got[("sam2unet_test_seconds_sum", "a", None)] == pytest.approx(53.65)
    assert got[("sam2unet_test_seconds_bucket", "b", "1.0")] == 0
    assert got[("sam2unet_test_seconds_bucket", "b", "10.0")] == 1
    conn.delete(h.key)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("task data has no image under 'image'", "no_image"),
        ("not finished before the deadline; computing in the background", "deadline"),
        ("prediction job failed", "job_failed"),
        ("prediction job vanished", "job_failed"),
        ("interactive prompt 'x': rectangle lies outside the image", "prompt"),
        ("cannot decode image: cannot identify image file", "decode"),
        ("empty image (0 bytes)", "decode"),
        ("image of 9000x9000 pixels exceeds the 64000000 pixel limit", "decode"),
        ("http://127.0.0.1:1/upload/x.png answered HTTP 404", "fetch"),
        ("image fetch failed: OSError", "fetch"),
        ("Label Studio unreachable at http://ls:8080", "fetch"),
        ("something new", "other"),
    ],
)
def test_failure_reasons(message, reason):
    assert metrics.failure_reason(message) == reason


def test_trainer_state_and_preannotation_gauges(own_redis, model_dir):
    from trainer.service import ROUNDS_KEY, STATUS_KEY

    assert (ROUNDS_KEY, STATUS_KEY) == (metrics.ROUNDS_KEY, metrics.TRAINER_STATUS_KEY)
    conn = redis.Redis.from_url(f"redis://127.0.0.1:{own_redis.port}/3")
    conn.flushdb()
    client = create_app(Settings(model_dir=model_dir), conn).test_client()
    before = scrape(client)
    assert value(before, "sam2unet_workers") == 0
    assert not any(k[0].startswith("sam2unet_trainer_") for k in before)

    # the trainer's status while a round trains (its progress callback writes these fields)
    conn.hset(STATUS_KEY, mapping={"state": "training", "project": 1, "epoch": 3, "epochs": 10,
                                   "loss": "0.25"})  # fmt: skip
    run_id, _ = runs.start_run(conn, 7, page_size=10)
    runs.update(conn, run_id, total=20)
    runs.record(conn, run_id, done=5, failed=1, skipped=2, queued=8)

    after = scrape(client)
    assert value(after, "sam2unet_trainer_state_info", state="training", project="1") == 1
    assert value(after, "sam2unet_trainer_epoch") == 3
    assert value(after, "sam2unet_trainer_loss") == 0.25
    assert value(after, "sam2unet_preannotate_runs", status="running") == 1
    run = {"run": run_id, "project": "7"}
    assert value(after, "sam2unet_preannotate_tasks", **run, state="total") == 20
    assert value(after, "sam2unet_preannotate_tasks", **run, state="done") == 5
    assert value(after, "sam2unet_preannotate_tasks", **run, state="skipped") == 2
    assert value(after, "sam2unet_queue_depth", queue=QUEUE_BACKGROUND) == 1  # its first page
    runs.cancel(conn, run_id)
    done = scrape(client)
    assert value(done, "sam2unet_preannotate_runs", status="cancelled") == 1
    assert not any(k[0] == "sam2unet_preannotate_tasks" for k in done)
    conn.flushdb()


@pytest.mark.timeout(60)  # a hang guard: without Redis, /metrics answers at once
def test_metrics_behind_basic_auth_and_503_without_redis(own_redis, model_dir):
    conn = redis.Redis.from_url(own_redis.url)
    settings = Settings(model_dir=model_dir, basic_auth_user="prom", basic_auth_pass="pw")
    client = create_app(settings, conn).test_client()
    r = client.get("/metrics")
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    good = "Basic " + base64.b64encode(b"prom:pw").decode()
    assert client.get("/metrics", headers={"Authorization": good}).status_code == 200

    down = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", model_dir=model_dir)
    client = create_app(down).test_client()
    r = client.get("/metrics")
    assert r.status_code == 503 and r.get_json()["error"] == "redis_unavailable"
    assert client.get("/health").status_code == 503
